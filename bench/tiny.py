"""The tiny random model every benchmark offers as ``--model tiny``: seconds, for CI smoke runs."""

from cqil.testing import build_tiny

__all__ = ["build_tiny"]
