"""RDB -- Representation Discrepancy Bridging (Ning et al., Neurocomputing 2025, arXiv 2505.16756),
as ``method.name: rdb``: a frozen dual encoder fine-tuned with the Cross-Modal Asymmetric Adapter
(VEA in the image tower, TSA in the text tower) and the Dual-Task Consistency Loss.

* :mod:`~rsitr.methods.rdb.method` - the options (documented there) and the method, with DTCL;
* :mod:`~rsitr.methods.rdb.cmaa` - which blocks get an adapter and where the adapters go;
* :mod:`~rsitr.methods.rdb.teacher` - the EMA teacher (or the embedding bank) of DTCL's
  consistency term.

The adapters themselves (differential and hierarchical attention) are :mod:`rsitr.methods.adapters`;
DTCL's terms are pure functions in :mod:`rsitr.losses.dtcl`.
"""
from rsitr.losses.dtcl import classification_loss, consistency_kl, fixed_weighting, uncertainty_weighting
from rsitr.methods.rdb.cmaa import _wanted, resolve_layers
from rsitr.methods.rdb.method import RDB, TERMS, RDBOptions

__all__ = ["RDB", "RDBOptions", "TERMS", "classification_loss", "consistency_kl", "fixed_weighting", "resolve_layers",
           "uncertainty_weighting", "_wanted"]  # the last: rsitr.methods.peft uses it
