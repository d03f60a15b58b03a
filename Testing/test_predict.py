"""The Predictor against nnU-Net v2: export resampling, and whole predictions with the same weights."""
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from segbook.config import Arch, ModelConfig, Plan
from segbook.errors import InputError
from segbook.export import SlabExporter, first_argmax, resample_plane
from segbook.inference import Predictor
from segbook.zoo import create_model, save_model_folder

sys.path.insert(0, str(Path(__file__).parent))
try:
    from nnunetv2.preprocessing.resampling import default_resampling as nn_rs
except ImportError:  # the tests that use it are marked nnunet: they skip visibly without it
    nn_rs = None

DATA = Path(__file__).parent / "data"
CLASSES = ["background", "liver", "spleen", "kidney_left", "aorta"]


def tiny_config(patch=(32, 48, 48), classes=CLASSES, channels=1) -> ModelConfig:
    return ModelConfig(name="tiny-predict", arch=Arch(channels, len(classes), [4, 8, 8, 16], [1, 1, 1, 1],
                                                      [[2, 2, 2], [2, 2, 2], [1, 2, 2]]),
                       plan=Plan(spacing=[1.5, 1.5, 1.5], patch_size=list(patch)), class_names=list(classes))


def tiny_net(seed=0, **kw):
    torch.manual_seed(seed)
    net = create_model_from(tiny_config(**kw))
    return net


def create_model_from(config, deep_supervision=False):
    from segbook.zoo import _network
    net = _network(config, deep_supervision)
    # Random init gives near-uniform logits; scale the head so that classes differ clearly (as trained nets).
    with torch.no_grad():
        net.seg_outputs[-1].weight.mul_(20)
        net.seg_outputs[-1].bias.zero_()
    net.config = config
    return net


def ct_crop():
    img = sitk.ReadImage(str(DATA / "abdomen_ct_3mm_crop.nii.gz"))
    return sitk.GetArrayFromImage(img).astype(np.float32)[None], img


# ------------------------------------------------------------------ export
@pytest.mark.nnunet
@pytest.mark.parametrize("case", ["linear", "coarse_z", "coarse_x", "identity"])
def test_slab_export_equals_nnunet_resampling_and_argmax(case):
    rng = np.random.default_rng(1)
    src, dst, cur, new = {
        "linear": ((20, 18, 16), (10, 9, 8), (1.5, 1.5, 1.5), (3.0, 3.0, 3.0)),
        "coarse_z": ((25, 14, 15), (9, 27, 29), (1.5, 1.5, 1.5), (4.2, 0.78, 0.78)),
        "coarse_x": ((14, 15, 25), (27, 29, 9), (1.5, 1.5, 1.5), (0.78, 0.78, 4.2)),
        "identity": ((12, 13, 14), (12, 13, 14), (1.5, 1.5, 1.5), (1.5, 1.5, 1.5)),
    }[case]
    logits16 = rng.normal(size=(6, *src)).astype(np.float16)     # the sliding window's float16 logits
    logits = logits16.astype(np.float32)
    ref = nn_rs.resample_data_or_seg_to_shape(logits16, dst, cur, new, is_seg=False, order=1, order_z=0,
                                              force_separate_z=None)
    assert ref.dtype == np.float16                               # nnU-Net rounds before its argmax
    ref_labels = torch.from_numpy(ref).argmax(0).numpy()
    from segbook.preprocess import separate_axis
    axis = separate_axis(cur, new)
    out = np.zeros(dst, np.uint8)
    exporter = SlabExporter(src, out, ["nearest" if a == axis else "linear" for a in range(3)],
                            np.arange(6), chunk_voxels=6 * 40 * 30 * 2)
    z, t = 0, torch.from_numpy(logits)
    for n in [3, 1, 5, 2, 7, 100]:          # ragged slabs, as the sliding window delivers them
        if z < src[0]:
            exporter.feed(z, t[:, z:z + n])
            z += min(n, src[0] - z)
    assert exporter.complete
    assert (out == ref_labels).mean() >= 0.9999       # float32 vs nnU-Net's float64 interpolation
    # the resampled values themselves
    if case == "linear":
        from segbook.export import resample_axis
        ours = resample_plane(resample_axis(t, 1, dst[0], "linear"), dst[1:], ("linear", "linear"))
        ref32 = nn_rs.resample_data_or_seg_to_shape(logits, dst, cur, new, is_seg=False, order=1, order_z=0,
                                                    force_separate_z=None)
        np.testing.assert_allclose(ours.numpy(), ref32, atol=1e-5)



@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_first_argmax_is_torch_argmax_with_ties_to_the_first_class(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (9, 3, 17, 5), generator=g).to(dtype)     # many ties among few values
    x[:, 0, 0, 0] = 2                                                  # every class tied: class 0
    x[5, 1, 2, 3], x[7, 1, 2, 3] = 9, 9                                # two tied maxima: the first, 5
    ours = first_argmax(x)
    assert torch.equal(ours.long(), x.argmax(0))
    assert ours[0, 0, 0] == 0 and ours[1, 2, 3] == 5


@pytest.mark.parametrize("modes,keep", [(["linear"] * 3, (7, 19)), (["nearest", "linear", "linear"], (0, 5)),
                                        (["linear"] * 3, (38, 40)), (["linear"] * 3, (0, 40))])
def test_exporter_keeps_only_the_asked_slices_from_the_slabs_they_need(modes, keep):
    """An ROI's export: the kept slices equal the whole export's, only the source slices they interpolate are
    fed (ragged slabs), and nothing else is written."""
    rng = np.random.default_rng(1)
    src, dst = (23, 17, 19), (40, 30, 9)
    logits = torch.from_numpy(rng.normal(size=(6, *src)).astype(np.float32))
    whole = np.zeros(dst, np.uint8)
    full = SlabExporter(src, whole, modes, np.arange(6))
    full.feed(0, logits)
    part = np.full(dst, 255, np.uint8)
    exporter = SlabExporter(src, part, modes, np.arange(6), keep_z=keep)
    lo, hi = exporter.source_range
    assert 0 <= lo < hi <= src[0] and (keep == (0, 40) or hi - lo < src[0])
    z = lo
    for n in [1, 3, 2, 100]:
        if z < hi:
            exporter.feed(z, logits[:, z:min(z + n, hi)])
            z = min(z + n, hi)
    assert exporter.complete
    np.testing.assert_array_equal(part[keep[0]:keep[1]], whole[keep[0]:keep[1]])
    assert (np.delete(part, np.s_[keep[0]:keep[1]], axis=0) == 255).all()


# ------------------------------------------------------------------ whole prediction
@pytest.mark.nnunet
@pytest.mark.parametrize("spacing,tta", [((3.0, 3.0, 3.0), False), ((3.3, 1.0, 1.0), True)])
def test_predict_array_equals_nnunet_predictor(spacing, tta):
    from nnunet_reference import nnunet_predictor, nnunet_segment
    net = tiny_net()
    image, _ = ct_crop()
    ref = nnunet_segment(nnunet_predictor(net, tta=tta), image, spacing)
    labels = Predictor(net, device="cpu", tta=tta).predict_array(image, spacing)
    assert labels.shape == image.shape[1:] and labels.dtype == np.uint8
    assert len(np.unique(ref)) >= 2
    agreement = (labels == ref).mean()
    print(f"agreement {agreement:.6f}, classes {np.bincount(ref.ravel())}")
    assert agreement >= 0.999, agreement


def test_predict_array_crops_to_nonzero_and_pads_small_images():
    net = tiny_net()
    image, _ = ct_crop()
    image = image[:, :12, :20, :16] + 1000         # smaller than a patch: padded
    framed = np.pad(image, [(0, 0), (3, 2), (1, 4), (5, 0)])
    p = Predictor(net, device="cpu")
    inner = p.predict_array(image, (3.0, 3.0, 3.0))
    labels = p.predict_array(framed, (3.0, 3.0, 3.0))
    assert (labels[3:-2, 1:-4, 5:] == inner).all()   # the zero frame is cropped away, then put back
    assert labels[:3].max() == 0 and labels[-2:].max() == 0


def test_roi_and_classes():
    net = tiny_net()
    image, _ = ct_crop()
    p = Predictor(net, device="cpu")
    full = p.predict_array(image, (3.0, 3.0, 3.0))
    roi = (5, 10, 12, 25, 40, 50)
    part = p.predict_array(image, (3.0, 3.0, 3.0), roi=roi)
    inside = (slice(5, 25), slice(10, 40), slice(12, 50))
    outside = np.ones(full.shape, bool)
    outside[inside] = False
    assert part[outside].max() == 0
    # exactly the prediction of the box grown by ROI_CONTEXT (0.25) of the patch on each side, in mm at the
    # plan spacing: 0.25 x (32, 48, 48) x 1.5 mm = (12, 18, 18) mm = (4, 6, 6) voxels at 3 mm
    grown = p.predict_array(image[:, 1:29, 4:46, 6:56], (3.0, 3.0, 3.0))
    np.testing.assert_array_equal(part[inside], grown[4:24, 6:36, 6:44])
    # against the whole image only near: the crop's own z-score statistics and tile grid differ, and this
    # random network's labels swing with them (measured 0.93); a trained network agrees far more
    assert (part[inside] == full[inside]).mean() > 0.9
    kept = p.predict_array(image, (3.0, 3.0, 3.0), classes=["liver", "aorta"])
    np.testing.assert_array_equal(kept, np.where(np.isin(full, [1, 4]), full, 0))
    with pytest.raises(InputError, match="not an output"):
        p.predict_array(image, (3.0, 3.0, 3.0), classes=["brain"])
    with pytest.raises(InputError, match="outside"):
        p.predict_array(image, (3.0, 3.0, 3.0), roi=(40, 0, 0, 50, 5, 5))


def test_training_network_is_left_as_it_was():
    torch.manual_seed(0)
    net = create_model_from(tiny_config(), deep_supervision=True)
    net.train()
    image, _ = ct_crop()
    labels = Predictor(net).predict_array(image[0], (3.0, 3.0, 3.0))
    assert net.training and net.deep_supervision
    net.deep_supervision = False
    assert (Predictor(net).predict_array(image, (3.0, 3.0, 3.0)) == labels).all()


def test_model_folder_and_bad_arrays(tmp_path):
    net = tiny_net()
    folder = save_model_folder(tmp_path / "m", net.config, net.state_dict())
    p = Predictor(str(folder), device="cpu")
    assert p.config.class_names == CLASSES
    image, _ = ct_crop()
    # the folder's network runs with the channels-last CPU layers, the module handed in as it is
    assert (p.predict_array(image, (3, 3, 3)) == Predictor(net).predict_array(image, (3, 3, 3))).mean() > 0.999
    with pytest.raises(InputError, match="constant"):
        p.predict_array(np.full((20, 30, 30), 7.0), (1, 1, 1))
    with pytest.raises(InputError, match="channel"):
        p.predict_array(np.ones((2, 20, 30, 30)), (1, 1, 1))
    with pytest.raises(InputError, match="spacing"):
        p.predict_array(image, (0, 1, 1))


def test_cancel_stops_prediction():
    """Cancel asked (as from another thread) once the first tile is done: the tile running then finishes and
    no further tile is computed. The crop is 30x48x56 voxels at 3 mm, 60x96x112 at the plan's 1.5 mm: with
    patch 32x48x48 and half-patch steps, 3 x 3 x 4 = 36 tiles."""
    from segbook.errors import Cancelled
    from segbook.events import Reporter

    class CancelAfterFirstTile(Reporter):
        totals = []

        def emit(self, event):
            if event.get("stage") == "predict":
                self.totals.append(event["total"])
                if event["done"] == 1:
                    self.cancel()         # seen at the next check, not in this call

    image, _ = ct_crop()
    reporter = CancelAfterFirstTile()
    p = Predictor(tiny_net(), reporter=reporter)
    tiles, run_tile = [], p._predict_tile
    p._predict_tile = lambda tile: (tiles.append(tile.shape), run_tile(tile))[1]
    with pytest.raises(Cancelled):
        p.predict_array(image, (3, 3, 3))
    assert set(reporter.totals) == {36}
    assert len(tiles) == 2 and set(tiles) == {(1, 32, 48, 48)}


def test_cpu_fast_layers_give_the_same_logits():
    from segbook.cpu_fast import ChannelsLastInstanceNorm3d, PointwiseConv3d, optimize_for_cpu
    net = tiny_net()
    fast = optimize_for_cpu(net)
    assert any(isinstance(m, ChannelsLastInstanceNorm3d) for m in fast.modules())
    assert any(isinstance(m, PointwiseConv3d) and m.stride != (1, 1, 1) for m in fast.modules())
    x = torch.randn(1, 1, 32, 48, 48)
    with torch.inference_mode():
        ref, out = net(x), fast(x.contiguous(memory_format=torch.channels_last_3d))
        also = fast(x)            # a contiguous input falls back to the original layers
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(also, ref, rtol=1e-4, atol=1e-4)
    assert isinstance(net.conv_blocks_context[0][0].norm1, torch.nn.InstanceNorm3d)   # original untouched


def test_float16_overflow_of_the_logits_is_an_error_not_a_label_map():
    """As nnU-Net: logits beyond float16's range (65504) in the accumulator stop the prediction."""
    net = tiny_net()
    image, _ = ct_crop()
    with torch.no_grad():
        for layer in net.seg_outputs:
            layer.weight.mul_(1e7)
            layer.bias.fill_(1e5)
    with pytest.raises(RuntimeError, match="float16 overflow"):
        Predictor(net, device="cpu").predict_array(image, (3.0, 3.0, 3.0))
