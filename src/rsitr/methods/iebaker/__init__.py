"""iEBAKER (arXiv 2504.05644) as ``method.name: iebaker``: see :mod:`rsitr.methods.iebaker.method`."""
from rsitr.methods.iebaker.method import (
    CRITERIA,
    IEBAKER,
    IEBAKEROptions,
    eliminate,
    local_similarity,
    local_similarity_matrix,
    masked_info_nce,
)

__all__ = ["CRITERIA", "IEBAKER", "IEBAKEROptions", "eliminate", "local_similarity", "local_similarity_matrix", "masked_info_nce"]
