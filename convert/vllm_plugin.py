"""The ``vllm.general_plugins`` entry point of this package (``m3_convert.vllm_plugin:register``).

``register()`` runs in every vLLM process: it is idempotent, imports nothing heavy at module import, and does
nothing when vLLM is absent. The plugin itself is the package :mod:`m3_convert.serve`.
"""
from __future__ import annotations

from .serve.routing import CHOICES, QUANT_METHOD, register  # noqa: F401

__all__ = ["register", "QUANT_METHOD", "CHOICES"]
