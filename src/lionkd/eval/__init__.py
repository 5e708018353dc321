"""Evaluation and reports: task metrics, the Lion judge evaluation, size and speed,
lm-evaluation-harness benchmarks (`lionkd eval`), and run reports (`lionkd report`)."""
