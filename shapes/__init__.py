"""The shapes benchmark, a user of the engine: procedural scenes with exact captions, a small Meissonic
trained on them (``shapes-meissonic``), a GenEval-style scorer (``shapes``) and their training.

It imports ``mgt`` and ``actors``; nothing there imports it. The engine finds its model, its scorer and
its ``maskray train-shapes`` command through the entry points in ``pyproject.toml`` (see
``shapes.registration``). This package imports nothing itself, so ``import shapes`` stays free of torch.
"""
