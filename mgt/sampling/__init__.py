"""Sampling: the loop (``loop.py``), its mask schedules, ``SamplerConfig`` and one module per technique of
arXiv 2411.10781 (noise regularization, differential sampling, masked Z-Sampling)."""
