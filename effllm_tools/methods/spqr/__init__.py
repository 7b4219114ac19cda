"""SpQR (arXiv 2306.03078): grids in ``stats``, the GPTQ-based algorithm in ``algorithm``, the stored
``spqr`` format in ``format``, the ``spqr`` stage in ``method``."""
