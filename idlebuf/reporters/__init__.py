"""Reporters: typed results (analysis.results, the experiments' Comparison and Sweep) rendered
for people and tools. One module per format - text (terminal tables), json, html (with its
svg plots), perfetto (timelines) - each computing nothing of its own; report_files writes a
comparison's page and timeline. This package imports none of them, so that they can import
each other without a cycle through it."""
