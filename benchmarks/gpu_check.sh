#!/bin/bash
# `make gpu-check`: what SegBook does on this machine's GPU, cheapest and most important first, each step's
# result written to $RESULTS (default gpu_check_out/) as soon as it is known, so a run cut short keeps what it did:
#   1. card.txt            the card, the driver, torch's CUDA build
#   2. tests.log           the CUDA tests (Testing/test_gpu.py, test_devices.py: fp16 + batched-TTA prediction
#                          of the trained demo against the CPU, its clicks against the CPU's, a mixed-precision
#                          fine-tune, memory hand-back)
#   3. torchrun.log        `torchrun --nproc_per_node 1 -m segbook finetune --device cuda`: the process group
#                          (NCCL), DDP and the collectives a multi-GPU run takes, on one GPU
#   4. case.json           a CT-sized case at a real CT spacing (512x512x300 at 0.75x0.75x1.5 mm: a real
#                          CT crop from Testing/data, mirrored out to that size; 36 tiles of 128^3 at 1.5 mm)
#   5. cuda_vs_cpu.json    `segbook predict` on it on the GPU (fp16) and on the CPU (fp32): times and the share
#                          of identical labels over all 36 tiles
#   6. click.json          clicks on that case through the warm worker, as the Slicer module sends them
#                          (STU-Net-$MODEL, random weights, no class named): the first (model load,
#                          preprocessing, one tile), then 6 at points up to ~75 mm away
#   7. bench_predict.json  segbook vs nnU-Net v2 on the GPU, same weights (STU-Net-B, TTA), if nnU-Net is
#                          installed; bounded by NNUNET_TIMEOUT (default 900 s): nnU-Net's export resamples the
#                          105 classes in float64 on one core, which alone takes minutes on this case
# A GPU machine without network access: build .gpu/ with benchmarks/gpu_payload.sh where pip can download,
# copy the repository with it; this script installs from it into a temporary folder.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
RESULTS=${RESULTS:-gpu_check_out}
DEVICE=${DEVICE:-cuda}                  # DEVICE=cpu runs the same steps on a machine without a GPU
SIZE=${SIZE:-512 512 300}               # voxels x y z of the case
SPACING=${SPACING:-0.75 0.75 1.5}       # mm
MODEL=${MODEL:-B}                       # STU-Net size of steps 5 and 6
NNUNET_TIMEOUT=${NNUNET_TIMEOUT:-900}
mkdir -p "$RESULTS"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1
if [ -d .gpu ]; then                    # the offline payload: unpacked with Python (no xz program needed)
  $PY -c "import sys, tarfile; tarfile.open('.gpu/simpleitk.tar.xz').extractall(sys.argv[1])" "$WORK/site"
  $PY -m pip install -q --no-index --no-deps --target "$WORK/site" .gpu/wheels/*.whl
  export PYTHONPATH="$WORK/site:$PWD/SegBookCore"
fi
step() { echo "== $1 ($(date -u +%H:%M:%S))"; }

step "1 card" > "$RESULTS/card.txt"
{ nvidia-smi || true
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
} >> "$RESULTS/card.txt" 2>&1
cat "$RESULTS/card.txt"

step "2 CUDA tests" | tee "$RESULTS/tests.log"
$PY -m pytest -q -p no:cacheprovider -rs Testing/test_gpu.py Testing/test_devices.py >> "$RESULTS/tests.log" 2>&1
tail -3 "$RESULTS/tests.log"

step "3 torchrun, 1 process" | tee "$RESULTS/torchrun.log"
$PY -m torch.distributed.run --standalone --nproc_per_node 1 -m segbook -v finetune Testing/data/hippocampus_mini \
    -o "$WORK/ft" --scratch --width 0.5 --patch-size 32 48 32 --epochs 2 --iterations-per-epoch 10 \
    --val-every 1 --device "$DEVICE" --progress none >> "$RESULTS/torchrun.log" 2>&1
echo "exit $?" | tee -a "$RESULTS/torchrun.log"

step "4 case"
$PY - "$WORK/case.nii.gz" "$RESULTS/case.json" $SIZE $SPACING <<'PY'
import json, sys
import numpy as np
import SimpleITK as sitk
from segbook.preprocess import compute_new_shape
from segbook.sliding_window import tile_starts
out, record = sys.argv[1:3]
size, spacing = [int(v) for v in sys.argv[3:6]], [float(v) for v in sys.argv[6:9]]
crop = sitk.ReadImage("Testing/data/abdomen_ct_3mm_crop.nii.gz")    # real CT, 168x144x90 mm at 3 mm
crop = sitk.Resample(crop, [int(round(n * s / t)) for n, s, t in zip(crop.GetSize(), crop.GetSpacing(), spacing)],
                     sitk.Transform(), sitk.sitkBSpline, crop.GetOrigin(), spacing, crop.GetDirection(), -1024.0)
a = sitk.GetArrayFromImage(crop)                                     # z, y, x
reps = [int(np.ceil(n / m)) for n, m in zip(size[::-1], a.shape)]
a = np.pad(a, [(0, r * m - m) for r, m in zip(reps, a.shape)], mode="symmetric")[:size[2], :size[1], :size[0]]
image = sitk.GetImageFromArray(a.astype(np.int16))
image.SetSpacing(spacing)
image.SetDirection(crop.GetDirection())
sitk.WriteImage(image, out)
plan = compute_new_shape(a.shape, spacing[::-1], [1.5] * 3)
info = {"size": size, "spacing": spacing, "at_1.5mm": [int(v) for v in plan],
        "tiles_128": len(tile_starts([max(n, 128) for n in plan], [128] * 3, 0.5))}   # (a smaller case is padded)
json.dump(info, open(record, "w"))
print(info)
PY

step "5 segbook on $DEVICE vs CPU"
$PY - "$WORK" "$RESULTS/cuda_vs_cpu.json" "$DEVICE" "$MODEL" <<'PY'
import json, subprocess, sys, time
from pathlib import Path
import numpy as np
import SimpleITK as sitk
import torch
import segbook
from segbook.zoo import REGISTRY, save_model_folder
work, record, device, size = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
torch.manual_seed(0)
net = segbook.build_stunet(size)
config = REGISTRY[f"stunet-{size.lower()}-totalseg"]
model = save_model_folder(work / "model", config, net.state_dict())
result = {"model": f"STU-Net-{size} (random weights, seed 0)"}
for dev in (device, "cpu"):
    out = work / f"seg_{dev}.nii.gz"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "segbook", "predict", str(work / "case.nii.gz"), "-o", str(out),
                           "--model", str(model), "--device", dev, "--progress", "none"], capture_output=True, text=True)
    result[dev] = {"exit": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
                   "settings": json.loads(out.with_suffix("").with_suffix(".json").read_text())["settings"]
                   if proc.returncode == 0 else proc.stderr[-500:]}
    json.dump(result, open(record, "w"), indent=1)                   # written after each run
    print(dev, result[dev]["exit"], result[dev]["wall_s"], "s")
if all(result[d]["exit"] == 0 for d in (device, "cpu")):
    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(work / f"seg_{d}.nii.gz"))) for d in (device, "cpu"))
    result["identical_labels"] = float((a == b).mean())
    json.dump(result, open(record, "w"), indent=1)
    print(f"identical labels {100 * result['identical_labels']:.4f} %")
PY

step "6 clicks, STU-Net-$MODEL on $DEVICE" | tee "$RESULTS/click.log"
$PY benchmarks/bench_interactive.py --timing-ct --ct "$WORK/case.nii.gz" --size "$MODEL" --device "$DEVICE" \
    --repeats 6 --json "$RESULTS/click.json" >> "$RESULTS/click.log" 2>&1
grep "^click" "$RESULTS/click.log"

if $PY -c "import nnunetv2" 2>/dev/null; then
  step "7 segbook vs nnU-Net v2 on $DEVICE (at most ${NNUNET_TIMEOUT} s)"
  timeout "$NNUNET_TIMEOUT" $PY benchmarks/bench_predict.py --input "$WORK/case.nii.gz" --size "$MODEL" --tta \
      --device "$DEVICE" --workdir "$WORK/bench" --json "$RESULTS/bench_predict.json" 2>&1 | tee "$RESULTS/bench_predict.log"
else
  step "7 skipped: nnU-Net v2 is not installed (make test installs it)" | tee "$RESULTS/bench_predict.log"
fi
step "done: $RESULTS"
