"""Bodies of the Ray Data stages that need a model: the generator and the image scorers.

Import the submodules directly (``actors.generator``, ``actors.scoring_stage``, ``actors.scoring.registry``,
``actors.scoring.hps`` ...). This package imports nothing itself, so ``import actors`` stays free of torch.
"""
