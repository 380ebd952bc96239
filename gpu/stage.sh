#!/usr/bin/env bash
# Stage a vLLM build for the lent GPU machine in as few device calls as possible (run here, on the CPU).
#
#   bash gpu/stage.sh [WHEEL_LIST] [PART_MIB]
#     WHEEL_LIST  pinned wheel list (default ../shared/gpu/vllm-0.26.0-wheels.txt: vLLM 0.26.0 + the 53 wheels the
#                 torch 2.11.0+cu130 image lacks; humming-kernels 0.1.10 and pyelftools among them)
#     PART_MIB    size of one part (default: 62 MiB minus what travels with every call: the tracked and untracked
#                 files of the checkout; a staging call carries nothing else)
#
# Every wheel is unpacked into one site tree (what `pip install --no-deps --target` makes: packages + their
# dist-info, entry points included), minus what serving MiniMax-M3 on an H200 never loads: vLLM's FlashAttention-2
# library (305 MB; FA3 serves Hopper: v1/attention/backends/fa_utils.py), its Rust frontend binary and the
# CPython 3.13/3.14 builds of DeepGEMM. The tree is compressed with xz -9 (the wheels' zip deflate leaves the
# CUDA fat binaries ~2.6x larger) and split into .stage/pNN. Measured for vLLM 0.26.0: 344 MB of wheels ->
# ~150 MB staged.
#
# Device side (each line one `run` call, back to back: the machine goes back 30 s after a call):
#   carry [".stage/pNN"]:  bash gpu/device.sh stage NN          (copies the part to /tmp/stage)
#   then any step of gpu/device.sh, whose `install` joins the parts and unpacks them into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
list=${1:-../shared/gpu/vllm-0.26.0-wheels.txt}
cache=${VLLM_WHEEL_CACHE:-$HOME/.cache/vllm-gpu-wheels}/$(basename "$list" .txt)
mkdir -p "$cache" .stage
grep -qx '/.stage/' .git/info/exclude 2>/dev/null || printf '/.stage/\n' >> .git/info/exclude
while read -r spec; do
  [ -n "$spec" ] || continue
  name=${spec%%==*}; ver=${spec##*==}
  ls "$cache" | grep -qi "^${name//[-_]/[-_]}-${ver}-" && continue
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_5_x86_64 \
    --platform manylinux1_x86_64 -d "$cache" "$spec"
done < "$list"
n=$(ls "$cache"/*.whl | wc -l); want=$(grep -c . "$list")
[ "$n" -eq "$want" ] || { echo "have $n wheels for $want lines of $list" >&2; exit 1; }
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
for w in "$cache"/*.whl; do unzip -q -o "$w" -d "$tree"; done
rm -f "$tree"/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so "$tree"/vllm/vllm-rs "$tree"/vllm/third_party/deep_gemm/_C.cpython-31[34]-*.so
rm -f .stage/p* .stage/site.tar.xz
(cd "$tree" && tar cf - .) | xz -9 -T0 > .stage/site.tar.xz
if [ -z "${2:-}" ]; then
  carried=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s}')
  part=$(( (62 << 20) - carried ))
else
  part=$(( $2 << 20 ))
fi
split -b "$part" -d .stage/site.tar.xz .stage/p
rm .stage/site.tar.xz
echo "$(ls .stage/p* | wc -l) parts of $((part >> 20)) MiB"
ls -la .stage
