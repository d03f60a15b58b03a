#!/bin/bash
# Builds .gpu/ (git-ignored): what a session lent the GPU machine carries there (`run` with carry [".gpu"],
# command `bash benchmarks/gpu_session.sh`). That machine's image has Python 3.12 and a CUDA torch but no
# SimpleITK, nnU-Net v2 or the packages nnU-Net's predictor imports, and nothing can be downloaded there;
# what travels (tracked files + carried folders) is limited to 64 MiB. SimpleITK's wheel (53 MB) does not fit
# beside the repo's 23 MB, its contents as tar.xz (28 MB) do. Run here, with access to the package index:
#     bash benchmarks/gpu_payload.sh            # ~4 min (xz -9 of SimpleITK)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf .gpu && mkdir -p .gpu/wheels
get() { $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$@"; }
# SimpleITK: unpacked, re-compressed
get -d "$tmp" SimpleITK==2.5.*
(cd "$tmp" && unzip -q simpleitk-*.whl && tar -cf - SimpleITK simpleitk-*.dist-info) | xz -9 -T2 > .gpu/simpleitk.tar.xz
# nnU-Net v2 as the tests pin it, the augmentation SegBook trains with, and what nnU-Net's predictor imports
# beyond that image (nibabel, blosc2 with ndindex and numexpr); acvl-utils is an sdist, built to a wheel here
get -d .gpu/wheels nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 batchgenerators batchgeneratorsv2 \
    nibabel blosc2 ndindex numexpr
$PY -m pip wheel -q --no-deps -w .gpu/wheels acvl-utils==0.2.6
size=$(( $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) + $(du -sb .gpu | cut -f1) ))
echo "payload .gpu: $(du -sh .gpu | cut -f1); with the tracked files $((size / 1048576)) MiB of the 64 MiB that travel"
[ "$size" -le $((64 * 1048576)) ] || { echo "too large to travel" >&2; exit 1; }
