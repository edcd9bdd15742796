"""`idlebuf doctor`: a checklist of what this machine offers for tracing, and what gaps cost."""

from __future__ import annotations

import argparse
import json

from probes import features


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="check kernel features, privileges and tracefs",
        description="Check what idlebuf needs: kernel version, privileges, tracefs, BTF, "
        "lockdown, kernel headers, bcc and each tracepoint; say what each gap costs.",
    )
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    checks = features.run_checks()
    if args.json:
        print(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            mark = "ok " if c.ok else ("MISSING" if c.required else "absent ")
            line = f"[{mark:^7}] {c.name:<{width}}  {c.detail}"
            if not c.ok:
                line += f"\n{'':>10}{'':<{width}}  -> {c.cost}"
            print(line)
        missing = features.missing_required(checks)
        print(
            "\nidlebuf can record here."
            if not missing
            else f"\nidlebuf cannot record here: {len(missing)} required check(s) failed."
        )
    return 1 if features.missing_required(checks) else 0
