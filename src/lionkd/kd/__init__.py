"""The KD engine: losses, data collation, the trainer, pruning, pseudo-targets, Joint-Teaching.

Entry points: `lionkd.kd.train.train_student`, `lionkd.kd.prune.prune_layers`,
`lionkd.kd.pseudo_targets.generate_pseudo_targets`, and the losses in `lionkd.kd.losses`.
"""

from .losses import (
    DivergenceSpec,
    ce_loss,
    divergence_rows,
    fused_ce_loss,
    fused_kd_loss,
    kd_loss,
    relation_kl_loss,
    sparse_kd_loss,
)

__all__ = [
    "DivergenceSpec",
    "ce_loss",
    "divergence_rows",
    "fused_ce_loss",
    "fused_kd_loss",
    "kd_loss",
    "relation_kl_loss",
    "sparse_kd_loss",
]
