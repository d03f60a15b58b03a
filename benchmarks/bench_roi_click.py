"""Benchmark: a Segment click with a 60 mm ROI in the warm worker, as the Slicer module drives it.

Starts `python -m segbook.worker`, sends the same predict request (STU-Net-S, random weights, a 60 mm cube
around the image centre, LPS mm) `--clicks` times and prints each request's seconds as the worker reports
them (the first includes loading the model and, on a fresh cache, converting it). Default settings: the
backend and precision the Slicer module uses ("auto").

    .venv/bin/python benchmarks/bench_roi_click.py                       # abdomen CT, 3 clicks
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_predict import SPEED_CASE, make_model_folder  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=str(SPEED_CASE))
    parser.add_argument("--size", default="S")
    parser.add_argument("--roi-mm", type=float, default=60.0)
    parser.add_argument("--clicks", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    import SimpleITK as sitk
    work = Path(tempfile.mkdtemp(prefix="bench_roi_"))
    model = make_model_folder(work / "model", args.size, None)
    img = sitk.ReadImage(args.input)
    centre = img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()])
    h = args.roi_mm / 2
    roi = [c - h for c in centre] + [c + h for c in centre]
    worker = subprocess.Popen([sys.executable, "-m", "segbook.worker"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**__import__("os").environ,
                                                                      "SEGBOOK_CACHE": str(work / "cache")})
    assert json.loads(worker.stdout.readline())["event"] == "ready"
    for i in range(args.clicks):
        request = {"id": f"c{i}", "command": "predict", "input": args.input, "output": str(work / f"seg{i}.nrrd"),
                   "model": str(model), "device": "cpu", "roi_lps": roi, "backend": args.backend,
                   "precision": args.precision}
        worker.stdin.write(json.dumps(request) + "\n")
        worker.stdin.flush()
        while True:
            event = json.loads(worker.stdout.readline())
            if event["event"] in ("done", "error"):
                break
        if event["event"] == "error":
            raise SystemExit(f"worker error: {event['message']}")
        settings = event["result"]["settings"]
        print(f"click {i + 1}: {event['seconds']:6.2f} s  (reused model: {event['reused']}, "
              f"{settings['backend']} {settings['precision']}, ROI {args.roi_mm:g} mm)", flush=True)
    worker.stdin.write(json.dumps({"command": "shutdown"}) + "\n")
    worker.stdin.close()
    worker.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
