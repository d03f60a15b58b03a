"""Partly annotated cases from the Slicer panel's logic (slicer-core, real MRML scene, real worker): "only
the slices I annotated", scribbles with an explicit background segment, and the adapt loop."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

try:
    import slicer
except ImportError:  # every test here is marked slicer: they skip visibly without slicer-core
    slicer = None
pytestmark = pytest.mark.slicer

from slicer_fixtures import IMAGE, IMAGE2, LABEL, LABEL2, load_label_segmentation, load_volume, make_tiny_model  # noqa: E402
from SegBookLib.FineTuneLogic import FineTuneLogic, timeLeft  # noqa: E402
from SegBookLib.TrainingSet import TrainingSetError, annotationNote, sliceAxis, sparseLabels  # noqa: E402
from SegBookLib.Parameters import FineTuneParameters  # noqa: E402

NAMES = {1: "anterior", 2: "posterior"}


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


def _label_file(tmp_path, source, keep, name) -> Path:
    """`source` with only the voxels where keep(array) is True left; a file Slicer reads."""
    img = sitk.ReadImage(str(source))
    seg = sitk.GetArrayFromImage(img)
    out = sitk.GetImageFromArray(np.where(keep(seg), seg, 0).astype(seg.dtype))
    out.CopyInformation(img)
    path = tmp_path / f"{name}.nii.gz"
    sitk.WriteImage(out, str(path))
    return path


def _slices(*ks):
    def keep(seg):
        mask = np.zeros(seg.shape, bool)
        mask[list(ks)] = True
        return mask
    return keep


def test_slice_axis_follows_the_view_orientation():
    # hippocampus files: i along -R, j along -A, k along S -> axial slices are array axis 0
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    assert [sliceAxis(flip, o) for o in ("Axial", "coronal", "Sagittal")] == [0, 1, 2]
    # a volume stored as coronal slices (k along A, j along S)
    coronal = np.array([[1, 0, 0, 0], [0, 0, 2.5, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)
    assert [sliceAxis(coronal, o) for o in ("axial", "coronal", "sagittal")] == [1, 0, 2]
    with pytest.raises(TrainingSetError, match="unknown view orientation 'oblique'"):
        sliceAxis(flip, "oblique")


def test_sparse_labels_whole_slices_or_painted_voxels():
    labels = np.zeros((4, 3, 3), np.uint8)
    labels[1, 1, 1], labels[3, 0, 2] = 1, 2
    out, n = sparseLabels(labels, 0, 3)
    assert n == 2 and (out[[0, 2]] == 3).all() and np.array_equal(out[[1, 3]], labels[[1, 3]])
    background = np.zeros(labels.shape, bool)
    background[2, 2, 2] = True
    out, n = sparseLabels(labels, 0, 3, background)
    assert n == 3 and out[2, 2, 2] == 0 and out[1, 1, 1] == 1 and (out == 3).sum() == labels.size - 3


def test_only_the_annotated_slices_are_the_annotation(scene, tmp_path):
    from segbook.dataset import check_dataset, read_dataset
    ft = FineTuneLogic(tmp_path / "training", tmp_path / "models")
    full = sitk.GetArrayFromImage(sitk.ReadImage(str(LABEL)))
    ks = [k for k in range(full.shape[0]) if full[k].any()]
    chosen = [ks[len(ks) // 4], ks[len(ks) // 2], ks[3 * len(ks) // 4]]
    volume = load_volume(scene, IMAGE, "one")
    sparse = load_label_segmentation(scene, _label_file(tmp_path, LABEL, _slices(*chosen), "three"), volume, NAMES)
    entry = ft.addCase(volume, sparse, onlyAnnotatedSlices=True, orientation="Axial")
    assert entry["annotated_slices"] == 3 and entry["slices"] == full.shape[0] and not entry["scribbles"]
    assert "annotated: 3 of" in annotationNote(entry) and "axial slices" in annotationNote(entry)
    dataset = json.loads((tmp_path / "training" / "dataset.json").read_text())
    assert dataset["ignore"] == 3 and dataset["class_names"] == ["background", "anterior", "posterior"]
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "training" / entry["label"])))
    assert np.array_equal(written[chosen], full[chosen])       # whole slices: structures and background
    others = [k for k in range(full.shape[0]) if k not in chosen]
    assert (written[others] == 3).all()
    # a fully annotated case joins the same set; the core reads the set and accepts it
    v2 = load_volume(scene, IMAGE2, "two")
    entry2 = ft.addCase(v2, load_label_segmentation(scene, LABEL2, v2, NAMES))
    assert annotationNote(entry2) == " [all slices]"
    ds = read_dataset(tmp_path / "training" / "dataset.json")
    assert ds.ignore_label == 3 and ds.num_classes == 3
    check_dataset(ds, expected_channels=1)
    # a class appended later moves the ignore value up to stay above the last class; the labels follow
    v3 = load_volume(scene, IMAGE2, "three")
    ft.addCase(v3, load_label_segmentation(scene, LABEL2, v3, {1: "anterior", 2: "tail"}), missingAsBackground=True)
    dataset = ft.dataset()
    assert dataset["ignore"] == 4 and dataset["class_names"][-1] == "tail"
    moved = next(c for c in dataset["cases"] if c["name"] == entry["name"])
    again = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "training" / moved["label"])))
    assert np.array_equal(again == 4, written == 3) and np.array_equal(again[chosen], full[chosen])
    assert not (tmp_path / "training" / entry["label"]).exists()          # the old file is gone
    check_dataset(read_dataset(tmp_path / "training" / "dataset.json"), expected_channels=1)
    ft.removeCase(entry["name"])
    assert "ignore" not in ft.dataset()


def test_scribbles_with_an_explicit_background_segment(scene, tmp_path):
    from scipy import ndimage
    ft = FineTuneLogic(tmp_path / "training", tmp_path / "models")
    img = sitk.ReadImage(str(LABEL))
    full = sitk.GetArrayFromImage(img)
    # strokes inside each structure (its eroded core, not filling it) and a background stroke
    strokes = np.zeros_like(full)
    for c in (1, 2):
        strokes[ndimage.binary_erosion(full == c, iterations=2)] = c
    band = ndimage.binary_dilation(full > 0, iterations=3) & ~ndimage.binary_dilation(full > 0, iterations=2)
    strokes[band] = 3
    out = sitk.GetImageFromArray(strokes)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(tmp_path / "strokes.nii.gz"))
    volume = load_volume(scene, IMAGE, "one")
    seg = load_label_segmentation(scene, tmp_path / "strokes.nii.gz", volume, {**NAMES, 3: "Background"})
    entry = ft.addCase(volume, seg, onlyAnnotatedSlices=True)
    assert entry["scribbles"] and entry["classes_present"] == ["anterior", "posterior"]
    assert ft.classNames() == ["background", "anterior", "posterior"]       # "Background" is no class
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "training" / entry["label"])))
    assert np.array_equal(written == 0, strokes == 3)
    assert np.array_equal(written == 1, strokes == 1) and np.array_equal(written == 2, strokes == 2)
    assert np.array_equal(written == 3, strokes == 0)          # everything unpainted is not annotated
    assert "scribbles on" in annotationNote(entry)


FAST = ["--patch-size", "32", "32", "32", "--batch-size", "1", "--num-workers", "0", "--threads", "1"]


def test_adapt_loop_on_sparse_cases_in_a_worker(scene, tmp_path):
    """Two rounds of the panel's loop on partly annotated cases through the real worker: the second
    round continues from the first round's model, and the run says how long it will take."""
    ft = FineTuneLogic(tmp_path / "training", tmp_path / "models")
    base = make_tiny_model(tmp_path / "base", classes=["background", "liver", "spleen"], name="base", stages=6)
    for image, label, name in ((IMAGE, LABEL, "one"), (IMAGE2, LABEL2, "two")):
        volume = load_volume(scene, image, name)
        ks = np.flatnonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(label))).any((1, 2)))
        sparse = _label_file(tmp_path, label, _slices(*ks[[len(ks) // 3, 2 * len(ks) // 3]]), name)
        ft.addCase(volume, load_label_segmentation(scene, sparse, volume, NAMES), onlyAnnotatedSlices=True)
    params = FineTuneParameters(base=str(base), outputName="loop", preset="adapt", device="cpu", epochs=1,
                                iterationsPerEpoch=7, valFraction=0, extraArguments=FAST)
    rounds = []
    for _ in range(2):
        events = []
        ft.start(params)
        final = ft.wait(timeout=300, onEvent=events.append)
        assert final["ok"], final
        rounds.append(events)
    folder = Path(final["model"])
    config = json.loads((folder / "model.json").read_text())
    assert config["class_names"] == ["background", "anterior", "posterior"] and config["arch"]["num_classes"] == 3
    assert config["provenance"]["heads"] == "kept (same classes as the base)"      # round 2 started from round 1
    assert json.loads((folder / "training" / "config.json").read_text())["base"] == \
        str(folder / "training" / "previous")
    for events in rounds:
        estimates = [e for e in events if e.get("event") == "estimate"]
        assert len(estimates) == 1 and estimates[0]["seconds_per_iteration"] > 0
