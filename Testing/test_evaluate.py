"""Dice and NSD against brute-force references, and the `segbook evaluate` command."""
from __future__ import annotations

import csv
from itertools import product

import numpy as np
import pytest
import SimpleITK as sitk

from segbook.cli import main
from segbook.metrics import dice, surface_dice


def _brute_nsd(p: np.ndarray, r: np.ndarray, spacing, tol: float) -> float:
    """Border voxel = a mask voxel with a 6-neighbour outside the mask (or the array); pairwise distances."""
    def border(m):
        pad = np.pad(m, 1)
        inner = np.ones_like(m)
        for axis, shift in product(range(3), (-1, 1)):
            inner &= np.roll(pad, shift, axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(m & ~inner) * np.asarray(spacing)
    bp, br = border(p), border(r)
    d = np.sqrt(((bp[:, None, :] - br[None, :, :]) ** 2).sum(-1))
    return ((d.min(1) <= tol).sum() + (d.min(0) <= tol).sum()) / (len(bp) + len(br))


def _cube(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def test_dice_reference_values():
    a, b = _cube((10, 10, 10), (0, 0, 0), (4, 4, 4)), _cube((10, 10, 10), (2, 0, 0), (6, 4, 4))
    assert dice(a, b) == pytest.approx(2 * 32 / 128)
    assert dice(a, a) == 1.0 and np.isnan(dice(a & False, b & False)) and dice(a, a & False) == 0.0


@pytest.mark.parametrize("shift, spacing, tol", [(1, (1, 1, 1), 1.0), (2, (1, 1, 1), 1.0), (3, (2, 1, 0.5), 1.5),
                                                 (0, (1, 1, 1), 0.0)])
def test_nsd_matches_brute_force(shift, spacing, tol):
    rng = np.random.default_rng(shift)
    p = _cube((14, 12, 16), (2, 2, 3), (9, 8, 11))
    r = np.roll(p, shift, axis=2) | (rng.random(p.shape) > 0.97)
    assert surface_dice(p, r, spacing, tol) == pytest.approx(_brute_nsd(p, r, spacing, tol), abs=1e-12)
    assert surface_dice(p, p, spacing, tol) == 1.0
    assert surface_dice(p, np.zeros_like(p), spacing, tol) == 0.0


def _write(arr, path, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def test_evaluate_command_folders_table_and_csv(tmp_path, capsys):
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[2:6, 2:6, 2:6], ref[6:10, 6:10, 6:10] = 1, 2
    pred = ref.copy()
    pred[2:6, 2:6, 2] = 0
    for case, p in (("a", pred), ("b", ref)):
        _write(ref, tmp_path / "ref" / f"{case}.nii.gz")
        _write(p, tmp_path / "pred" / f"{case}_seg.nii.gz")
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "ref")]) == 0
    out = capsys.readouterr().out
    # by hand: class 1 of case a keeps 4x4x3 = 48 of the reference's 4x4x4 = 64 voxels, all inside it:
    # Dice 2 x 48 / (48 + 64) = 6/7; every other (case, class) is identical, Dice 1
    expected_a1 = 6 / 7
    assert f"{expected_a1:8.4f}" in out and out.splitlines()[0].split()[:3] == ["case", "Dice", "1"]
    rows = list(csv.DictReader(open(tmp_path / "pred" / "evaluation.csv")))
    assert [(r["case"], r["class"]) for r in rows] == [("a", "1"), ("a", "2"), ("b", "1"), ("b", "2"),
                                                       ("mean", "1"), ("mean", "2")]
    assert [float(r["dice"]) for r in rows] == pytest.approx([expected_a1, 1, 1, 1, (expected_a1 + 1) / 2, 1])
    # NSD at the default 1 mm: the brute-force border distances above, not the command's own metric code
    nsd_a1 = _brute_nsd(pred == 1, ref == 1, (1, 1, 1), 1.0)
    assert [float(r["nsd"]) for r in rows] == pytest.approx([nsd_a1, 1, 1, 1, (nsd_a1 + 1) / 2, 1], abs=1e-12)


def test_evaluate_command_errors_name_the_case(tmp_path, capsys):
    _write(np.ones((4, 4, 4)), tmp_path / "p.nii.gz")
    _write(np.ones((4, 4, 5)), tmp_path / "r.nii.gz")
    assert main(["evaluate", str(tmp_path / "p.nii.gz"), str(tmp_path / "r.nii.gz"), "--classes", "1"]) == 2
    assert "case r: prediction shape (4, 4, 4) differs from reference (5, 4, 4)" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--tolerance", "-1"], "--tolerance must be a distance of 0 mm or more, got -1.0"),   # NSD was 0
    (["--tolerance", "nan"], "--tolerance must be a distance of 0 mm or more, got nan"),
    (["MISSING"], "no such file or folder"),
])
def test_evaluate_command_bad_arguments_are_one_line(tmp_path, capsys, args, message):
    _write(np.ones((4, 4, 4)), tmp_path / "p.nii.gz")
    _write(np.ones((4, 4, 4)), tmp_path / "r.nii.gz")
    ref = str(tmp_path / "missing.nii.gz") if args == ["MISSING"] else str(tmp_path / "r.nii.gz")
    extra = [] if args == ["MISSING"] else args
    assert main(["evaluate", str(tmp_path / "p.nii.gz"), ref, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "evaluation.csv").exists()
