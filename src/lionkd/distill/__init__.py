"""`lionkd distill`: the task-specific KD pipeline (pseudo-targets, KD training, evaluation), a pipeline
over the KD engine in `lionkd.kd`."""
