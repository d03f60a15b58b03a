"""The released STU-Nets' registry records against the official nnU-Net v1 plan files (not against
segbook's own config): spacing, patch, pools, normalisation, classes and axis order.

The values are a fixture copied once from uni-medical/STU-Net's `plan_files/*_ep4k.model.pkl`
(Testing/data/stunet_official_plans.json; see Testing/data/README.md).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from segbook import zoo

OFFICIAL = json.loads((Path(__file__).parent / "data" / "stunet_official_plans.json").read_text())["models"]
RELEASED = [n for n, c in zoo.REGISTRY.items() if c.hub_repo == "ziyanhuang/STU-Net"]


def test_every_released_checkpoint_has_its_plan_file():
    assert sorted(zoo.REGISTRY[n].hub_filename for n in RELEASED) == sorted(OFFICIAL)


@pytest.mark.parametrize("name", RELEASED)
def test_registry_plan_is_the_official_plan(name):
    cfg = zoo.REGISTRY[name]
    official = OFFICIAL[cfg.hub_filename]
    assert official["trainer"] == f"STUNetTrainer_{ {'S': 'small', 'B': 'base', 'L': 'large', 'H': 'huge'}[cfg.size]}"
    assert cfg.plan.spacing == official["current_spacing"]
    assert cfg.plan.patch_size == official["patch_size"]
    assert cfg.arch.pool_op_kernel_sizes == official["pool_op_kernel_sizes"]
    # 104 foreground classes 1..104 plus background
    assert official["all_classes"] == list(range(1, official["num_classes"] + 1))
    assert cfg.arch.num_classes == official["num_classes"] + 1 == len(cfg.class_names)
    assert cfg.arch.input_channels == official["num_modalities"]
    # nnU-Net v1 "nonCT" without a mask is a z-score over the whole (cropped) image: segbook's "zscore"
    assert official["normalization_schemes"] == {"0": "nonCT"} and official["use_mask_for_norm"] == {"0": False}
    assert cfg.plan.normalization == "zscore" and cfg.plan.ct_intensities is None and cfg.plan.crop_to_nonzero
    # images as stored (no transpose): segbook's io does not reorient either
    assert official["transpose_forward"] == [0, 1, 2]
    # one 3x3x3 stage per level: the stage count the network builds from dims
    assert official["conv_kernel_sizes"] == [[3, 3, 3]] * len(cfg.arch.dims)
