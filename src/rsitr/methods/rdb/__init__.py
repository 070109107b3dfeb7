"""RDB (arXiv 2505.16756) as ``method.name: rdb``: see :mod:`rsitr.methods.rdb.method`."""
from rsitr.methods.rdb.method import (
    RDB,
    TERMS,
    RDBOptions,
    _block_width,
    _wanted,
    classification_loss,
    consistency_kl,
    find_slots,
    fixed_weighting,
    resolve_layers,
    uncertainty_weighting,
)

__all__ = ["RDB", "RDBOptions", "TERMS", "classification_loss", "consistency_kl", "find_slots", "fixed_weighting", "resolve_layers",
           "uncertainty_weighting"]
