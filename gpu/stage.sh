#!/usr/bin/env bash
# Stage a vLLM build for the lent GPU machine in as few device calls as possible (run here, on the CPU).
#
#   bash gpu/stage.sh [WHEEL_LIST] [PART_MIB]
#     WHEEL_LIST  pinned wheel list (default gpu/vllm-0.33.0-wheels.txt: vLLM 0.33.0, torch 2.14.0 and what the
#                 torch 2.11.0+cu130 image lacks or holds at an incompatible version; for vLLM 0.26.0 use
#                 gpu/vllm-0.26.0-wheels.txt)
#     PART_MIB    size of one part (default 62 MiB: the staging calls run under `gpu/quiet_tree.sh on`, so nothing of
#                 the checkout travels beside the part; vLLM 0.33's list makes 21 parts. Until 2026-12-08 the default
#                 took the checkout's files off, ~40 MiB, as if they travelled too: 58 parts of 23 MiB)
#
# The wheels travel as they are (zip deflate), in one tar split into .stage/pNN, minus files serving MiniMax-M3 on
# Hopper never loads (STRIP below: vLLM's FlashAttention-2 library, 308 MB unpacked: FA3 serves Hopper; its Rust
# frontend; the SM100-only fmha and DeepGEMM's CPython 3.13/3.14 builds; triton's Blackwell ptxas and its CUPTI
# profiling libraries). Recompressing does not pay: xz -9 takes a 200 MB slice of torch's libtorch_cuda.so to
# 131 MB in 169 s on 2 cores, gzip -6 to 138 MB in 7 s (2026-12-06), and the wheels already hold it deflated.
#
# Device side (each line one `run` call, back to back: the machine goes back 30 s after a call), with
# `bash gpu/quiet_tree.sh on` here around the staging calls (nothing of the checkout, gpu/device.sh included, travels):
#   carry [".stage/pNN"]:  mkdir -p /tmp/stage && cp .stage/pNN /tmp/stage/
#   then `bash gpu/quiet_tree.sh off` and any step of gpu/device.sh, whose `install` joins the parts and unpacks every
#   wheel into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
list=${1:-gpu/vllm-0.33.0-wheels.txt}
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
    --platform manylinux_2_35_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_18_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$cache" "$spec"
done < "$list"
n=$(ls "$cache"/*.whl | wc -l); want=$(grep -c . "$list")
[ "$n" -eq "$want" ] || { echo "have $n wheels for $want lines of $list" >&2; exit 1; }

# wheel name prefix -> paths (zip patterns) left out
STRIP=(
  "vllm-|vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/vllm-rs vllm/third_party/fmha_sm100/* vllm/third_party/deep_gemm/_C.cpython-313* vllm/third_party/deep_gemm/_C.cpython-314*"
  "triton-|triton/backends/nvidia/bin/ptxas-blackwell triton/backends/nvidia/lib/cupti-blackwell/* triton/backends/nvidia/lib/cupti/*_static.a"
)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/wheels"
for w in "$cache"/*.whl; do ln -s "$w" "$work/wheels/"; done
for rule in "${STRIP[@]}"; do
  prefix=${rule%%|*}; paths=${rule#*|}
  for w in "$cache"/$prefix*.whl; do
    [ -e "$w" ] || continue
    rm "$work/wheels/$(basename "$w")"; cp "$w" "$work/wheels/"
    # shellcheck disable=SC2086
    zip -q -d "$work/wheels/$(basename "$w")" $paths || true
  done
done
rm -f .stage/p*
part=$(( ${2:-62} << 20 ))
tar chf - -C "$work" wheels | split -b "$part" -d - .stage/p
echo "$(ls .stage/p* | wc -l) parts of $((part >> 20)) MiB: $(du -shL "$work/wheels" | cut -f1) of wheels"
ls -la .stage
