"""The model families' transformers and VQ models."""
