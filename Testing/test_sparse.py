"""Partly annotated cases (nnU-Net v2's "ignore" label): the loss, the metrics, the dataset checks, patch
sampling, the deep-supervision targets, and a fine-tune from the CLI on a sparse copy of the mini dataset."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from segbook.cli import main
from segbook.dataset import read_dataset
from segbook.metrics import evaluate_case
from segbook.training.loss import DeepSupervisionLoss, DiceCELoss

MINI = Path(__file__).parent / "data" / "hippocampus_mini"
IGNORE = 3


def _sparse_inputs(seed=0, k=3, shape=(2, 8, 10, 6)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape[0], k, *shape[1:], generator=g, dtype=torch.float64)
    target = torch.randint(0, k, (shape[0], 1, *shape[1:]), generator=g)
    ignored = torch.rand(target.shape, generator=g) < 0.6
    return logits, target.masked_fill(ignored, k), ignored


def _changed_where_ignored(logits, ignored, seed=1):
    """The logits with every ignored voxel's values replaced by large random ones."""
    g = torch.Generator().manual_seed(seed)
    noise = 50 * torch.randn(logits.shape, generator=g, dtype=logits.dtype)
    return torch.where(ignored, noise, logits)


def _loss_and_grad(loss_fn, logits, target):
    x = logits.clone().requires_grad_(True)
    loss = loss_fn(x, target)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("batch_dice", [True, False])
def test_changing_ignored_logits_leaves_loss_and_gradient_identical(batch_dice):
    logits, target, ignored = _sparse_inputs()
    fn = DiceCELoss(batch_dice=batch_dice, ignore_label=IGNORE)
    loss, grad = _loss_and_grad(fn, logits, target)
    loss2, grad2 = _loss_and_grad(fn, _changed_where_ignored(logits, ignored), target)
    assert torch.equal(loss, loss2)                     # bit for bit, not approximately
    assert torch.equal(grad, grad2)
    assert not grad.masked_select(ignored.expand_as(grad)).any()          # no gradient reaches ignored voxels
    assert grad.masked_select(~ignored.expand_as(grad)).abs().sum() > 0


def test_ignoring_differs_from_treating_ignore_as_background_or_a_class():
    logits, target, ignored = _sparse_inputs()
    sparse = DiceCELoss(ignore_label=IGNORE)(logits, target)
    as_background = DiceCELoss()(logits, target.masked_fill(ignored, 0))
    # the old behaviour: "ignore" a fourth class of its own (a 4-output network)
    four = torch.cat([logits, torch.zeros_like(logits[:, :1])], 1)
    as_class = DiceCELoss()(four, target)
    assert abs(sparse - as_background) > 0.05 and abs(sparse - as_class) > 0.05
    # annotated voxels alone: the same as a plain loss over just those voxels (CE part)
    ce = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 4, 1)[~ignored[:, 0]], target[~ignored])
    no_dice = DiceCELoss(weight_dice=0, ignore_label=IGNORE)(logits, target)
    assert no_dice.item() == pytest.approx(ce.item(), rel=1e-12)


def test_all_ignored_patch_gives_a_finite_loss_without_gradient():
    logits, target, _ = _sparse_inputs()
    loss, grad = _loss_and_grad(DiceCELoss(ignore_label=IGNORE), logits, torch.full_like(target, IGNORE))
    assert torch.isfinite(loss) and not grad.any()


def test_deep_supervision_ignores_at_every_level_and_through_the_network():
    """Parameter gradients of a small network are identical when the logits of ignored voxels change at
    every deep-supervision level (a perturbation added after the network, so it reaches no annotated voxel)."""
    torch.manual_seed(0)
    net = torch.nn.ModuleList([torch.nn.Conv3d(1, 3, 3, padding=1) for _ in range(3)])
    image = torch.randn(2, 1, 8, 8, 8)
    levels = [_sparse_inputs(seed=s, shape=(2, 8 // 2 ** s, 8 // 2 ** s, 8 // 2 ** s)) for s in range(3)]
    targets = [t for _, t, _ in levels]
    loss_fn = DeepSupervisionLoss(3, ignore_label=IGNORE)

    def run(perturb: bool):
        net.zero_grad()
        outs = []
        for s, conv in enumerate(net):
            out = conv(torch.nn.functional.avg_pool3d(image, 2 ** s) if s else image)
            if perturb:
                out = torch.where(levels[s][2], _changed_where_ignored(out.detach(), levels[s][2], s).float(), out)
            outs.append(out)
        loss = loss_fn(outs, targets)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    (loss, grads), (loss2, grads2) = run(False), run(True)
    assert torch.equal(loss, loss2)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))
    assert grads[0].abs().sum() > 0 and grads[2].abs().sum() > 0     # level 2 weighs 0 but stays in the graph


@pytest.mark.nnunet
def test_loss_with_ignore_matches_nnunet():
    from nnunetv2.training.loss import compound_losses as nnunet_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    logits, target, _ = _sparse_inputs(seed=4)
    ref = nnunet_loss.DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                                     weight_ce=1, weight_dice=1, ignore_label=IGNORE,
                                     dice_class=MemoryEfficientSoftDiceLoss)
    x_ref = logits.float().clone().requires_grad_(True)
    expected = ref(x_ref, target.float())
    expected.backward()
    loss, grad = _loss_and_grad(DiceCELoss(ignore_label=IGNORE), logits.float(), target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad, x_ref.grad, rtol=1e-4, atol=1e-8)


# --- metrics -----------------------------------------------------------------------------------------------

def test_dice_counts_only_annotated_voxels():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 3, (12, 14, 10))
    ignored = rng.random(ref.shape) < 0.5
    sparse_ref = np.where(ignored, IGNORE, ref)
    pred = np.where(rng.random(ref.shape) < 0.8, ref, rng.integers(0, 3, ref.shape))
    other = np.where(ignored, rng.integers(0, 3, ref.shape), pred)       # differs only where ignored
    a = evaluate_case(pred, sparse_ref, [1, 2], ignore_label=IGNORE)
    b = evaluate_case(other, sparse_ref, [1, 2], ignore_label=IGNORE)
    assert [a[c]["dice"] for c in (1, 2)] == [b[c]["dice"] for c in (1, 2)]
    for c in (1, 2):
        p, r = (pred == c) & ~ignored, (ref == c) & ~ignored
        assert a[c]["dice"] == pytest.approx(2 * (p & r).sum() / (p.sum() + r.sum()))
        assert np.isnan(a[c]["nsd"])
    # without the ignore value the metric differs (ignored voxels would count as misses)
    assert evaluate_case(pred, sparse_ref, [1])[1]["dice"] != pytest.approx(a[1]["dice"])


# --- sparse copies of the mini dataset ----------------------------------------------------------------------

def _sparse_copy(tmp_path, slices=(0.3, 0.5, 0.7), labels=None) -> Path:
    """The mini dataset with only a few axial slices (array axis 0) of each case annotated, the rest 3."""
    data = Path(shutil.copytree(MINI, tmp_path / "sparse"))
    spec = json.loads((data / "dataset.json").read_text())
    spec["labels"] = labels or {**spec["labels"], "ignore": IGNORE}
    (data / "dataset.json").write_text(json.dumps(spec))
    for f in sorted((data / "labelsTr").glob("*.nii.gz")):
        img = sitk.ReadImage(str(f))
        seg = sitk.GetArrayFromImage(img)
        keep = np.zeros(seg.shape[0], bool)
        keep[[int(s * seg.shape[0]) for s in slices]] = True
        out = sitk.GetImageFromArray(np.where(keep[:, None, None], seg, IGNORE).astype(seg.dtype))
        out.CopyInformation(img)
        sitk.WriteImage(out, str(f))
    return data


def test_dataset_json_ignore_is_not_a_class(tmp_path):
    ds = read_dataset(_sparse_copy(tmp_path))
    assert ds.class_names == ["background", "anterior", "posterior"] and ds.ignore_label == IGNORE
    assert read_dataset(MINI).ignore_label is None


@pytest.mark.parametrize("labels, problem", [
    ({"background": 0, "anterior": 1, "posterior": 2, "ignore": 5}, "must be the highest value, 3"),
    ({"background": 0, "anterior": 1, "ignore": 2, "posterior": 3}, "label values must be 0..2"),
    ({"background": 0, "anterior": 1, "posterior": 2, "ignore": [3]}, "'ignore' must be an integer"),
])
def test_misplaced_ignore_label_is_refused_in_one_line(tmp_path, capsys, labels, problem):
    data = _sparse_copy(tmp_path, labels=labels)
    assert main(["finetune", str(data), "-o", str(tmp_path / "out"), "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert problem in err and str(data / "dataset.json") in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_all_ignore_case_is_refused_naming_it(tmp_path, capsys):
    data = _sparse_copy(tmp_path)
    f = data / "labelsTr" / "hippocampus_165.nii.gz"
    img = sitk.ReadImage(str(f))
    out = sitk.GetImageFromArray(np.full(sitk.GetArrayFromImage(img).shape, IGNORE, np.uint8))
    out.CopyInformation(img)
    sitk.WriteImage(out, str(f))
    assert main(["finetune", str(data), "-o", str(tmp_path / "out"), "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "case hippocampus_165: every voxel is 'ignore'" in err[0], err


def test_json_case_list_names_the_ignore_value(tmp_path, capsys):
    data = _sparse_copy(tmp_path)
    cases = [{"image": str(p), "label": str(data / "labelsTr" / p.name)} for p in sorted((data / "imagesTr").iterdir())]
    listing = tmp_path / "cases.json"
    listing.write_text(json.dumps({"class_names": ["background", "anterior", "posterior"], "ignore": 3,
                                   "cases": cases}))
    ds = read_dataset(listing)
    assert ds.ignore_label == 3 and ds.num_classes == 3
    # without "ignore", value 3 is outside the class list: refused, not trained as a class
    listing.write_text(json.dumps({"class_names": ["background", "anterior", "posterior"], "cases": cases}))
    assert main(["finetune", str(listing), "-o", str(tmp_path / "out"), "--progress", "none"]) == 2
    assert "label values [3] not in the class list" in capsys.readouterr().err
    listing.write_text(json.dumps({"class_names": ["background", "a", "b"], "ignore": 2, "cases": cases}))
    assert main(["finetune", str(listing), "-o", str(tmp_path / "out"), "--progress", "none"]) == 2
    assert "must be the highest value, 3" in capsys.readouterr().err


# --- data pipeline ------------------------------------------------------------------------------------------

def _cached(tmp_path):
    from segbook.config import Plan
    from segbook.training.cache import cache_dataset
    ds = read_dataset(_sparse_copy(tmp_path))
    return ds, cache_dataset(ds, ds.cases, Plan([1.0, 1.0, 1.0], [16, 24, 16]), tmp_path / "cache")


def test_patches_are_drawn_around_annotated_voxels(tmp_path):
    from segbook.training.cache import ANNOTATED
    from segbook.training.sampling import BatchDataset
    ds, cached = _cached(tmp_path)
    # patches 8 voxels deep along the sliced axis: a random position would mostly miss the 3 slices
    bd = BatchDataset(cached, [8, 24, 16], [[1, 1, 1], [0.5, 0.5, 0.5]], batch_size=3, seed=0)
    rng = np.random.default_rng(0)
    hits = 0
    for i in range(60):
        case = cached[i % len(cached)]
        _, seg = case.load()
        assert len(case.locations[ANNOTATED]) and set(case.locations) == {1, 2, ANNOTATED}
        lower = bd._lower_corner(case, seg.shape[1:], False, rng)
        centre = [lo + (s - p) // 2 for lo, s, p in zip(lower, bd.sample_size, bd.patch_size)]
        patch = seg[0, max(centre[0], 0):centre[0] + 8]
        hits += bool((patch != IGNORE).any())
    assert hits == 60
    # the dataset's batches: targets carry the ignore value at every deep-supervision level, each coarse
    # voxel being one of the full-resolution voxels it covers (nearest, no averaging of label values)
    bd = BatchDataset(cached, [16, 24, 16], [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]], batch_size=2, seed=0)
    for k in range(4):
        full, half, quarter = bd[k]["target"]
        assert set(full.unique().tolist()) <= {0, 1, 2, IGNORE}
        for coarse, f in ((half, 2), (quarter, 4)):
            assert (coarse == IGNORE).any() and (coarse != IGNORE).any()
            blocks = full.reshape(*full.shape[:2], coarse.shape[2], f, coarse.shape[3], f, coarse.shape[4], f)
            assert (blocks == coarse[:, :, :, None, :, None, :, None]).any(7).any(5).any(3).all()


def test_finetune_and_evaluate_on_sparse_labels(tmp_path, capsys):
    """From the CLI: the model has no "ignore" output; validation and `segbook evaluate` score annotated
    voxels only (equal whatever is predicted where the reference is ignore)."""
    data, out = _sparse_copy(tmp_path), tmp_path / "model"
    assert main(["finetune", str(data), "-o", str(out), "--scratch", "--width", "0.25", "--patch-size", "16",
                 "24", "16", "--epochs", "1", "--iterations-per-epoch", "3", "--val-fraction", "0.25",
                 "--threads", "1", "--num-workers", "0", "--progress", "none"]) == 0
    config = json.loads((out / "model.json").read_text())
    assert config["class_names"] == ["background", "anterior", "posterior"] and config["arch"]["num_classes"] == 3
    val = config["provenance"]["validation"]
    assert set(val["dice"]) == {"anterior", "posterior"} and all(np.isnan(v) for v in val["nsd"].values())
    # evaluate: a prediction that is perfect on the annotated slices and wrong elsewhere scores 1
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    for f in (data / "labelsTr").iterdir():
        img = sitk.ReadImage(str(f))
        seg = sitk.GetArrayFromImage(img)
        full = sitk.GetArrayFromImage(sitk.ReadImage(str(MINI / "labelsTr" / f.name)))
        guess = np.where(seg == IGNORE, 2 - np.minimum(full, 2), seg).astype(seg.dtype)
        p = sitk.GetImageFromArray(guess)
        p.CopyInformation(img)
        sitk.WriteImage(p, str(pred_dir / f.name))
    capsys.readouterr()
    assert main(["evaluate", str(pred_dir), str(data / "labelsTr")]) == 0
    rows = (pred_dir / "evaluation.csv").read_text().splitlines()
    means = [r.split(",") for r in rows if r.startswith("mean")]
    assert [float(m[2]) for m in means] == [1.0, 1.0] and [m[1] for m in means] == ["1", "2"]
    # told there is no ignore label, the same prediction is poor and value 3 is scored as a class
    assert main(["evaluate", str(pred_dir), str(data / "labelsTr"), "--ignore-label", "-1", "--classes", "1"]) == 0
    rows = (pred_dir / "evaluation.csv").read_text().splitlines()
    assert float([r for r in rows if r.startswith("mean")][0].split(",")[2]) < 0.5


# --- the adapt preset ---------------------------------------------------------------------------------------

def _tiny_base(tmp_path) -> Path:
    from segbook.config import Arch, ModelConfig, Plan
    from segbook.network import STUNet
    from segbook.zoo import save_model_folder
    dims, classes = [4, 8, 16, 32, 64, 64], ["background", "liver", "spleen"]
    cfg = ModelConfig(name="tiny-base", arch=Arch(1, 3, dims, [1] * 6, [[2, 2, 2]] * 5),
                      plan=Plan([1.0] * 3, [16, 24, 16]), class_names=classes)
    torch.manual_seed(3)
    return save_model_folder(tmp_path / "base", cfg, STUNet(1, 3, dims, [1] * 6, [[2, 2, 2]] * 5).state_dict())


def _adapt(data, out, base, *extra):
    return main(["finetune", str(data), "-o", str(out), "--base", str(base), "--preset", "adapt",
                 "--patch-size", "16", "24", "16", "--epochs", "1", "--iterations-per-epoch", "2",
                 "--val-fraction", "0", "--threads", "1", "--num-workers", "0", "--progress", "json", *extra])


def test_adapt_continues_from_the_previous_model_of_the_same_task(tmp_path, capsys):
    from segbook.checkpoint import load_checkpoint
    from segbook.training.config import PRESETS
    assert 100 <= PRESETS["adapt"]["epochs"] * PRESETS["adapt"]["iterations_per_epoch"] <= 500
    data, out, base = _sparse_copy(tmp_path), tmp_path / "model", _tiny_base(tmp_path)
    assert _adapt(data, out, base) == 0
    first = load_checkpoint(out / "weights.safetensors")
    # round 2, the same command with lr 0: it starts from round 1's model, so the weights stay round 1's
    # (started from the base, the fresh heads and the base's encoder would differ from them)
    assert _adapt(data, out, base, "--lr", "0", "--iterations-per-epoch", "7") == 0
    second = load_checkpoint(out / "weights.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    config = json.loads((out / "model.json").read_text())
    assert config["provenance"]["heads"] == "kept (same classes as the base)"
    assert json.loads((out / "training" / "config.json").read_text())["base"] == str(out / "training" / "previous")
    assert len((out / "training" / "log.jsonl").read_text().splitlines()) == 1      # the new run's log only
    # the time it will take, measured on the first iterations, said once in the progress stream
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    estimates = [e for e in events if e["event"] == "estimate"]
    assert len(estimates) == 1 and estimates[0]["seconds"] > 0 and estimates[0]["device"] == "cpu"
    assert "training will take about" in estimates[0]["message"] and "on cpu" in estimates[0]["message"]


def test_adapt_does_not_continue_from_another_task(tmp_path, capsys):
    data, out, base = _sparse_copy(tmp_path), tmp_path / "model", _tiny_base(tmp_path)
    assert _adapt(data, out, base) == 0
    spec = json.loads((data / "dataset.json").read_text())
    spec["labels"] = {"background": 0, "front": 1, "back": 2, "ignore": 3}
    (data / "dataset.json").write_text(json.dumps(spec))
    before = (out / "weights.safetensors").read_bytes()
    assert _adapt(data, out, base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a training run of another task" in err[0]
    assert (out / "weights.safetensors").read_bytes() == before


def test_estimate_leaves_out_the_first_iteration_and_says_it_once():
    from segbook.training.eta import Estimate, describe_duration
    clock = iter([100.0, 110.0])             # iteration 1 ends at 100 s, iterations 2-6 take 2 s each
    est = Estimate(106, "cpu", clock=lambda: next(clock))
    out = [est.step() for _ in range(8)]
    assert [o is not None for o in out] == [False] * 5 + [True, False, False]
    assert out[5]["seconds_per_iteration"] == 2.0 and out[5]["seconds"] == 200.0
    assert "about 3 min more on cpu (100 iterations at 2.00 s" in out[5]["message"]
    assert [describe_duration(s) for s in (0.2, 45, 200, 3900)] == ["1 s", "45 s", "3 min", "1 h 05 min"]
