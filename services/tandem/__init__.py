"""Tandem's shared library: wire contracts, tensor codec, TLS, metrics, models, data."""

__version__ = "0.1.0"
