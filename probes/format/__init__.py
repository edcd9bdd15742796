"""The trace format, in one place that capture and analysis both import.

- `schema`: the wire record shared with BPF and the Parquet tables (one definition each);
- `meta`: meta.json as typed dataclasses;
- `writer`: writing a trace directory safely, incrementally;
- `reader`: opening one (checked, typed, as DataFrames);
- `errors`: the error family every layer raises.

Nothing here imports bcc or the rest of capture: analysis may import this package, and only it.
"""
