#!/bin/bash
# Runs on the GPU machine (device `run`, carry [".gpu"] built by benchmarks/gpu_payload.sh), in this order so
# that the cheapest, most important check comes first: the card, the CUDA tests, then the GPU benchmark
# (STU-Net-B, mirror TTA, a 512x512x300 CT, segbook fp16 vs nnU-Net v2 on the same GPU). Everything it prints
# and the benchmark's JSON go to $OUT (default /tmp/gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
# DEVICE=cpu CASE="96 96 48" BENCH="--size S" check this script on a machine without a GPU
DEVICE=${DEVICE:-cuda}
CASE=${CASE:-512 512 300}
BENCH=${BENCH:---size B --tta}
PY=${PY:-python3}
SITE=/tmp/segbook_site
mkdir -p "$OUT" "$SITE"
tar -xJf .gpu/simpleitk.tar.xz -C "$SITE"
$PY -m pip install -q --no-index --no-deps --target "$SITE" .gpu/wheels/*.whl
export PYTHONPATH="$SITE:$PWD/SegBookCore" PYTHONUNBUFFERED=1
{
  nvidia-smi || true
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
  # the CUDA tests (on a GPU every test_gpu.py case runs; -rs lists what did not)
  $PY -m pytest -q -p no:cacheprovider -rs Testing/test_gpu.py
  $PY - $CASE <<'PY'
import sys
import SimpleITK as sitk
image = sitk.ReadImage("Testing/data/abdomen_ct_3mm_crop.nii.gz")     # a real CT, stretched to the case's size
size = [int(v) for v in sys.argv[1:4]]
spacing = [e * s / n for e, s, n in zip(image.GetSpacing(), image.GetSize(), size)]
out = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                    image.GetDirection(), -1024.0, image.GetPixelID())
sitk.WriteImage(out, "/tmp/gpu_case.nii.gz")
print("case", out.GetSize(), [round(s, 3) for s in out.GetSpacing()])
PY
  $PY benchmarks/bench_predict.py --input /tmp/gpu_case.nii.gz $BENCH --device "$DEVICE" \
      --workdir /tmp/gpu_bench --json "$OUT/bench_predict.json"
} 2>&1 | tee "$OUT/gpu_session.log"
