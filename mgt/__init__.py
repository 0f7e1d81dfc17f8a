"""The maskray engine: masked generative transformers in pure PyTorch (no Ray here).

Public entry points: :func:`load_pipeline`, :func:`load_transformer`, :class:`SamplerConfig`. Names are
imported lazily (PEP 562) so that reading a config model does not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "GenerationOutput": "mgt.pipeline",
    "MGTPipeline": "mgt.pipeline",
    "load_pipeline": "mgt.pipeline",
    "load_transformer": "mgt.pipeline",
    "SamplerConfig": "mgt.sampling.sampler_config",
    "ModelConfig": "mgt.config",
    "GenerationSettings": "mgt.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mgt' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
