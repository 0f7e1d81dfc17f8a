"""Sampler evaluation: paired statistics against a baseline and the report built from them."""
