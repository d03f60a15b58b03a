"""Benchmark: the held-out Dice of the shipped model `hippocampus-demo`, without and with mirroring TTA.

The held-out cases are the ones its own `model.json` records (`provenance.data.validation_cases`: the split
of its training run), read from `../shared/data/hippocampus`; the weights are the shipped fp16 file (loading
casts to fp32); prediction is the sliding-window `Predictor` that `segbook predict` runs, through
`segbook.training.validate.validate` (the fine-tune's own validation: Dice and NSD at 1 mm per class and case).

    .venv/bin/python benchmarks/bench_demo_dice.py --json /tmp/demo_dice.json     # ~3 min on 2 CPU cores

Prints mean Dice/NSD per class and overall for each setting; `--json` also writes the per-case figures.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hippocampus"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA), help="the hippocampus task (nnU-Net raw layout)")
    p.add_argument("--model", default="hippocampus-demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", choices=["no-tta", "tta"], help="one of the two settings (default: both)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    import torch
    from segbook.dataset import read_dataset
    from segbook.training.validate import validate
    from segbook.zoo import create_model

    net = create_model(args.model)
    config = net.config
    held_out = config.provenance["data"]["validation_cases"]
    by_name = {c.name: c for c in read_dataset(args.data).cases}
    missing = [n for n in held_out if n not in by_name]
    if missing:
        raise SystemExit(f"{args.data}: the held-out case {missing[0]} of {args.model} is missing")
    cases = [by_name[n] for n in held_out]
    state = {k: v.float() for k, v in net.state_dict().items()}
    results = {"model": args.model, "data": str(args.data), "cases": held_out, "torch": torch.__version__}
    for tta in [t for t in (False, True) if args.only in (None, "tta" if t else "no-tta")]:
        t0 = time.monotonic()
        r = validate(state, config, cases, device=args.device, tta=tta)
        key = "tta" if tta else "no_tta"
        results[key] = {**r, "seconds": round(time.monotonic() - t0, 1)}
        dice = ", ".join(f"{k} {v:.4f}" for k, v in r["dice"].items())
        nsd = ", ".join(f"{k} {v:.4f}" for k, v in r["nsd"].items())
        print(f"{'with' if tta else 'without':7s} TTA, {len(cases)} held-out cases: mean Dice {r['mean_dice']:.4f} "
              f"(Dice {dice}; NSD {nsd}) in {results[key]['seconds']} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
