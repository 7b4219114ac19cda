"""Pruning: ``magnitude`` and ``wanda`` (arXiv 2306.11695); math in algorithm.py, glue in method.py."""
