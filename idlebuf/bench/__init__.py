"""Benchmarks (`scripts/bench`): what tracing costs the traced program, how fast the recorder
and the analysis are, and how the recorder scales. Figures, not tests: every comparison is a
ratio measured within one run, alternating the two sides, reported as min/median/max."""
