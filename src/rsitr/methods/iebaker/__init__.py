"""iEBAKER (Zhang et al., arXiv 2504.05644): Eliminate Before Align, Keyword Explicit Reasoning,
and Sort After Reversed retrieval, as ``method.name: iebaker``. Each part is switched on alone
(``eba``, ``ker``, ``sar``); with all three off the method is the baseline (symmetric InfoNCE on
the pooled embeddings with the learnable temperature).

One module per part of the paper:

* :mod:`~rsitr.methods.iebaker.eba` - EBA, Eliminate Before Align (``eba: true``): the pairs'
  scores, the criteria, the joint / separate schemes, the guard, when it runs;
* :mod:`~rsitr.methods.iebaker.local` - the local (token-level) similarity (``local: true``);
* :mod:`~rsitr.methods.iebaker.ker` - KER, Keyword Explicit Reasoning (``ker: true``): keyword
  vocabulary, swapped-keyword negatives, the mask objective;
* :mod:`~rsitr.methods.iebaker.sar` - SAR, Sort After Reversed retrieval (``sar: true``);
* :mod:`~rsitr.methods.iebaker.method` - the options and the method putting them together.
"""
from rsitr.losses.iebaker import masked_info_nce
from rsitr.methods.iebaker.eba import CRITERIA, eliminate
from rsitr.methods.iebaker.local import local_similarity, local_similarity_matrix
from rsitr.methods.iebaker.method import IEBAKER, IEBAKEROptions

__all__ = ["CRITERIA", "IEBAKER", "IEBAKEROptions", "eliminate", "local_similarity", "local_similarity_matrix", "masked_info_nce"]
