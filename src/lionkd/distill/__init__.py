"""`lionkd distill`: the task-specific KD pipeline (task data, pseudo-targets, KD training, evaluation) over
the KD engine in `lionkd.kd`, and the export of a distill run's pseudo-targets."""
