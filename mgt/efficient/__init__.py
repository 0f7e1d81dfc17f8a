"""Efficient inference (arXiv 2411.10781 §4): quantization presets and SCQ calibration, quantized checkpoints,
TomeMGT token merging, and ``options.py``, which applies them (and ``torch.compile``) while a model loads."""
