"""Training the ``shapes-meissonic`` model and the ``shapes`` scorer on procedural scenes (``shapes.scenes``).

``vq`` trains the diffusers ``VQModel`` image tokenizer, ``generator`` the Meissonic transformer with its
CLIP text encoder (the Meissonic objective), ``detector`` the scene detector behind the ``shapes`` scorer,
and ``shapes`` runs them in order and writes the hub layout. Nothing here is imported by inference.
"""
