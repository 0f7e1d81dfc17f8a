"""What users run: the ``maskray`` CLI and its jobs (generate, evaluate, serve, submit)."""
