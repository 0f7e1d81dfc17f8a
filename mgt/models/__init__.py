"""Model families: each family's transformer, how its checkpoints are recognised, its defaults, its conditioning
and its tiny random model; ``families.py`` is the table that names them."""
