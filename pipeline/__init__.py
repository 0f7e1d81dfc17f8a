"""The Ray Data dataflow of ``maskray generate``: prompt shards -> generator pool -> scorer pool -> sinks.

Import the submodules directly (``pipeline.generate``, ``pipeline.prompts`` ...); this package imports
nothing, so reading a config does not start Ray.
"""
