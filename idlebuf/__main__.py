import sys

from idlebuf.cli import main

sys.exit(main())
