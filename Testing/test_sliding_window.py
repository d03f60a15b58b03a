"""Tile placement, Gaussian weights, padding and mirror sets against nnU-Net v2's own functions."""
import itertools

import numpy as np
import pytest
import torch

from segbook.sliding_window import (apply_head, accumulate, compute_steps, gaussian_weights, mirror_axes_sets, padding_for_patch,
                                    tile_starts)

try:
    from nnunetv2.inference import sliding_window_prediction as nn_sw
except ImportError:  # the tests that use it are marked nnunet: they skip visibly without it
    nn_sw = None


@pytest.mark.nnunet
@pytest.mark.parametrize("step", [0.5, 0.33, 0.75, 1.0])
def test_steps_equal_nnunet(step):
    patch = (128, 112, 96)
    for size in itertools.product([128, 129, 160, 191, 224, 300], [112, 150, 259], [96, 97, 244]):
        assert compute_steps(size, patch, step) == nn_sw.compute_steps_for_sliding_window(size, patch, step)


@pytest.mark.nnunet
@pytest.mark.parametrize("shape", [(224, 202, 244), (128, 300, 129), (191, 128, 160)])
def test_tile_order_and_count_as_nnunet(shape):
    """The tiles and their order of nnU-Net's own predictor (`_internal_get_sliding_window_slicers`);
    (224, 202, 244) is the abdomen case of the benchmark."""
    from nnunet_reference import nnunet_predictor
    from segbook.config import Arch, ModelConfig, Plan
    from segbook.network import STUNet
    patch = (128, 128, 128)
    net = STUNet(1, 2, [2, 4], [1, 1], [[2, 2, 2]], deep_supervision=False)
    net.config = ModelConfig(name="t", arch=Arch(1, 2, [2, 4], [1, 1], [[2, 2, 2]]), plan=Plan([1.0] * 3, list(patch)),
                             class_names=["background", "a"])
    slicers = nnunet_predictor(net, step=0.5)._internal_get_sliding_window_slicers(shape)
    assert tile_starts(shape, patch, 0.5) == [tuple(s.start for s in sl[1:]) for sl in slicers]


def test_steps_at_the_edges_and_refusals():
    """Worked by hand: n = ceil((size - patch) / (step x patch)) + 1 tiles, spread evenly from 0 to size - patch
    (one voxel past the patch: 2 tiles 1 apart; 200 = 128 + 72: 3 tiles, 36 apart; step 1: abutting tiles)."""
    patch = (128, 128, 128)
    assert compute_steps(patch, patch, 0.5) == [[0], [0], [0]]
    assert compute_steps((128, 129, 200), patch, 0.5) == [[0], [0, 1], [0, 36, 72]]
    assert compute_steps((256, 128, 130), patch, 1.0) == [[0, 128], [0], [0, 2]]
    with pytest.raises(ValueError, match=r"image \(128, 100, 128\) smaller than the patch \(128, 128, 128\)"):
        compute_steps((128, 100, 128), patch, 0.5)
    for bad in (0, -0.5, 1.01):
        with pytest.raises(ValueError, match=r"step must be in \(0, 1\]"):
            compute_steps(patch, patch, bad)


@pytest.mark.nnunet
@pytest.mark.parametrize("patch", [(128, 128, 128), (64, 80, 48), (7, 9, 11)])
def test_gaussian_equals_nnunet_float16(patch):
    ref = nn_sw.compute_gaussian(patch, sigma_scale=1 / 8, value_scaling_factor=10, dtype=torch.float16,
                                 device=torch.device("cpu")).numpy()
    ours = gaussian_weights(patch)
    assert ours.dtype == np.float16
    np.testing.assert_array_equal(ours, ref)
    assert ours.min() > 0
    assert ours.max() == np.float16(10)


@pytest.mark.nnunet
def test_gaussian_equals_nnunet_float32_unscaled():
    patch = (96, 96, 96)
    ref = nn_sw.compute_gaussian(patch, sigma_scale=1 / 8, value_scaling_factor=1, dtype=torch.float32,
                                 device=torch.device("cpu")).numpy()
    np.testing.assert_array_equal(gaussian_weights(patch, value_scaling_factor=1, dtype=np.float32), ref)


@pytest.mark.nnunet
def test_padding_centred_as_pad_nd_image():
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    shape, patch = (37, 128, 200), (128, 128, 128)
    pads = padding_for_patch(shape, patch)
    ref, slicer = pad_nd_image(torch.zeros((1, *shape)), patch, "constant", {"value": 0}, True, None)
    assert [(s.start, ref.shape[i + 1] - s.stop) for i, s in enumerate(slicer[1:])] == pads


def test_mirror_sets_are_all_eight_flips_in_nnunet_order():
    sets = mirror_axes_sets([2, 3, 4])
    assert len(sets) == 8 and sets[0] == ()
    assert sets[1:] == [c for i in range(3) for c in itertools.combinations([2, 3, 4], i + 1)]


@pytest.mark.parametrize("shape", [(7, 20, 24, 24), (3, 13, 9, 31)])   # depths that are and are not multiples of 8
def test_accumulation_rounds_exactly_as_nnunet(shape):
    """The blocked float16 accumulation equals nnU-Net's `prediction *= gaussian; logits[sl] += prediction` bit
    for bit, on a strided window of a larger accumulator (as the Predictor uses it), over several adds."""
    g = torch.Generator().manual_seed(0)
    k, z, y, x = shape
    gauss = torch.from_numpy(gaussian_weights((z, y, x))).float()
    ours = (torch.randn((k, z, y + 5, x + 3), generator=g) * 30).half()
    ref = ours.clone()
    window = (slice(None), slice(None), slice(2, 2 + y), slice(1, 1 + x))
    for _ in range(3):
        pred = torch.randn((k, z, y, x), generator=g) * 30
        accumulate(ours[window], pred.clone(), gauss)
        nn_pred = pred.clone()
        nn_pred *= gauss
        ref[window] += nn_pred
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("shape", [(7, 4, 9, 6), (105, 3, 16, 16)])
def test_accumulation_through_the_head_equals_accumulating_its_logits(shape):
    """With a runner's head the logits are computed slice by slice inside the accumulation: the result is
    bit for bit that of accumulating the head's logits of the whole tile as nnU-Net does."""
    g = torch.Generator().manual_seed(1)
    k, z, y, x = shape
    f = 16
    gauss = torch.from_numpy(gaussian_weights((z, y, x))).float()
    head = (torch.randn((k, f), generator=g), torch.randn(k, generator=g))
    ours = (torch.randn((k, z, y + 5, x + 3), generator=g) * 30).half()
    ref = ours.clone()
    window = (slice(None), slice(None), slice(2, 2 + y), slice(1, 1 + x))
    for _ in range(2):
        features = torch.randn((f, z, y, x), generator=g) * 3
        accumulate(ours[window], features, gauss, head)
        logits = apply_head(features, head)
        assert torch.allclose(logits, torch.einsum("kf,fzyx->kzyx", head[0], features) + head[1][:, None, None, None],
                              atol=1e-4, rtol=1e-5)
        logits *= gauss
        ref[window] += logits
    assert torch.equal(ours, ref)
