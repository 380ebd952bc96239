#!/usr/bin/env bash
# Local preparation for the GPU check (issue 8), run here (CPU), before the device calls.
#   bash gpu/prepare.sh            -> .gpuwork/{quant,bf16,bug} from tests/fixtures/data/gpu_tiny
#                                     .vllm-stage/p00.. (vLLM 0.26.0 + 53 wheels, ../shared/gpu recipe)
#                                     .whl/transformers-5.19.0 (for the transformers reference)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SRC=tests/fixtures/data/gpu_tiny
grep -qx '/.gpuwork/' .git/info/exclude || printf '/.gpuwork/\n/.vllm-stage/\n/.whl/\n' >> .git/info/exclude
rm -rf .gpuwork && mkdir -p .gpuwork
$PY -m m3_convert.cli "$SRC" .gpuwork/quant --quiet
$PY -m m3_verify.cli .gpuwork/quant --against "$SRC" --quiet
$PY -m m3_convert.cli "$SRC" .gpuwork/vlmtp --keep-vision --keep-mtp --quiet     # issue 7: VL class + MTP
$PY -m m3_convert.cli "$SRC" .gpuwork/stock4 --target stock-vllm --stock-min-bits 4 --quiet   # issue 7: no plugin
$PY gpu/dequant_bf16.py .gpuwork/quant .gpuwork/bf16
# planted bug: one module's signed scales made positive (abs), the mistake a careless loader makes
cp -r .gpuwork/quant .gpuwork/bug
$PY gpu/plant_bug.py .gpuwork/bug model.layers.0.self_attn.o_proj.scales
[ -d .vllm-stage ] || bash ../shared/gpu/prepare_vllm_bundle.sh
[ -f .whl/transformers-5.19.0-py3-none-any.whl ] || python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .whl transformers==5.19.0
du -sh .gpuwork .vllm-stage .whl
