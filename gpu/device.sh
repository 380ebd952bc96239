#!/usr/bin/env bash
# Device-side steps of the GPU checks. Each step is one `run` call of the device tool, back to back on one warm
# machine (it goes back 30 s after a call). Staging first (gpu/stage.sh made .stage/pNN here), each part its own call
# under `bash gpu/quiet_tree.sh on` here, so that a 62 MiB part travels alone (this script does not travel then):
#   carry [".stage/pNN"], command `mkdir -p /tmp/stage && cp .stage/pNN /tmp/stage/`; then `quiet_tree.sh off`
#   install                 unpack it to /tmp/site (once per machine), install this package, check humming
#   kernels                 gpu/kernel_check.py: every width's kernel vs the exact decode at M3 shapes (issue 15)
#   serve [RUN ...]         gpu/serve_check.py vLLM runs, each in its own process (fixtures converted here, on
#                           the device); RUN: tiny mixed mixed-promoted mixed-bf16 mixed-bug (default: these),
#                           mixed-wmix (the mixed MoE layers on the wmix kernels, M3_MOE_KERNEL=wmix: issue 25),
#                           mixed-hgemv (humming's parts, decode by hgemv over them, M3_MOE_KERNEL=hgemv, served one
#                           sequence at a time so that decode steps take hgemv's path: issue 25),
#                           tiny-promoted tiny-bf16 tiny-bug (issue 8's pair), vl vlmtp (--keep-vision --keep-mtp
#                           output served text-only, with/without MTP) stock4 (--target stock-vllm: vLLM alone,
#                           the package off the path)
#   image                   gpu/image_check.py: the --keep-vision output served with an image vs transformers'
#                           float32 reference (gpu/image_ref.json, made on a CPU) and a planted vision bug (issue 24)
#   speed [ARGS]            bench/serve_bench.py: native vs promoted vs bf16 at the real M3 widths (issue 15)
#   compare                 the comparison table of everything under /tmp/gpures (and gpu/results)
#   jit                     the kernels compiled so far as $OUT/jit.tgz.NN (joined here as .stage/jit.tgz and staged;
#                           `install` unpacks it)
#   wmixdiag PHASE ...      gpu/wmix_diag.py (rows, unrouted, graph): the wmix failures seen inside vLLM, outside it
#   hlayout                 gpu/humming_layout.py --gpu: humming's MoE weight layout read back, and hgemv over it (issue 25)
# kernels and speed print each result as it ends and stop after M3_STEP_S seconds (default 560), so that a call's
# finished results come back (gpures.tgz) before the call's own limit: set M3_STEP_S below the call's timeout.
# The transformers reference of issue 8 (serve_check.py hf) needs transformers 5.19 carried (gpu/README.md).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export VLLM_ENABLE_V1_MULTIPROCESSING=0
# torch 2.14 was built against cuDNN 9.24; the image's 9.19 is what loads (gpu/stage.sh leaves cuDNN out): its
# Python-side version check would refuse it, and M3 on Hopper calls no cuDNN kernel
export PYTORCH_SKIP_CUDNN_COMPATIBILITY_CHECK=1
OUT=${OUT:-/tmp/out}
RES=/tmp/gpures            # survives between calls while the machine stays warm; copied to $OUT each time
W=/tmp/m3work
mkdir -p "$OUT" "$RES" "$W"
# the CuTe DSL package sits where nvidia_cutlass_dsl's .pth would put it (a .pth on PYTHONPATH is not read)
SITE=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
# torchvision 0.29.0 (vLLM 0.33's pin) is staged: the image's, built for its torch 2.11, fails to import beside 2.14
# ("operator torchvision::nms does not exist"), and vLLM 0.33's serving path imports torchvision.transforms.v2
export PYTHONPATH=/tmp/m3site:$SITE
# the kernels compiled on this machine (humming's JIT cubins and launchers, Triton's) in one folder: `jit` brings it
# back and a later machine starts from it (gpu/README.md, "Compiled kernels carried"); both caches are keyed by the
# kernel's source, flags and compiler version, so a carried entry is used only for the same kernel
export HUMMING_CACHE_DIR=/tmp/jit/humming TRITON_CACHE_DIR=/tmp/jit/triton
# everything measured so far on this machine, as one file ($OUT brings back at most 8)
back() { tar czf "$OUT/gpures.tgz" -C "$RES" . 2>/dev/null; echo "back: gpures.tgz $(tar tzf "$OUT/gpures.tgz" | grep -c json) json files"; }
step=$1; shift
case "$step" in
  install)
    if [ ! -d /tmp/site/vllm ]; then
      t=$(date +%s)
      mkdir -p /tmp/site /tmp/wheels
      cat /tmp/stage/p* | tar x -C /tmp || exit 1
      # every wheel unpacked into one site tree, 16 at a time, file modes kept (triton's ptxas must stay executable;
      # the image has no unzip)
      python3 - <<'PY' || exit 1
import glob, os, zipfile
from concurrent.futures import ProcessPoolExecutor
def unpack(w):
    with zipfile.ZipFile(w) as z:
        for i in z.infolist():
            p = z.extract(i, "/tmp/site")
            mode = i.external_attr >> 16
            if mode & 0o111:
                os.chmod(p, mode & 0o777)
with ProcessPoolExecutor(16) as ex:
    list(ex.map(unpack, sorted(glob.glob("/tmp/wheels/*.whl"), key=os.path.getsize, reverse=True)))
PY
      echo "unpacked $(ls /tmp/wheels/*.whl | wc -l) wheels in $(( $(date +%s) - t )) s: $(du -sh /tmp/site | cut -f1)"
      # humming's cache key holds its headers' paths and mtimes (humming/jit/compiler.py, cuh_last_update_time);
      # unpacking stamps the time of the unpacking: one fixed time gives every machine the same keys
      find /tmp/site/humming/include -type f -exec touch -d @946684800 {} + || exit 1
    fi
    if [ -f /tmp/stage/jit.tgz ] && [ ! -d /tmp/jit ]; then   # staged from an earlier machine's `jit`
      tar xzf /tmp/stage/jit.tgz -C /tmp && echo "jit cache carried: $(find /tmp/jit/humming -name '*.cubin' | wc -l) humming cubins, $(find /tmp/jit/triton -name '*.cubin' | wc -l) Triton's, $(du -sh /tmp/jit | cut -f1)"
    fi
    rm -rf /tmp/m3site
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/m3site . || exit 1
    python3 -c "import torch, vllm, humming; print('torch', torch.__version__, torch.cuda.get_device_name(0), '| vllm', vllm.__version__, '| humming', humming.__version__)"
    python3 -c "from m3_convert.serve import compat; print('humming problem:', compat.humming_problem(), '| vllm problem:', compat.vllm_version_problem())"
    nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.mem --format=csv
    ;;
  kernels)   # lines as they come (no tail: a call cut at its limit still returns what ran)
    timeout "${M3_STEP_S:-560}" python3 gpu/kernel_check.py "$RES/kernels.json" "$@" 2>&1 | grep --line-buffered -v "^\s*$" | grep --line-buffered -v "Warning\|warn("
    ;;
  serve)
    conv() { [ -d "$W/$2" ] || python3 -m m3_convert.cli "tests/fixtures/data/$1" "$W/$2" --quiet || exit 1; }
    conv gpu_tiny tiny
    conv gpu_mixed mixed
    [ -d "$W/mixed-bf16" ] || python3 gpu/dequant_bf16.py "$W/mixed" "$W/mixed-bf16" > /dev/null
    if [ ! -d "$W/mixed-bug" ]; then   # control: one 3-bit expert's signed scales made positive (MoE path)
      cp -r "$W/mixed" "$W/mixed-bug" && python3 gpu/plant_bug.py "$W/mixed-bug" model.layers.3.block_sparse_moe.experts.2.w2.scales
    fi
    [ -d "$W/tiny-bf16" ] || python3 gpu/dequant_bf16.py "$W/tiny" "$W/tiny-bf16" > /dev/null
    if [ ! -d "$W/tiny-bug" ]; then    # issue 8's control: L0 o_proj's signed scales made positive
      cp -r "$W/tiny" "$W/tiny-bug" && python3 gpu/plant_bug.py "$W/tiny-bug" model.layers.0.self_attn.o_proj.scales
    fi
    [ -d "$W/vl" ] || python3 -m m3_convert.cli tests/fixtures/data/gpu_tiny "$W/vl" --keep-vision --keep-mtp --quiet
    [ -d "$W/stock4" ] || python3 -m m3_convert.cli tests/fixtures/data/gpu_tiny "$W/stock4" --target stock-vllm --stock-min-bits 4 --quiet
    for run in "${@:-tiny mixed mixed-promoted mixed-bf16 mixed-bug}"; do
      for r in $run; do
        t=$(date +%s)
        case "$r" in
          tiny) python3 gpu/serve_check.py vllm "$W/tiny" native "$RES" ;;
          tiny-promoted) M3_GPTQ_KERNELS=promote python3 gpu/serve_check.py vllm "$W/tiny" quant "$RES" ;;
          tiny-bf16) python3 gpu/serve_check.py vllm "$W/tiny-bf16" bf16 "$RES" ;;
          tiny-bug) python3 gpu/serve_check.py vllm "$W/tiny-bug" bug "$RES" ;;
          vl) M3_LM_ONLY=1 python3 gpu/serve_check.py vllm "$W/vl" vl "$RES" ;;
          vlmtp) M3_LM_ONLY=1 M3_MTP=1 python3 gpu/serve_check.py vllm "$W/vl" vlmtp "$RES" ;;
          stock4) PYTHONPATH=$SITE M3_NO_PLUGIN=1 python3 gpu/serve_check.py vllm "$W/stock4" stock4 "$RES" ;;
          mixed-wmix) M3_MOE_KERNEL=wmix M3_PROMPTS=prompts_gpu_mixed.json python3 gpu/serve_check.py vllm "$W/mixed" mixed_wmix "$RES" ;;
          mixed-hgemv) M3_MOE_KERNEL=hgemv M3_MAX_SEQS=1 M3_PROMPTS=prompts_gpu_mixed.json python3 gpu/serve_check.py vllm "$W/mixed" mixed_hgemv "$RES" ;;
          mixed-promoted) M3_GPTQ_KERNELS=promote M3_PROMPTS=prompts_gpu_mixed.json python3 gpu/serve_check.py vllm "$W/mixed" mixed_promoted "$RES" ;;
          mixed*) M3_PROMPTS=prompts_gpu_mixed.json python3 gpu/serve_check.py vllm "$W/$r" "${r//-/_}" "$RES" ;;
        esac 2>&1 | grep -v "^\s*$" | grep -E "^(native|mixed|quant|bf16|bug|vl|stock)|loaded in|per-layer|MoE layers|GPU bytes|Error|error|Traceback|assert" | cut -c1-2000 | tail -12
        echo "== $r: $(( $(date +%s) - t )) s"
        back   # each run's result comes back even if a later one runs past the call's limit
      done
    done
    ;;
  image)   # issue 24 item 4: the --keep-vision output served with an image vs transformers (gpu/image_ref.json)
    python3 gpu/image_check.py all "$RES" "$W" 2>&1 | grep -v "^\s*$" | grep -E "^(vlimg|bug:|== )|Error|error|Traceback|assert" | cut -c1-2000 | tail -20
    back; exit 0
    ;;
  speed)     # one line per arm as it ends; M3_STEP_S (s) stops it in time for `back` to bring the finished arms
    timeout "${M3_STEP_S:-560}" python3 bench/serve_bench.py "$RES/speed" "$@" 2>&1 | grep --line-buffered -v "^\s*$"
    ;;
  jit)       # the compiled kernels as $OUT/jit.tgz.NN (15 MiB pieces: a file over 16 MiB does not come back); here
             # `cat jit.tgz.* > .stage/jit.tgz`, staged as one file with the parts
    tar czf /tmp/jit.tgz -C /tmp jit && split -b 15M -d /tmp/jit.tgz "$OUT/jit.tgz." || exit 1
    echo "jit.tgz $(du -h /tmp/jit.tgz | cut -f1) in $(ls "$OUT"/jit.tgz.* | wc -l) pieces, sha256 $(sha256sum /tmp/jit.tgz | cut -c1-16): $(find /tmp/jit/humming -name '*.cubin' | wc -l) humming cubins, $(find /tmp/jit/triton -name '*.cubin' | wc -l) Triton's"
    exit 0 ;;
  wmixdiag)  # gpu/wmix_diag.py: the phases named (rows, unrouted, graph), each in its own process (a fault ends one)
    for ph in "$@"; do
      timeout 240 python3 gpu/wmix_diag.py "$RES/wmix_diag_$ph.json" "$ph" 2>&1 | grep --line-buffered -v "^\s*$" | grep --line-buffered -v "UserWarning\|warn(" | cut -c1-600
    done
    ;;
  hlayout)   # gpu/humming_layout.py: humming's repack (as the plugin calls it) read back by our decoder (issue 25)
    timeout 300 python3 gpu/humming_layout.py --gpu "$RES/humming_layout.json" 2>&1 | grep --line-buffered -v "UserWarning\|warn("
    ;;
  compare)
    python3 gpu/serve_check.py compare "$RES"
    ;;
esac
back
