"""Image scorers: the contract and shared helpers (``base``), the registry and ``ScorerConfig``
(``registry``), and the built-in scorers (``hps``, ``clip_score``).

Imports point one way: the scorers import ``base``; ``registry`` names the scorers by module path and
imports them only when one is built. Import the submodules directly; this package imports nothing.
"""
