"""Bodies of the Ray Data stages that need a model: the image scorers.

Import the submodules directly (``actors.scorer``, ``actors.hps``, ``actors.clip_score``). This package
imports nothing itself, so ``import actors`` stays free of torch.
"""
