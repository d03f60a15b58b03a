#!/bin/bash
# Builds .gpu/ (git-ignored) for a GPU machine that cannot download: the packages `make gpu-check`
# (benchmarks/gpu_check.sh) needs beyond a Python 3.12 with a CUDA torch, pinned to the versions `make test`
# uses. benchmarks/gpu_check.sh installs from it when it finds it. SimpleITK's wheel (53 MB) is re-packed as
# tar.xz (28 MB, ~4 min of xz -9 here) so that the repository and .gpu/ stay under MAX_MIB (default 64):
#     bash benchmarks/gpu_payload.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
MAX_MIB=${MAX_MIB:-64}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf .gpu && mkdir -p .gpu/wheels
get() { $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$@"; }
# SimpleITK: unpacked, re-compressed (read back with Python's own lzma: no xz program needed there)
get -d "$tmp" SimpleITK==2.5.7
(cd "$tmp" && unzip -q simpleitk-*.whl && tar -cf - SimpleITK simpleitk-*.dist-info) | xz -9 -T2 > .gpu/simpleitk.tar.xz
# nnU-Net v2 as the tests pin it, the augmentation SegBook trains with, and what nnU-Net's predictor imports
# beyond that image; acvl-utils is an sdist, built to a wheel here
get -d .gpu/wheels nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 batchgenerators==0.25.5 \
    batchgeneratorsv2==0.3.6 nibabel==5.4.2 blosc2==4.15.0 ndindex==1.10.1 numexpr==2.14.2
$PY -m pip wheel -q --no-deps -w .gpu/wheels acvl-utils==0.2.6
# what a copy of the repository holds: tracked files and untracked ones git does not ignore, then .gpu/
size=$(( $(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
         + $(du -sb .gpu | cut -f1) ))
echo "payload .gpu: $(du -sh .gpu | cut -f1); with the repository $((size / 1048576)) MiB (limit $MAX_MIB MiB)"
[ "$size" -le $((MAX_MIB * 1048576)) ] || { echo "too large: $((size / 1048576)) MiB > $MAX_MIB MiB" >&2; exit 1; }
