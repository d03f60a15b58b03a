"""Benchmark: `segbook predict` vs nnU-Net v2's nnUNetPredictor, end to end from file to file.

Both run the same STU-Net weights (STU-Net-S, 105 classes, random weights with a fixed seed unless
--checkpoint is given) with the same plan: 1.5 mm, patch 128, z-score, step 0.5, Gaussian, TTA off, CPU.
nnU-Net gets the network through `manual_initialization` (STU-Net is not in dynamic_network_architectures)
and runs `predict_from_files` as its CLI does (3 preprocessing and 3 export workers). Each tool runs in its
own subprocess, back to back; wall time and peak RSS of its whole process tree (sampled every 0.1 s) are
measured from outside, and the two label maps are compared voxel by voxel.

    .venv/bin/python benchmarks/bench_predict.py                       # speed case: abdomen, both tools
    .venv/bin/python benchmarks/bench_predict.py --memory-case         # chest CT: segbook only
    .venv/bin/python benchmarks/bench_predict.py --precision bf16      # segbook's engine options

segbook runs with its defaults (`--backend auto --precision auto`: OpenVINO fp32 on the CPU where it is
installed) unless --backend/--precision say otherwise; nnU-Net always runs as it does (torch, fp32 on CPU).

Never run nnU-Net on the chest CT on a 24 GB machine: it needs more than 20 GB there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "ct"
SPEED_CASE = SHARED / "abdomen_ct_3mm.nii.gz"
MEMORY_CASE = SHARED / "chest_ct_512x512x139.nii.gz"


def make_model_folder(folder: Path, size: str, checkpoint: str | None, seed: int = 0) -> Path:
    import torch
    from segbook.zoo import create_model, save_model_folder
    torch.manual_seed(seed)
    name = f"stunet-{size.lower()}-totalseg"
    net = create_model(name, pretrained=False, checkpoint=checkpoint)
    return save_model_folder(folder, net.config, net.state_dict())


def run_nnunet(model: str, image: str, output: str, tta: bool, device: str) -> None:
    """In this (sub)process: nnU-Net v2 predicting `image` into `output` with our weights."""
    import torch
    sys.path.insert(0, str(ROOT / "Testing"))
    from nnunet_reference import nnunet_predictor
    from segbook.zoo import create_model
    if device == "cpu":
        torch.set_num_threads(os.cpu_count())      # as nnUNetv2_predict does on the CPU
    net = create_model(model)
    predictor = nnunet_predictor(net, tta=tta, step=0.5, device=device)
    out = output[: -len(".nii.gz")]
    predictor.predict_from_files([[image]], [out], save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=3, num_processes_segmentation_export=3)


def measure(cmd: list[str]) -> dict:
    """Run cmd; wall seconds and peak RSS (bytes) of the process tree, sampled every 0.1 s."""
    import psutil
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = root.memory_info().rss + sum(c.memory_info().rss for c in root.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    log = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log[-3000:]}")
    return {"wall_s": wall, "peak_rss_gb": peak / 1e9, "log_tail": log[-500:]}


def agreement(a: str, b: str) -> float:
    import numpy as np
    import SimpleITK as sitk
    x, y = sitk.GetArrayFromImage(sitk.ReadImage(a)), sitk.GetArrayFromImage(sitk.ReadImage(b))
    assert x.shape == y.shape, (x.shape, y.shape)
    return float((x == y).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="image (default: the abdomen speed case, or the chest memory case)")
    parser.add_argument("--memory-case", action="store_true", help="chest CT, segbook only")
    parser.add_argument("--size", default="S")
    parser.add_argument("--checkpoint", help="weights file instead of seeded random weights")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto", help="segbook's --backend (auto, torch, openvino)")
    parser.add_argument("--precision", default="auto", help="segbook's --precision (auto, fp32, bf16, fp16)")
    parser.add_argument("--skip-nnunet", action="store_true")
    parser.add_argument("--workdir", help="keep outputs here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--_nnunet", nargs=3, metavar=("MODEL", "IMAGE", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._nnunet:
        run_nnunet(*args._nnunet, tta=args.tta, device=args.device)
        return 0

    image = Path(args.input or (MEMORY_CASE if args.memory_case else SPEED_CASE))
    skip_nnunet = args.skip_nnunet or args.memory_case
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_predict_"))
    work.mkdir(parents=True, exist_ok=True)
    model = make_model_folder(work / "model", args.size, args.checkpoint)
    results = {"input": str(image), "size": args.size, "tta": args.tta, "device": args.device,
               "backend": args.backend, "precision": args.precision, "cpus": len(os.sched_getaffinity(0))}
    # The OpenVINO conversion is once per model (cached): done here, outside the timed run, and reported.
    from segbook.inference import Predictor
    t0 = time.perf_counter()
    runner = Predictor(str(model), device=args.device, backend=args.backend, precision=args.precision).runner
    if hasattr(runner, "load"):
        runner.load()
    results["prepare_s"] = time.perf_counter() - t0
    print(f"segbook engine {runner.name} {runner.precision}: prepared in {results['prepare_s']:.1f} s", flush=True)
    ours = str(work / "segbook.nii.gz")
    cmd = [sys.executable, "-m", "segbook", "predict", str(image), "-o", ours, "--model", str(model),
           "--device", args.device, "--backend", args.backend, "--precision", args.precision,
           "--progress", "none", "--tta" if args.tta else "--no-tta"]
    print("segbook:", " ".join(cmd), flush=True)
    results["segbook"] = measure(cmd)
    print(f"segbook  wall {results['segbook']['wall_s']:7.1f} s   peak RSS {results['segbook']['peak_rss_gb']:5.2f} GB",
          flush=True)
    if not skip_nnunet:
        theirs = str(work / "nnunet.nii.gz")
        cmd = [sys.executable, __file__, "--device", args.device, *(["--tta"] if args.tta else []),
               "--_nnunet", str(model), str(image), theirs]
        print("nnunet:", " ".join(cmd), flush=True)
        results["nnunet"] = measure(cmd)
        n, s = results["nnunet"], results["segbook"]
        results["agreement"] = agreement(ours, theirs)
        results["speedup"] = n["wall_s"] / s["wall_s"]
        results["rss_ratio"] = n["peak_rss_gb"] / s["peak_rss_gb"]
        print(f"nnU-Net  wall {n['wall_s']:7.1f} s   peak RSS {n['peak_rss_gb']:5.2f} GB")
        print(f"speedup {results['speedup']:.2f}x   RSS ratio {results['rss_ratio']:.2f}   "
              f"identical voxels {100 * results['agreement']:.4f} %")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
