"""Serving m3-convert checkpoints with vLLM: the ``m3_gptq`` quantization plugin.

* :mod:`.decide`: pure decisions (no vLLM): bits per layer, kernel per layer, expert parts, kernel-shape
  rules, GPU bytes. Read by the planner (``--dry-run``), m3-verify and the plugin.
* :mod:`.routing`: the QuantizationConfig vLLM builds, prefix routing, the platform's methods.
* :mod:`.linear`, :mod:`.moe`: methods (parameters + loaders) and GPU kernels.
* :mod:`.compat`: every vLLM / humming-kernels version difference.

The entry point users load is unchanged: ``m3_convert.vllm_plugin:register``.
"""
