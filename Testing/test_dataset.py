"""Dataset reading (nnU-Net raw, Decathlon, JSON list), the bad-input checks, and planning from data."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from segbook.cli import main
from segbook.dataset import check_dataset, read_dataset
from segbook.errors import InputError
from segbook.planning import deep_supervision_scales, plan_from_data, pools_for_patch

MINI = Path(__file__).parent / "data" / "hippocampus_mini"
NAMES = ["hippocampus_149", "hippocampus_165", "hippocampus_221", "hippocampus_319"]


@pytest.fixture
def mini(tmp_path) -> Path:
    dst = tmp_path / "mini"
    shutil.copytree(MINI, dst)
    for p in dst.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return dst


def test_reads_raw_folder_with_plain_names():
    ds = read_dataset(MINI)
    assert ds.class_names == ["background", "anterior", "posterior"]
    assert ds.channel_names == ["MRI"]
    assert [c.name for c in ds.cases] == NAMES
    assert all(len(c.images) == 1 and c.images[0].name == c.name + ".nii.gz" for c in ds.cases)
    check_dataset(ds, expected_channels=1)


def test_reads_channel_suffixes_and_two_channels(mini):
    meta = json.loads((mini / "dataset.json").read_text())
    meta["channel_names"] = {"0": "T1", "1": "T1 again"}
    (mini / "dataset.json").write_text(json.dumps(meta))
    for p in list((mini / "imagesTr").glob("*.nii.gz")):
        stem = p.name[:-7]
        shutil.copy(p, p.with_name(f"{stem}_0001.nii.gz"))
        p.rename(p.with_name(f"{stem}_0000.nii.gz"))
    ds = read_dataset(mini)
    assert [p.name for p in ds.cases[0].images] == [f"{NAMES[0]}_0000.nii.gz", f"{NAMES[0]}_0001.nii.gz"]
    check_dataset(ds)
    with pytest.raises(InputError, match=f"case {NAMES[0]}: 2 image channel.*base model takes 1"):
        check_dataset(ds, expected_channels=1)


def test_reads_decathlon_labels_and_json_list(mini):
    meta = json.loads((mini / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "1": "anterior", "2": "posterior"}     # Decathlon orientation
    (mini / "dataset.json").write_text(json.dumps(meta))
    assert read_dataset(mini).class_names == ["background", "anterior", "posterior"]

    listing = {"class_names": ["background", "anterior", "posterior"],
               "cases": [{"image": f"imagesTr/{n}.nii.gz", "label": f"labelsTr/{n}.nii.gz"} for n in NAMES[:2]]}
    path = mini / "cases.json"
    path.write_text(json.dumps(listing))
    ds = read_dataset(path)
    assert [c.name for c in ds.cases] == NAMES[:2]
    assert ds.cases[0].images[0] == mini / "imagesTr" / f"{NAMES[0]}.nii.gz"
    check_dataset(ds, expected_channels=1)


def _rewrite_label(mini, name, fn):
    path = mini / "labelsTr" / f"{name}.nii.gz"
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    new = fn(arr, img)
    sitk.WriteImage(new, str(path))


def _with_array(arr, img):
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out


@pytest.mark.parametrize("problem, edit, message", [
    ("geometry", lambda a, img: (lambda o: (o.SetSpacing((1.0, 1.0, 2.0)), o)[1])(_with_array(a, img)),
     r"case hippocampus_165: label geometry differs from image hippocampus_165.nii.gz \(spacing"),
    ("size", lambda a, img: sitk.GetImageFromArray(a[:-1]),
     r"case hippocampus_165: label geometry differs .*size"),
    ("values", lambda a, img: _with_array(np.where(a == 2, 5, a).astype(a.dtype), img),
     r"case hippocampus_165: label values \[5\] not in the class list \(0..2: background, anterior, posterior\)"),
    ("empty", lambda a, img: _with_array(np.zeros_like(a), img),
     r"case hippocampus_165: empty label map"),
])
def test_bad_labels_name_case_and_problem(mini, problem, edit, message):
    _rewrite_label(mini, "hippocampus_165", edit)
    with pytest.raises(InputError, match=message):
        check_dataset(read_dataset(mini))


def test_missing_image_and_too_few_cases(mini):
    (mini / "imagesTr" / "hippocampus_221.nii.gz").unlink()
    with pytest.raises(InputError, match="case hippocampus_221: label hippocampus_221.nii.gz has no image"):
        read_dataset(mini)
    for n in NAMES[1:]:
        (mini / "labelsTr" / f"{n}.nii.gz").unlink()
    with pytest.raises(InputError, match="1 case.*at least 2"):
        check_dataset(read_dataset(mini))


def test_cli_reports_bad_input_in_one_line_before_training(mini, tmp_path, capsys):
    _rewrite_label(mini, "hippocampus_319", lambda a, img: _with_array(np.zeros_like(a), img))
    out = tmp_path / "model"
    assert main(["finetune", str(mini), "-o", str(out), "--scratch", "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["segbook finetune: error: case hippocampus_319: empty label map (background only)"]
    assert not (out / "training" / "checkpoint.pt").exists()


def test_cli_channel_count_against_a_four_channel_base(mini, tmp_path, capsys):
    # BraTS STU-Net takes 4 channels; the check runs before any download is tried
    assert main(["finetune", str(mini), "-o", str(tmp_path / "m"), "--base", "brats21-stunet-b",
                 "--progress", "none"]) == 2
    assert "case hippocampus_149: 1 image channel(s), the base model takes 4" in capsys.readouterr().err


def test_plan_matches_nnunet_for_hippocampus():
    # nnU-Net v2's 3d_fullres plan for Task04 is patch 40x56x40 with three pools of 2 on each axis
    plan = plan_from_data([[1.0, 1.0, 1.0]] * 5, [[36, 50, 35]] * 5)
    assert plan.spacing == [1.0, 1.0, 1.0]
    assert plan.patch_size == [40, 56, 40]
    assert plan.pool_op_kernel_sizes == [[2, 2, 2]] * 3 + [[1, 1, 1]] * 2
    assert deep_supervision_scales(plan.pool_op_kernel_sizes) == [[1.0] * 3, [0.5] * 3, [0.25] * 3,
                                                                    [0.125] * 3, [0.125] * 3]


def test_plan_budget_divisibility_and_anisotropy():
    big = plan_from_data([[1.5, 1.5, 1.5]] * 3, [[300, 300, 300]] * 3, max_voxels=128 ** 3)
    assert np.prod(big.patch_size) <= 128 ** 3
    assert big.patch_size == [128, 128, 128] and big.pool_op_kernel_sizes == [[2, 2, 2]] * 5
    aniso = plan_from_data([[5.0, 0.8, 0.8]] * 3, [[30, 400, 400]] * 3)
    div = np.prod(np.array(aniso.pool_op_kernel_sizes), axis=0)
    assert all(p % d == 0 for p, d in zip(aniso.patch_size, div))
    assert aniso.pool_op_kernel_sizes[0] == [1, 2, 2]          # the coarse axis is not pooled first
    assert len(pools_for_patch([16, 24, 16], [1, 1, 1])) == 5
