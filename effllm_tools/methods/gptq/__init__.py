"""GPTQ (arXiv 2210.17323): the reusable core in ``algorithm``, the ``gptq`` stage in ``method``."""
