"""Pruning: ``magnitude``, ``wanda`` (arXiv 2306.11695) and ``wanda++`` (arXiv 2503.04992); math in
algorithm.py and regional.py, glue in method.py and wanda_pp.py."""
