"""m3-convert (the package ``m3_convert``, the folder ``convert/``): AutoRound GPTQ MiniMax-M3 -> vLLM's layout.

``from m3_convert import convert`` is the Python API (:mod:`.api`); ``m3-convert`` the command line over it. The
API is imported on first use, so that ``m3_convert.serve`` (the vLLM plugin, imported in every vLLM process) and
``m3_convert.vllm_plugin`` stay light.
"""


def __getattr__(name):
    if name in ("convert", "Result"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'm3_convert' has no attribute {name!r}")
