"""Models that take prompts: the zero start, the simulated user in training, the loss, the model folder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import run_cli
from segbook.clicks import dice
from segbook.inference import Predictor
from segbook.interactive import InteractiveSession
from segbook.io import read_image, read_labels
from segbook.prompts import CHANNELS, PromptSpec
from segbook.training.loss import DeepSupervisionLoss, DiceCELoss
from segbook.training.model_init import build_network
from segbook.training.prompting import FOCUS_RADIUS, FOCUS_WEIGHT, PromptedLoss, PromptSimulator, class_vs_rest
from segbook.zoo import create_model

MINI = Path(__file__).parent / "data" / "hippocampus_mini"
POOLS = [[2, 2, 2]] * 3 + [[1, 1, 1]] * 2       # the shipped model's


def test_prompt_channels_added_to_a_base_start_from_its_exact_output():
    base = create_model("hippocampus-demo").eval()
    base.deep_supervision = True
    net, _, info = build_network("hippocampus-demo", base.config.class_names, 1, POOLS, prompts=True)
    assert net.input_channels == 1 + len(CHANNELS) and net.prompts == {"channels": list(CHANNELS), "radius": 2.0}
    assert info["heads"].startswith("kept") and info["prompt_channels"] == "added with zero weights"
    x = torch.randn(1, 1, 40, 56, 40)
    with torch.no_grad():
        expected = base(x)
        got = net.eval()(torch.cat([x, torch.zeros(1, len(CHANNELS), 40, 56, 40)], 1))
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_class_vs_rest_is_the_class_probability_against_all_others():
    logits = torch.randn(3, 4, 5, 6, 7, requires_grad=True)
    classes = torch.tensor([1, 3, 2])
    two = class_vs_rest(logits, classes)
    p = torch.softmax(logits, 1)
    own = torch.stack([p[i, c] for i, c in enumerate(classes)])
    assert torch.allclose(torch.softmax(two, 1)[:, 1], own, atol=1e-6)
    two.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_prompted_loss_is_the_automatic_loss_and_a_binary_one_by_share():
    torch.manual_seed(0)
    outputs = [torch.randn(4, 3, 8, 8, 8), torch.randn(4, 3, 4, 4, 4)]
    targets = [torch.randint(0, 3, (4, 1, 8, 8, 8)), torch.randint(0, 3, (4, 1, 4, 4, 4))]
    loss = PromptedLoss(lambda ignore: DeepSupervisionLoss(2, ignore_label=ignore), None)
    automatic = DeepSupervisionLoss(2)
    none = torch.zeros(4, dtype=torch.long)
    assert torch.allclose(loss(outputs, targets, none), automatic(outputs, targets))
    classes = torch.tensor([0, 2, 0, 1])
    sel = classes > 0

    def two_class(o):
        """[log(1 - p_c), log p_c] of each prompted sample, p from numpy's softmax in float64: a two-class
        problem whose softmax is (not c, c), written out without the code's class_vs_rest."""
        z = o[sel].double().numpy()
        p = np.exp(z - z.max(1, keepdims=True))
        p = p / p.sum(1, keepdims=True)
        pc = np.stack([p[i, c] for i, c in enumerate(classes[sel].tolist())])
        return torch.from_numpy(np.stack([np.log1p(-pc), np.log(pc)], 1)).float()
    binary = DeepSupervisionLoss(2, ignore_label=2)
    expected = 0.5 * automatic([o[~sel] for o in outputs], [t[~sel] for t in targets]) + 0.5 * binary(
        [two_class(o) for o in outputs], [(t[sel] == classes[sel][:, None, None, None, None]).long() for t in targets])
    assert torch.allclose(loss(outputs, targets, classes), expected, rtol=1e-5, atol=1e-6)
    # the binary target is the class alone: other classes and background are both "not it"
    only = DiceCELoss(ignore_label=2)(class_vs_rest(outputs[0][1:2], classes[1:2]),
                                      (targets[0][1:2] == 2).long())
    assert torch.allclose(PromptedLoss(lambda i: DeepSupervisionLoss(1, ignore_label=i), None)(
        [outputs[0][1:2]], [targets[0][1:2]], classes[1:2]), only)


def test_the_prompted_loss_adds_the_cross_entropy_near_the_clicks():
    torch.manual_seed(1)
    outputs = [torch.randn(3, 3, 8, 8, 8, requires_grad=True), torch.randn(3, 3, 4, 4, 4)]
    targets = [torch.randint(0, 3, (3, 1, 8, 8, 8)), torch.randint(0, 3, (3, 1, 4, 4, 4))]
    classes = torch.tensor([2, 0, 1])
    loss = PromptedLoss(lambda ignore: DeepSupervisionLoss(2, ignore_label=ignore), None)
    focus = torch.zeros(3, 8, 8, 8, dtype=torch.bool)
    plain = loss(outputs, targets, classes)
    assert torch.equal(loss(outputs, targets, classes, focus), plain)        # no focus voxel: the same loss
    focus[0, 2:5, 2:5, 2:5] = True
    focus[1] = True                 # not prompted: its focus must not count
    focus[2, 6:, 6:, 6:] = True
    # the expected term, from the class's probability against the rest in float64 numpy
    ce = []
    for i in (0, 2):
        z = outputs[0][i].detach().double().numpy()
        p = np.exp(z - z.max(0)) / np.exp(z - z.max(0)).sum(0)
        pc = p[int(classes[i])]
        inside = (targets[0][i, 0] == classes[i]).numpy()
        voxel_ce = -np.where(inside, np.log(pc), np.log1p(-pc))
        ce.append(voxel_ce[focus[i].numpy()])
    extra = 2 / 3 * FOCUS_WEIGHT * np.concatenate(ce).mean()
    got = loss(outputs, targets, classes, focus)
    assert abs(float((got - plain).detach()) - extra) < 1e-5 and extra > 0.01
    # the added term's gradient is on the focus voxels alone
    grad = torch.autograd.grad(got - plain, outputs[0])[0].abs().sum(1)
    assert (grad[~focus] == 0).all() and (grad[0][focus[0]] > 0).all()


def test_the_prompted_loss_ignores_the_unannotated_voxels_near_the_clicks():
    torch.manual_seed(2)
    logits = [torch.randn(1, 3, 6, 6, 6)]
    target = torch.randint(0, 3, (1, 1, 6, 6, 6))
    target[0, 0, :3] = 3                            # "ignore"
    loss = PromptedLoss(lambda ignore: DeepSupervisionLoss(1, ignore_label=ignore), 3)
    focus = torch.zeros(1, 6, 6, 6, dtype=torch.bool)
    base = loss(logits, [target], torch.tensor([1]), focus)
    focus[0, :3] = True                             # only ignored voxels: nothing to add
    assert torch.equal(loss(logits, [target], torch.tensor([1]), focus), base)
    focus[0, 2:4] = True
    both = loss(logits, [target], torch.tensor([1]), focus)
    focus[0, :3] = False
    focus[0, 3] = True
    assert torch.allclose(loss(logits, [target], torch.tensor([1]), focus), both)


def _batch(b=4, shape=(24, 32, 24)):
    target = torch.zeros(b, 1, *shape, dtype=torch.long)
    target[:, :, 4:20, 8:26, 4:20] = 1
    target[:, :, 6:12, 10:16, 6:12] = 2
    target[1] = 0                                   # a patch with nothing in it
    return {"image": torch.randn(b, 1, *shape), "target": [target, target[:, :, ::2, ::2, ::2]]}


def test_the_simulated_user_clicks_inside_and_on_errors_and_repeats_itself():
    net = create_model("hippocampus-demo")
    net.deep_supervision = False
    from segbook.prompts import extend_input
    extend_input(net, len(CHANNELS))
    sim = PromptSimulator(PromptSpec(), seed=3)
    batch = _batch()
    seen_prompted = seen_plain = seen_lone = 0
    for it in range(12):
        out = sim(net, batch, it)
        again = sim(net, batch, it)
        assert torch.equal(out["image"], again["image"]) and torch.equal(out["prompt_class"], again["prompt_class"])
        assert out["image"].shape == (4, 1 + len(CHANNELS), 24, 32, 24)
        assert torch.equal(out["image"][:, :1], batch["image"])
        for i, c in enumerate(out["prompt_class"].tolist()):
            channels = out["image"][i, 1:]
            if c == 0 or i == 1:                    # not prompted, or nothing to click: no prompt at all
                assert channels.abs().sum() == 0 and not out["prompt_focus"][i].any()
                seen_plain += c == 0
                continue
            seen_prompted += 1
            target = (batch["target"][0][i, 0] == c).numpy()
            assert channels.sum() > 0
            # every positive ball is centred in the structure, every negative one outside it
            for channel, inside in ((0, True), (1, False)):
                balls, n = ndimage.label(channels[channel].numpy() > 0)
                for k in range(1, n + 1):
                    centre = tuple(np.argwhere(balls == k).mean(0).round().astype(int))
                    assert target[centre] == inside
            # the loss's focus: the voxels within FOCUS_RADIUS of the clicks. A lone ball (33 voxels at radius
            # 2) gives its click exactly; balls that touch give their union, which the focus must hold.
            focus = out["prompt_focus"][i].numpy()
            grid = np.indices(target.shape).reshape(3, -1).T
            near, lone = np.zeros(len(grid), bool), True
            for ch in (0, 1):
                balls, n = ndimage.label(channels[ch].numpy() > 0)
                for k in range(1, n + 1):
                    lone &= int((balls == k).sum()) == 33
                    near |= ((grid - np.argwhere(balls == k).mean(0)) ** 2).sum(1) <= FOCUS_RADIUS ** 2
            assert focus[channels[:2].sum(0).numpy() > 0].all()
            if lone:
                assert np.array_equal(focus.ravel(), near)
                seen_lone += 1
            if channels[3].sum() == 0:      # starting from nothing: one positive click, deep inside
                balls, n = ndimage.label(channels[0].numpy() > 0)
                assert n == 1 and channels[1].sum() == 0
                centre = tuple(np.argwhere(balls == 1).mean(0).round().astype(int))
                depth = ndimage.distance_transform_edt(np.pad(target, 1))[1:-1, 1:-1, 1:-1]
                assert depth[centre] >= 0.5 * depth.max() - 1
    assert seen_prompted > 5 and seen_plain > 5 and seen_lone > 5


def test_finetune_with_prompts_gives_a_model_that_segments_alone_and_from_clicks(tmp_path):
    out = tmp_path / "prompted"
    r = run_cli("finetune", MINI, "-o", out, "--base", "hippocampus-demo", "--prompts", "--plan", "base",
                "--epochs", "1", "--iterations-per-epoch", "3", "--val-fraction", "0.25", "--num-workers", "0",
                "--threads", "1", "--progress", "none", timeout=600)
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "model.json").read_text())
    assert config["prompts"] == {"channels": list(CHANNELS), "radius": 2.0}
    assert config["arch"]["input_channels"] == 1 + len(CHANNELS)
    image, g = read_image(sorted((MINI / "imagesTr").iterdir())[0])
    labels, _ = read_labels(sorted((MINI / "labelsTr").iterdir())[0])
    predictor = Predictor(str(out), device="cpu", backend="torch")
    automatic = predictor.predict_array(image, g.spacing_zyx)      # prompt channels empty
    assert dice(automatic == 1, labels == 1) > 0.7
    session = InteractiveSession(predictor, image, g.spacing_zyx)
    assert session.prompted
    point = tuple(np.argwhere(labels == 1).mean(0).round().astype(int))
    mask, info = session.segment(points=[point], class_name="anterior")
    assert info["tiles"] == 1 and dice(mask, labels == 1) > 0.6
    # a prompted model recomputes its tile for new prompts
    mask2, info = session.segment(points=[point], negative_points=[(0, 0, 0)], previous=mask, class_name="anterior")
    assert info["tiles"] == 1
    # the default CPU engine (OpenVINO, a default dependency) takes the prompt channels too, same answers
    fast = Predictor(str(out), device="cpu", backend="openvino")
    assert fast.runner.name == "openvino"
    assert np.mean(fast.predict_array(image, g.spacing_zyx) == automatic) > 0.999
    clicked, _ = InteractiveSession(fast, image, g.spacing_zyx).segment(
        points=[point], negative_points=[(0, 0, 0)], previous=mask, class_name="anterior")
    assert np.mean(clicked == mask2) > 0.999
    # a base that takes prompts passes them on, with their trained weights, even without --prompts
    again, _, info = build_network(str(out), config["class_names"], 1, POOLS)
    key = "conv_blocks_context.0.0.conv1.weight"
    assert again.prompts == config["prompts"] and "prompt_channels" not in info
    assert torch.equal(again.state_dict()[key], create_model(str(out)).state_dict()[key])
    # the command line resumes with the same flag and keeps prompting
    r = run_cli("finetune", MINI, "-o", out, "--resume", "--epochs", "2", "--num-workers", "0", "--threads", "1",
                "--progress", "none", timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "model.json").read_text())["prompts"]["channels"] == list(CHANNELS)


def test_a_click_the_prompted_network_does_not_follow_is_answered_as_any_models(tmp_path):
    """A prompt-taking model whose prompt weights are still zero computes what its base computes, clicks or
    not. Its structure is where the class's log-odds against all the others together is > 0, and every click
    after the first gets the bump a model without prompt input gets, on that log-odds: a negative point on
    the structure takes its voxel away, a positive one on a miss adds it (worked out in float64)."""
    import dataclasses
    from segbook.zoo import get_config, save_model_folder
    from test_interactive import CASES, deepest, expected_correction
    from segbook.runners import tile_logits
    base = get_config("hippocampus-demo")
    net, _, _ = build_network("hippocampus-demo", base.class_names, 1, POOLS, prompts=True)
    config = dataclasses.replace(base, prompts=net.prompts,
                                 arch=dataclasses.replace(base.arch, input_channels=net.input_channels))
    predictor = Predictor(str(save_model_folder(tmp_path / "m", config, net.state_dict())), device="cpu",
                          backend="torch")
    image, g = read_image(CASES / "hippocampus_001_image.nii.gz")
    session = InteractiveSession(predictor, image, g.spacing_zyx)
    assert session.prompted and session.grid == session.patch
    with torch.no_grad():       # the tile with empty prompt channels: the same logits whatever they hold
        x = torch.cat([session.data, torch.zeros(len(CHANNELS), *session.patch)])[None]
        logits = tile_logits(predictor.runner, x)[0].double().numpy()
    inner = tuple(slice(a + lo, a + hi) for (a, _), (lo, hi) in zip(session.pads, session.pre.bbox))
    odds = logits[(1, *inner)] - np.logaddexp(logits[(0, *inner)], logits[(2, *inner)])
    start = deepest(odds > 0)
    whole, _ = session.segment(points=[start], class_name="anterior")
    voxels = np.argwhere(whole)
    far = tuple(voxels[np.argmax(((voxels - np.asarray(start)) ** 2).sum(1))])
    cut, _ = session.segment(points=[start], negative_points=[far], previous=whole, class_name="anterior")
    assert np.array_equal(cut, expected_correction(odds, odds > 0, [(far, -1)], start))
    assert whole[far] and not cut[far] and cut[start]
    outside = np.argwhere(ndimage.binary_dilation(whole, iterations=2) & ~whole)[0]
    miss = tuple(int(v) for v in outside)
    added, _ = session.segment(points=[start, miss], previous=whole, class_name="anterior")
    assert np.array_equal(added, expected_correction(odds, odds > 0, [(miss, 1)], start))
    assert added[miss] and np.all(whole <= added)


def test_prompt_weights_learn_at_their_own_rate():
    """The zero-started prompt weights get PROMPT_LR_FACTOR times their gradient; the image's are untouched."""
    from segbook.training.prompting import PROMPT_LR_FACTOR, boost_prompt_weights
    torch.manual_seed(0)
    x = torch.cat([torch.randn(1, 1, 40, 56, 40), (torch.rand(1, 4, 40, 56, 40) > 0.9).float()], 1)
    grads = []
    for boost in (False, True):
        net, _, _ = build_network("hippocampus-demo", ["background", "anterior", "posterior"], 1, POOLS,
                                  prompts=True)
        if boost:
            boost_prompt_weights(net, 1)
        net(x)[0].square().mean().backward()
        block = net.conv_blocks_context[0][0]
        grads.append([block.conv1.weight.grad.clone(), block.conv3.weight.grad.clone()])
    for plain, boosted in zip(*grads):
        assert torch.equal(plain[:, :1], boosted[:, :1])
        assert torch.allclose(plain[:, 1:] * PROMPT_LR_FACTOR, boosted[:, 1:], rtol=1e-5, atol=1e-9)
        assert plain[:, 1:].abs().sum() > 0
