"""STU-Net against the official network: state_dict keys/shapes of all sizes, and forward outputs."""
import json

import numpy as np
import pytest
import torch

import segbook
from segbook.network import STUNET_SIZES, TOTALSEG_POOLS
from conftest import DATA, fixture_config

MANIFEST = json.loads((DATA / "stunet_state_dict_manifest.json").read_text())


@pytest.mark.parametrize("size", ["S", "B", "L", "H"])
def test_state_dict_matches_official_manifest(size):
    ref = MANIFEST["sizes"][size]
    assert STUNET_SIZES[size]["dims"] == ref["dims"] and STUNET_SIZES[size]["depth"] == ref["depth"]
    with torch.device("meta"):  # L and H hold 1.4 GB of weights: shapes only
        net = segbook.STUNet(MANIFEST["input_channels"], MANIFEST["num_classes"], ref["dims"], ref["depth"],
                             MANIFEST["pool_op_kernel_sizes"])
    ours = [(k, list(v.shape)) for k, v in net.state_dict().items()]
    assert ours == [(k, list(s)) for k, s in ref["keys"]]  # same keys, same order, same shapes
    assert sum(p.numel() for p in net.parameters()) == ref["num_params"]


def test_registry_sizes_use_totalseg_plan():
    assert MANIFEST["pool_op_kernel_sizes"] == TOTALSEG_POOLS
    for size in "SBLH":
        cfg = segbook.get_config(f"stunet-{size.lower()}-totalseg")
        assert cfg.arch.dims == MANIFEST["sizes"][size]["dims"]
        assert cfg.arch.num_classes == MANIFEST["num_classes"] == len(cfg.class_names)
        assert cfg.plan.spacing == [1.5, 1.5, 1.5] and cfg.plan.patch_size == [128, 128, 128]
        assert segbook.zoo.num_parameters(cfg) == MANIFEST["sizes"][size]["num_params"]


@pytest.mark.parametrize("name", ["tiny_totalseg_pools", "tiny_deep_multichannel"])
def test_forward_matches_official_outputs(name):
    cfg = fixture_config(name)
    net = segbook.STUNet(cfg["input_channels"], cfg["num_classes"], cfg["dims"], cfg["depth"],
                         cfg["pool_op_kernel_sizes"], deep_supervision=True)
    net.load_state_dict(segbook.load_checkpoint(DATA / f"{name}.model"))
    io = np.load(DATA / f"{name}_io.npz")
    with torch.no_grad():
        outputs = net.eval()(torch.from_numpy(io["input"]))
    heads = sorted(k for k in io.files if k.startswith("output_"))
    assert len(outputs) == len(heads) == len(cfg["pool_op_kernel_sizes"])
    for i, out in enumerate(outputs):
        ref = io[f"output_{i}"]
        assert out.shape == ref.shape
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-4, rtol=0)
    # Without deep supervision the network returns the full-resolution logits alone, unchanged.
    net.deep_supervision = False
    with torch.no_grad():
        np.testing.assert_allclose(net(torch.from_numpy(io["input"])).numpy(), io["output_0"], atol=1e-4, rtol=0)


def test_forward_trains():
    """forward must carry gradients (no inference decorators on it), and they must be the derivatives of the
    output: checked against central finite differences in float64 on weights of the first block, the
    bottleneck and a deep-supervision head."""
    cfg = fixture_config("tiny_totalseg_pools")
    torch.manual_seed(0)
    net = segbook.STUNet(1, 3, cfg["dims"], cfg["depth"], cfg["pool_op_kernel_sizes"]).double()
    x = torch.randn(1, 1, 32, 32, 64, dtype=torch.float64)

    def objective():
        return sum(o.square().mean() for o in net(x))
    objective().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert net.conv_blocks_context[0][0].conv1.weight.grad.abs().sum() > 0
    probes = [(net.conv_blocks_context[0][0].conv1.weight, (0, 0, 1, 1, 1)),
              (net.conv_blocks_context[-1][0].conv1.weight, (1, 2, 0, 1, 2)),
              (net.seg_outputs[0].weight, (2, 1, 0, 0, 0)), (net.seg_outputs[-1].bias, (1,))]
    h = 1e-7         # small: with h = 1e-6 the first probe straddles a kink of the network (off by 1.5 %)
    with torch.no_grad():
        for weight, index in probes:
            value = float(weight[index])
            weight[index] = value + h
            up = float(objective().detach())
            weight[index] = value - h
            down = float(objective().detach())
            weight[index] = value
            numeric = (up - down) / (2 * h)
            assert float(weight.grad[index]) == pytest.approx(numeric, rel=1e-4), (index, numeric)


def test_bad_architecture_is_refused():
    with pytest.raises(ValueError, match="dims"):
        segbook.STUNet(1, 2, [4, 8], [1, 1], TOTALSEG_POOLS)
