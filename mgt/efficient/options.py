"""The efficient-inference options of ``load_pipeline``/``load_transformer`` (arXiv 2411.10781 §4).

``quant`` is None, a preset name (quantized while loading; A8 presets calibrate on the model's own
generations of ``DEFAULT_CALIBRATION_PROMPTS``) or the path/URI of a checkpoint written by
``maskray quantize`` (loaded directly, never materialising the full-precision transformer).
``tome`` is TomeMGT's merge ratio rho (0 = off). optimum-quanto is imported only when ``quant`` is set.
``compile`` runs ``torch.compile`` on the transformer's repeated blocks (:func:`apply_compile`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mgt.efficient.quant_config import PRESETS
from mgt.hub import loading


def needs_pipeline(quant: str | None) -> bool:
    """True for presets whose calibration generates data with the whole pipeline (the A8 presets)."""
    return quant in PRESETS and PRESETS[quant].calibrate


def load_transformer(cls: type, model_dir: Path, dtype: torch.dtype, device: torch.device, variant: str | None,
                     quant: str | None, cache_dir: str | None = None) -> torch.nn.Module:
    """The transformer of ``model_dir``: full precision, quantized with a weight-only preset, or a checkpoint.

    A8 presets come back in full precision: :func:`calibrate_pipeline` quantizes them once the text
    encoder is loaded.
    """
    if quant is None or quant in PRESETS:
        transformer = loading.load_component(cls, model_dir / "transformer", dtype, device, variant)
        if quant is not None and not needs_pipeline(quant):
            from optimum.quanto import freeze

            from mgt.efficient.quantization import quantize_transformer

            freeze(quantize_transformer(transformer, quant))
        return transformer
    from mgt.efficient.quantized_checkpoint import load_quantized

    expected = loading.read_config(model_dir / "transformer")
    transformer = load_quantized(quant, dtype, device, cache_dir, expected_config=expected)
    if not isinstance(transformer, cls):
        raise loading.ModelLoadError(f"quantized checkpoint {quant} holds a {type(transformer).__name__} but "
                                     f"{model_dir} needs a {cls.__name__}")
    return transformer


def calibrate_pipeline(pipe, quant: str | None) -> None:
    """Quantize and calibrate ``pipe.transformer`` in place for an A8 preset (no-op otherwise)."""
    if needs_pipeline(quant):
        from mgt.efficient.scq import quantize_pipeline

        quantize_pipeline(pipe, quant)


def apply_tome(transformer: torch.nn.Module, tome: float, tome_reuse: int = 5) -> torch.nn.Module:
    """Patch TomeMGT into ``transformer``'s dual-stream blocks when ``tome`` > 0."""
    if tome:
        from mgt.efficient.tome import TomeMGT

        TomeMGT(tome, tome_reuse).apply(transformer)
    return transformer


def compile_mode(device: torch.device) -> str:
    """The ``torch.compile`` mode for ``device``.

    CUDA: ``max-autotune-no-cudagraphs``. Inductor fuses each block's chain of small ops (AdaLN modulation,
    RMSNorm, RoPE, GELU, gates: dozens of kernel launches per block in eager mode) and autotunes the
    GEMMs with Triton templates whose epilogues take the bias and activation. CUDA graphs
    (``reduce-overhead``) would remove the remaining launch cost but record one graph with its own static
    memory pool per input shape, i.e. per batch size under whole-batch forwards and Serve batching, and
    they cannot span TomeMGT's host-side merge plans; ``tests/benchmarks/gpu.py --compile-mode
    reduce-overhead`` measures them. CPU and others: ``default`` (there are no CUDA graphs, and
    max-autotune's C++ GEMM templates only lengthen the compilation).
    """
    return "max-autotune-no-cudagraphs" if device.type == "cuda" else "default"


def apply_compile(transformer: torch.nn.Module, mode: str | None = None) -> list[str]:
    """``torch.compile`` each repeated block of ``transformer`` in place; returns the compiled blocks' names.

    Regional compilation, as diffusers' ``ModelMixin.compile_repeated_blocks``: the blocks of one class
    share their compiled code, so compiling costs one trace per block class (not one trace of all 42
    Meissonic blocks) and the module keeps its type, attributes and hooks. Embeddings, convolutions and
    the output layer run eagerly. Blocks whose ``forward`` was patched by TomeMGT stay eager: their
    merge plan is drawn on the host from the step value, which would recompile them at every step.

    Args:
        mode: a ``torch.compile`` mode; None picks :func:`compile_mode` for the transformer's device.
    """
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    mode = mode or compile_mode(next(transformer.parameters()).device)
    blocks = (FluxTransformerBlock, FluxSingleTransformerBlock, BasicTransformerBlock)
    compiled = []
    for name, module in transformer.named_modules():
        if isinstance(module, blocks) and "forward" not in vars(module):  # an instance forward is TomeMGT's
            module.compile(mode=mode)
            compiled.append(name)
    if not compiled:
        raise ValueError(f"{type(transformer).__name__} has no block to compile (Flux or BasicTransformerBlock "
                         "left unpatched by TomeMGT); load it without compile")
    return compiled
