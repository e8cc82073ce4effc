"""Thin Python client for EDJE on Triton (needs tritonclient, numpy and Pillow; never torch)."""

__version__ = "0.1.0"
