"""Evaluation (`lionkd eval`): task metrics, the Lion judge evaluation, size and speed, lm-evaluation-harness
benchmarks, and the evaluation stages of `lionkd distill`. Run reports are `lionkd.report`."""
