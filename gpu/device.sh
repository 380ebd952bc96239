#!/usr/bin/env bash
# Device-side steps of the GPU check (issue 8). Each step is one `run` call of the device tool:
#   stage k : carry [".vllm-stage/pk"]       mkdir -p /tmp/stage && cp .vllm-stage/pk /tmp/stage/
#   bash gpu/device.sh install-and-quant     carry [".gpuwork", ".whl"]
#   bash gpu/device.sh refs                  carry [".gpuwork", ".whl"]   (same warm machine)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export VLLM_ENABLE_V1_MULTIPROCESSING=0
OUT=${OUT:-/tmp/out}
RES=/tmp/gpures            # survives between calls while the machine stays warm; copied to $OUT each time
mkdir -p "$OUT" "$RES"
install() {
  if [ ! -d /tmp/site/vllm ]; then
    cat /tmp/stage/p* | tar x -C /tmp || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/vllm-wheels/*.whl || exit 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/m3site . || exit 1
  [ -d /tmp/hfsite/transformers ] || [ ! -d .whl ] || python3 -m pip install -q --no-index --no-deps --target /tmp/hfsite .whl/transformers-5.19.0-*.whl
  python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
}
export PYTHONPATH=/tmp/m3site:/tmp/site
case "$1" in
  install-and-quant)
    install
    python3 -c "import vllm; print('vllm', vllm.__version__)"
    python3 gpu/serve_check.py vllm .gpuwork/quant quant "$RES" 2>&1 | grep -v "^\s*$" | tail -60
    ;;
  install-and-run)   # diagnostic variants: bash gpu/device.sh install-and-run DIR TAG
    install
    python3 gpu/serve_check.py vllm "$2" "$3" "$RES" 2>&1 | grep -v "^\s*$" | tail -40
    ;;
  install-and-vl)    # issue 7: the --keep-vision --keep-mtp output, served text-only by the VL class
    install
    cp gpu/results/quant.json "$RES"/quant.json
    M3_LM_ONLY=1 python3 gpu/serve_check.py vllm .gpuwork/vlmtp vl "$RES" 2>&1 | grep -v "^\s*$" | tail -25
    ;;
  vlmtp)             # the same with speculative decoding by its MTP block (greedy: must equal the plain run)
    M3_LM_ONLY=1 M3_MTP=1 python3 gpu/serve_check.py vllm .gpuwork/vlmtp vlmtp "$RES" 2>&1 | grep -v "^\s*$" | tail -25
    python3 gpu/serve_check.py compare "$RES"
    ;;
  stock)             # issue 7: --target stock-vllm (vLLM's own INC config); on 0.26 this stops at the Marlin MoE
    python3 gpu/serve_check.py vllm .gpuwork/stock4 stock4 "$RES" 2>&1 | grep -v "^\s*$" | tail -25
    ;;
  refs)
    python3 gpu/serve_check.py vllm .gpuwork/bf16 bf16 "$RES" 2>&1 | tail -15
    python3 gpu/serve_check.py vllm .gpuwork/bug bug "$RES" 2>&1 | tail -15
    PYTHONPATH=/tmp/hfsite:/tmp/m3site python3 gpu/serve_check.py hf tests/fixtures/data/gpu_tiny hf "$RES" 2>&1 | tail -15
    PYTHONPATH=/tmp/hfsite:/tmp/m3site python3 gpu/serve_check.py hf tests/fixtures/data/gpu_tiny hf32 "$RES" float32 2>&1 | tail -15
    python3 gpu/serve_check.py compare "$RES"
    ;;
esac
cp "$RES"/*.json "$OUT"/ 2>/dev/null
ls -la "$OUT"
