#!/usr/bin/env bash
# Local preparation for the GPU checks (run here, on the CPU): the vLLM build staged in parts for the device calls.
#   bash gpu/prepare.sh      -> .stage/pNN (gpu/stage.sh: vLLM 0.33.0 + the wheels of gpu/vllm-0.33.0-wheels.txt)
# The fixtures travel with every call (tracked files) and are converted on the device (gpu/device.sh serve).
# gpu/prompts.json and gpu/prompts_gpu_mixed.json are committed (gpu/make_prompts.py made them).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "$(ls .stage/p* 2>/dev/null)" ] || bash gpu/stage.sh
ls -la .stage
