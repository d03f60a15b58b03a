"""Benchmark: clicks through the worker as the Slicer module sends them, by a simulated user.

The protocol of the interactive-segmentation papers (segbook.clicks): click 1 positive at the voxel of the
target farthest from its boundary; each next click in the larger of the false-negative / false-positive
regions, its largest connected part, at its voxel farthest from the boundary; every request carries all
clicks so far and the previous result (the label map the worker wrote for the click before). Reported per
model and structure: mean Dice after clicks 1-10 (a case that reached a perfect result keeps it), NoC@85 /
NoC@90 (clicks to reach that Dice, the number of clicks where it is never reached), the
automatic Dice (no prompt) on the same cases, and the worker's seconds per click.

    .venv/bin/python benchmarks/bench_interactive.py --model MODEL_DIR [--model MODEL2 ...] \\
        [--cases N] [--clicks 10] [--tta] [--json out.json]
    .venv/bin/python benchmarks/bench_interactive.py --timing-ct     # a warm click on the abdominal CT
    python benchmarks/bench_interactive.py --timing-ct --ct CASE --size B --device cuda   # on a GPU

The cases are the model's held-out cases (its model.json's provenance.data.validation_cases) from
../shared/data/hippocampus. `--timing-ct`: STU-Net-S with random weights on ../shared/data/ct/abdomen_ct_3mm,
a point at the centre, no class named (random weights: the structure is whatever the network makes of it),
then `--repeats` clicks at new points up to ~75 mm around it on the same warm worker, with the default
settings (OpenVINO fp32 where installed). `--ct`, `--size` and `--device` change the case, the STU-Net size
and the device (`make gpu-check` runs STU-Net-B on its 512x512x300 case on the GPU). `--in-process` sends
the same clicks to the worker's click path in this process and reports each click's network seconds and
the rest apart. `--precision bf16` sends the CT clicks in bf16 (the Segment tab's precision). `--tta` sends
`"tta": true` with every request (the module's TTA box ticked).
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

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hippocampus"
CT = ROOT.parent / "shared" / "data" / "ct" / "abdomen_ct_3mm.nii.gz"
sys.path.insert(0, str(ROOT / "benchmarks"))

from segbook.clicks import dice, next_click  # noqa: E402
from segbook.runners import PRECISIONS  # noqa: E402


class Worker:
    """`python -m segbook.worker` driven by JSON lines, as the Slicer module drives it."""

    def __init__(self, env=None, device: str = "cpu", precision: str = "auto"):
        self.proc = subprocess.Popen([sys.executable, "-m", "segbook.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        assert json.loads(self.proc.stdout.readline())["event"] == "ready"
        self.n = 0
        self.device, self.precision = device, precision

    def request(self, **fields) -> dict:
        self.n += 1
        self.proc.stdin.write(json.dumps({"id": f"r{self.n}", "command": "predict", "device": self.device,
                                          "precision": self.precision, **fields}) + "\n")
        self.proc.stdin.flush()
        while True:
            event = json.loads(self.proc.stdout.readline())
            if event["event"] in ("done", "error"):
                return event

    def close(self):
        self.proc.stdin.write(json.dumps({"command": "shutdown"}) + "\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def lps(image: sitk.Image, zyx) -> list[float]:
    return list(image.TransformIndexToPhysicalPoint([int(v) for v in reversed(zyx)]))


def run_model(model: str, cases: list[str], clicks: int, work: Path, tta: bool = False) -> dict:
    config = json.loads((Path(model) / "model.json").read_text())
    names = config["class_names"]
    worker = Worker()
    curves = {n: [] for n in names[1:]}
    automatic = {n: [] for n in names[1:]}
    seconds, by_click = [], {}
    for case in cases:
        image_path = DATA / "imagesTr" / f"{case}.nii.gz"
        ref = sitk.ReadImage(str(image_path))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "labelsTr" / f"{case}.nii.gz")))
        spacing = ref.GetSpacing()[::-1]
        auto = worker.request(input=str(image_path), output=str(work / "auto.nii.gz"), model=model, tta=tta)
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "auto.nii.gz")))
        for value, name in enumerate(names[1:], start=1):
            target = truth == value
            automatic[name].append(dice(labels == value, target))
            pos, neg, pred, scores = [], [], None, []
            previous = None
            for k in range(clicks):
                click = next_click(target, pred, spacing)
                if click is None:           # perfect: it stays so
                    scores.append(1.0)
                    continue
                (pos if click[1] else neg).append(lps(ref, click[0]))
                out = work / f"click{k % 2}.nii.gz"
                event = worker.request(input=str(image_path), output=str(out), model=model, classes=[name], tta=tta,
                                       points=pos, negative_points=neg,
                                       **({"previous": str(previous)} if previous else {}))
                if event["event"] == "error":
                    raise SystemExit(f"{case} {name} click {k + 1}: {event['message']}")
                seconds.append(event["seconds"])
                by_click.setdefault(k, []).append(event["seconds"])
                pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out))) == value
                previous = out
                scores.append(dice(pred, target))
            curves[name].append(scores)
        print(f"{case}: " + "  ".join(f"{n} auto {automatic[n][-1]:.3f} clicks "
                                      + " ".join(f"{d:.2f}" for d in curves[n][-1]) for n in names[1:]),
              flush=True)
    worker.close()
    result = {"model": model, "cases": len(cases), "tta": tta, "structures": {}}
    for name in names[1:]:
        c = np.array(curves[name])
        noc = {t: float(np.mean([next((i + 1 for i, d in enumerate(row) if d >= t), clicks) for row in c]))
               for t in (0.85, 0.90)}
        result["structures"][name] = {"automatic_dice": float(np.mean(automatic[name])),
                                      "dice_after_click": [round(float(v), 4) for v in c.mean(0)],
                                      "noc85": noc[0.85], "noc90": noc[0.90]}
    all_curves = np.array([row for n in names[1:] for row in curves[n]])
    result["mean_dice_after_click"] = [round(float(v), 4) for v in all_curves.mean(0)]
    result["mean_automatic_dice"] = float(np.mean([np.mean(v) for v in automatic.values()]))
    result["seconds_per_click"] = {"median": float(np.median(seconds)), "p90": float(np.percentile(seconds, 90)),
                                   "max": float(np.max(seconds)), "n": len(seconds),
                                   "max_by_click": [round(float(np.max(by_click[k])), 3) for k in sorted(by_click)]}
    return result


def timing_ct(repeats: int, work: Path, ct: Path = CT, net: str = "S", device: str = "cpu",
              in_process: bool = False, precision: str = "auto") -> dict:
    from bench_predict import make_model_folder
    model = make_model_folder(work / f"model-{net.lower()}", net, None)
    ref = sitk.ReadImage(str(ct))
    size, spacing = np.array(ref.GetSize()), np.array(ref.GetSpacing())
    worker = InProcess(model, ct, work, device, precision) if in_process else \
        Worker(env={"SEGBOOK_CACHE": str(work / "cache")}, device=device, precision=precision)
    times = []
    rng = np.random.default_rng(0)
    for i in range(repeats + 1):
        # after the first click (model load, conversion, preprocessing), points up to ~75 mm away (25 voxels
        # of 3 mm): some fall in a tile already computed (no network run), the others need one
        index = (size - 1) / 2 + (rng.integers(-25, 26, 3) * 3.0 / spacing if i else 0)
        point = list(ref.TransformContinuousIndexToPhysicalPoint([float(v) for v in index]))
        t0 = time.perf_counter()
        event = worker.request(input=str(ct), output=str(work / f"ct{i}.nrrd"), model=str(model), points=[point])
        wall = time.perf_counter() - t0
        if event["event"] == "error":       # random weights may call the point background: say so, go on
            print(f"click {i}: {event['message']}", flush=True)
            continue
        r = event["result"]["result"]
        network = event.get("network_seconds")
        split = "" if network is None else f" (network {network:.2f} s, the rest {event['seconds'] - network:.3f} s)"
        print(f"click {i}: worker {event['seconds']:.2f} s{split}, round trip {wall:.2f} s, {r['tiles']} tiles, "
              f"class {r['class']}, {r['voxels']} voxels", flush=True)
        if i:
            times.append({"seconds": event["seconds"], "tiles": r["tiles"], "network_seconds": network})
    worker.close()
    return {"case": str(ct), "model": f"STU-Net-{net} (random weights)", "device": device,
            "precision": precision, "in_process": in_process, "clicks": times}


class InProcess:
    """The worker's click path (a FileSession on one warm Predictor) in this process, each click's seconds
    split into the network's (the Predictor's tile calls) and the rest's: the machine's noise, mostly in
    the network's seconds, hides a change of the rest in the worker's totals."""

    def __init__(self, model: Path, ct: Path, work: Path, device: str, precision: str = "auto"):
        os.environ["SEGBOOK_CACHE"] = str(work / "cache")
        from segbook.click_file import FileSession
        from segbook.inference import Predictor
        self.predictor = Predictor(str(model), device=device, precision=precision)
        self.network = 0.0
        run = self.predictor._predict_tile

        def timed(tile):
            t0 = time.perf_counter()
            out = run(tile)
            self.network += time.perf_counter() - t0
            return out
        self.predictor._predict_tile = timed
        self.session = FileSession(self.predictor, str(ct))

    def request(self, input, output, model, points) -> dict:
        from segbook.errors import InputError
        self.network, t0 = 0.0, time.perf_counter()
        try:
            result = self.session.segment(output, points_lps=points)
        except InputError as e:     # a point on background: the worker answers an error event
            return {"event": "error", "message": str(e)}
        return {"event": "result", "result": result, "seconds": time.perf_counter() - t0,
                "network_seconds": self.network}

    def close(self) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--cases", type=int, default=0, help="the first N held-out cases (0: all)")
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--tta", action="store_true",
                        help="mirroring TTA on every request (the module's TTA box ticked)")
    parser.add_argument("--timing-ct", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ct", type=Path, default=CT, help="the case of --timing-ct")
    parser.add_argument("--size", default="S", choices="SBLH", help="the STU-Net of --timing-ct")
    parser.add_argument("--device", default="cpu", help="the device of --timing-ct (cpu, cuda, ...)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="the precision of --timing-ct's requests (the Segment tab's precision)")
    parser.add_argument("--in-process", action="store_true",
                        help="--timing-ct in this process, each click's network seconds and the rest apart")
    parser.add_argument("--json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_interactive_"))
    results = []
    for model in args.model:
        config = json.loads((Path(model) / "model.json").read_text())
        cases = config["provenance"]["data"]["validation_cases"]
        cases = cases[:args.cases] if args.cases else cases
        r = run_model(model, cases, args.clicks, work, args.tta)
        print(json.dumps(r, indent=1), flush=True)
        results.append(r)
    if args.timing_ct:
        r = timing_ct(args.repeats, work, args.ct, args.size, args.device, args.in_process, args.precision)
        print(json.dumps(r, indent=1), flush=True)
        results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
