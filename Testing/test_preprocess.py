"""Preprocessing against its references: skimage's resize (what nnU-Net calls) and nnU-Net v2's functions."""
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
from skimage.transform import resize

from segbook.config import Plan
from segbook.preprocess import (compute_new_shape, nearest_indices, nonzero_bbox, normalize, preprocess,
                                resample_image, resize_cubic, separate_axis)

try:
    from nnunetv2.preprocessing.resampling import default_resampling as nn_rs
except ImportError:  # the tests that use it are marked nnunet: they skip visibly without it
    nn_rs = None
sys.path.insert(0, str(Path(__file__).parent))

rng = np.random.default_rng(0)


def _smooth(shape):
    """A random but smooth volume (cubic overshoot and clipping both occur)."""
    from scipy.ndimage import gaussian_filter
    return gaussian_filter(rng.normal(size=shape), 1.5).astype(np.float32) * 100


@pytest.mark.parametrize("src,dst", [((9, 11, 13), (18, 22, 26)), ((20, 17, 15), (10, 9, 8)),
                                     ((12, 30, 7), (25, 14, 16)), ((31, 27), (46, 19))])
def test_cubic_equals_skimage_order3(src, dst):
    a = _smooth(src)
    ref = resize(a.astype(np.float64), dst, order=3, mode="edge", anti_aliasing=False)
    out = resize_cubic(a, dst)
    assert out.dtype == np.float32 and out.shape == dst
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(a).max())
    assert out.min() >= a.min() and out.max() <= a.max()      # skimage clips to the input range


@pytest.mark.parametrize("src,dst", [((9, 11, 13), (18, 22, 26)), ((20, 17, 15), (10, 9, 8)),
                                     ((12, 30, 7), (12, 14, 16)), ((31, 27), (46, 19)), ((40,), (97,)),
                                     ((5, 6, 7), (5, 6, 7))])
def test_cubic_is_scipy_zoom_to_float_rounding(src, dst):
    """The axis-by-axis matrices give scipy's n-D zoom itself (what skimage calls), not just something close:
    float32 results equal in almost every voxel and within a few float32 steps elsewhere, an axis kept at
    its size included (scipy still filters it)."""
    from scipy import ndimage
    a = _smooth(src)
    ref = ndimage.zoom(a, [n / s for n, s in zip(dst, src)], order=3, mode="nearest", grid_mode=True,
                       output=np.float32)
    np.clip(ref, a.min(), a.max(), out=ref)
    out = resize_cubic(a, dst)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6 * np.abs(a).max())
    assert (out == ref).mean() > 0.99


def test_nearest_indices_equal_map_coordinates_order0():
    from scipy.ndimage import map_coordinates
    for n_in, n_out in itertools.product([1, 2, 7, 30, 139], [1, 3, 14, 60, 232]):
        x = np.arange(n_in, dtype=float)
        c = float(n_in) / n_out * (np.arange(n_out) + 0.5) - 0.5
        ref = map_coordinates(x, c[None], order=0, mode="nearest")
        np.testing.assert_array_equal(nearest_indices(n_in, n_out), ref.astype(int))


@pytest.mark.nnunet
def test_separate_axis_as_nnunet():
    spacings = [(3, 3, 3), (2.5, 0.76, 0.76), (0.76, 0.76, 2.5), (1.5, 1.5, 1.5), (5, 1, 1), (1, 4, 4),
                (0.8, 3.2, 0.9), (3.1, 1, 1.0), (1, 1, 3.0), (6, 6, 1)]
    for cur, new in itertools.product(spacings, [(1.5, 1.5, 1.5), (3, 0.8, 0.8), (1, 1, 1)]):
        do_sep, axis = nn_rs.determine_do_sep_z_and_axis(None, cur, new)
        assert separate_axis(cur, new) == (axis if do_sep else None), (cur, new)


@pytest.mark.nnunet
def test_new_shape_as_nnunet():
    for shape, spacing in [((139, 512, 512), (2.5, 0.7637, 0.7637)), ((112, 101, 122), (3, 3, 3)),
                           ((21, 33, 47), (1.25, 0.9, 5.01))]:
        ref = nn_rs.compute_new_shape(shape, spacing, (1.5, 1.5, 1.5))
        assert compute_new_shape(shape, spacing, (1.5, 1.5, 1.5)) == tuple(ref)


@pytest.mark.nnunet
@pytest.mark.parametrize("case", ["isotropic", "coarse_z", "coarse_x", "downsample"])
def test_resample_equals_nnunet(case):
    shape, spacing, target = {
        "isotropic": ((10, 12, 14), (3.0, 3.0, 3.0), (1.5, 1.5, 1.5)),
        "coarse_z": ((6, 20, 22), (5.0, 1.0, 1.1), (1.5, 1.5, 1.5)),
        "coarse_x": ((20, 18, 5), (1.0, 0.9, 4.0), (1.5, 1.5, 1.5)),
        "downsample": ((30, 25, 20), (1.0, 0.8, 1.2), (1.5, 1.5, 1.5)),
    }[case]
    data = np.stack([_smooth(shape), _smooth(shape)])
    new_shape = compute_new_shape(shape, spacing, target)
    do_sep, axis = nn_rs.determine_do_sep_z_and_axis(None, spacing, target)
    ref = nn_rs.resample_data_or_seg(data, new_shape, False, axis, 3, do_sep, order_z=0)
    out = resample_image(data, new_shape, separate_axis(spacing, target))
    assert (axis is not None) == (case in ("coarse_z", "coarse_x"))
    assert out.shape == ref.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(data).max())


@pytest.mark.nnunet
def test_nonzero_bbox_equals_nnunet_crop():
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    data = np.zeros((2, 20, 24, 28), np.float32)
    data[0, 3:15, 5:20, 2:9] = 1
    data[0, 6:9, 8:12, 4:6] = 0       # a hole: filled by nnU-Net, inside the box anyway
    data[1, 10:17, 4:6, 20:25] = -3
    _, _, bbox = crop_to_nonzero(data.copy())
    assert nonzero_bbox(data) == [tuple(b) for b in bbox]


@pytest.mark.nnunet
def test_zscore_equals_nnunet():
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization
    img = (rng.normal(size=(1, 13, 17, 19)) * 300 - 500).astype(np.float32)
    ref = ZScoreNormalization(use_mask_for_norm=False, intensityproperties={}, target_dtype=np.float32).run(
        img[0].copy())
    out = normalize(img.copy(), Plan(spacing=[1.5] * 3, patch_size=[64] * 3))
    np.testing.assert_array_equal(out[0], ref)


@pytest.mark.nnunet
def test_ct_normalization_equals_nnunet():
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization
    props = {"mean": 80.0, "std": 150.0, "percentile_00_5": -900.0, "percentile_99_5": 1200.0}
    img = (rng.normal(size=(1, 9, 10, 11)) * 800).astype(np.float32)
    ref = CTNormalization(use_mask_for_norm=False, intensityproperties=props, target_dtype=np.float32).run(
        img[0].copy())
    plan = Plan(spacing=[1.5] * 3, patch_size=[64] * 3, normalization="ct", ct_intensities=props)
    np.testing.assert_allclose(normalize(img.copy(), plan)[0], ref, rtol=1e-6, atol=1e-6)


@pytest.mark.nnunet
@pytest.mark.parametrize("spacing", [(3.0, 3.0, 3.0), (3.0, 0.8, 0.8)])
def test_preprocess_equals_nnunet_default_preprocessor(spacing):
    """The whole chain on a real CT crop (zero border added so that cropping happens) vs nnU-Net v2."""
    import SimpleITK as sitk
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_reference import plans_and_dataset
    from segbook.config import ModelConfig, Arch

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(__file__).parent / "data" /
                                                      "abdomen_ct_3mm_crop.nii.gz"))).astype(np.float32)
    image = np.pad(image[None], [(0, 0), (2, 1), (0, 3), (4, 0)])
    config = ModelConfig(name="t", arch=Arch(1, 2, [4, 8], [1, 1], [[2, 2, 2]]),
                         plan=Plan(spacing=[1.5] * 3, patch_size=[32] * 3), class_names=["bg", "a"])
    plans, dataset = plans_and_dataset(config)
    manager = PlansManager(plans)
    ref, _, props = DefaultPreprocessor(verbose=False).run_case_npy(
        image.copy(), None, {"spacing": list(spacing)}, manager, manager.get_configuration("3d_fullres"), dataset)
    pre = preprocess(image, spacing, config.plan)
    assert pre.bbox == [tuple(b) for b in props["bbox_used_for_cropping"]]
    assert pre.shape_cropped == tuple(props["shape_after_cropping_and_before_resampling"])
    assert pre.data.shape == ref.shape
    np.testing.assert_allclose(pre.data, ref, rtol=0, atol=2e-4)
