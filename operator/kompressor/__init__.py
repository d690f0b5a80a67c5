"""Kompressor: a Kubernetes operator for continuous model compression and drift control."""

__version__ = "0.1.0"
