"""Clicks: the interactive session on real MRI with the shipped model, the click simulator, prompt channels."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from conftest import run_cli
from segbook.clicks import dice, next_click
from segbook.errors import InputError
from segbook.inference import Predictor
from segbook.interactive import InteractiveSession
from segbook.io import read_image, read_labels
from segbook.network import build_stunet
from segbook.prompts import CHANNELS, Prompts, encode, extend_input
from segbook.zoo import create_model

CASES = __import__("pathlib").Path(__import__("segbook").__file__).parent / "data" / "demo_cases"


@pytest.fixture(scope="module")
def demo():
    return Predictor("hippocampus-demo", device="cpu", backend="torch")


@pytest.fixture(scope="module")
def case():
    image, geometry = read_image(CASES / "hippocampus_001_image.nii.gz")
    labels, _ = read_labels(CASES / "hippocampus_001_label.nii.gz")
    return image, geometry, labels


def deepest(mask):
    return tuple(int(v) for v in np.unravel_index(np.argmax(ndimage.distance_transform_edt(mask)), mask.shape))


def part_at(mask, point):
    parts, _ = ndimage.label(mask)
    return parts == parts[point]


def test_a_click_selects_the_models_part_under_it(demo, case):
    image, g, labels = case
    full = demo.predict_array(image, g.spacing_zyx)
    session = InteractiveSession(demo, image, g.spacing_zyx)
    for value in (1, 2):
        point = deepest(full == value)
        mask, info = session.segment(points=[point])
        assert info["value"] == value and info["class"] == demo.config.class_names[value]
        # the case fits one tile at the plan's spacing, as in the whole-image prediction: the same voxels
        assert np.array_equal(mask, part_at(full == value, point))
        assert dice(mask, labels == value) > 0.8
    # the second structure and every later click reuse the tile: no network run
    assert session.tiles_run == 1


def test_background_point_is_one_line_unless_the_class_is_named(demo, case):
    image, g, _ = case
    session = InteractiveSession(demo, image, g.spacing_zyx)
    with pytest.raises(InputError, match="finds background at point"):
        session.segment(points=[(0, 0, 0)])
    mask, info = session.segment(points=[(0, 0, 0)], class_name="posterior")
    assert info["class"] == "posterior" and mask.any()
    assert any("nearest" in w for w in info["warnings"])


def expected_correction(lead, labels_c, clicks, *positive):
    """The corrected structure worked out from the definition with numpy in float64: each click (voxel,
    +1/-1) a Gaussian bump on the class's lead over the best other class, heights raised click by click (three
    rounds) until every clicked voxel leads (+1) or trails (-1) by the margin; where the bumps are not
    negligible the sign of lead + bumps decides, elsewhere the model's labels; then the parts the positive
    points touch."""
    from segbook.interactive import BUMP_MARGIN, BUMP_REACH, BUMP_SIGMA
    grid = np.indices(lead.shape).reshape(3, -1).T
    bumps = []
    for v, _ in clicks:
        d = grid - np.asarray(v)
        bump = np.exp(-(d ** 2).sum(1) / (2 * BUMP_SIGMA ** 2)) * (np.abs(d).max(1) <= BUMP_REACH)
        bumps.append(bump.reshape(lead.shape))
    height = [0.0] * len(clicks)
    for _ in range(3):
        for i, (v, sign) in enumerate(clicks):
            now = lead[v] + sum(h * b[v] for h, b in zip(height, bumps))
            height[i] += sign * max(0.0, BUMP_MARGIN - sign * now)
    bias = sum(h * b for h, b in zip(height, bumps))
    fg = np.where(np.abs(bias) > 1e-3, lead + bias > 0, labels_c)
    return np.logical_or.reduce([part_at(fg, p) for p in positive])


def test_later_clicks_correct_the_model_around_themselves(demo, case):
    """A model without prompt input: a negative point takes away what the model barely gave the structure
    around it, a positive point on a miss adds what it nearly gave; checked against the definition worked
    out in float64 from the network's logits (network grid = input grid here: 1 mm, one tile)."""
    image, g, truth = case
    full = demo.predict_array(image, g.spacing_zyx)
    session = InteractiveSession(demo, image, g.spacing_zyx)
    assert np.allclose(g.spacing_zyx, demo.config.plan.spacing) and session.grid == session.patch
    from segbook.runners import tile_logits
    with torch.no_grad():
        logits = tile_logits(demo.runner, session.data[None])[0].double().numpy()
    inner = tuple(slice(a + lo, a + hi) for (a, _), (lo, hi) in zip(session.pads, session.pre.bbox))
    crop = tuple(slice(lo, hi) for lo, hi in session.pre.bbox)
    assert all(lo == 0 for lo, _ in session.pre.bbox)        # the crop starts at the image's first voxel
    lead = np.full(full.shape, -np.inf)
    lead[crop] = logits[(1, *inner)] - np.maximum(logits[(0, *inner)], logits[(2, *inner)])
    anterior = deepest(full == 1)
    whole, _ = session.segment(points=[anterior])
    # a negative point on the structure, as far as it goes from the voxel the model missed most deeply
    miss = deepest((truth == 1) & ~whole)
    voxels = np.argwhere(whole)
    far = tuple(voxels[np.argmax(((voxels - miss) ** 2).sum(1))])
    cut, info = session.segment(points=[anterior], negative_points=[far])
    assert np.array_equal(cut, expected_correction(lead, full == 1, [(far, -1)], anterior))
    assert not cut[far] and cut[anterior] and np.all(cut <= whole) and cut.sum() < whole.sum()
    assert info["tiles"] == 0                                # the tile and the structure's lead were kept
    corner = tuple(int(n) - 1 for n in full.shape)           # a bump cut by the grid's end
    cornered, _ = session.segment(points=[anterior, corner])
    assert cornered[corner] and np.array_equal(
        cornered, expected_correction(lead, full == 1, [(corner, 1)], anterior, corner))
    # a positive point there, then both
    assert not whole[miss]
    added, _ = session.segment(points=[anterior, miss])
    assert np.array_equal(added, expected_correction(lead, full == 1, [(miss, 1)], anterior))
    assert added[miss] and np.all(whole <= added)
    both, _ = session.segment(points=[anterior, miss], negative_points=[far])
    assert np.array_equal(both, expected_correction(lead, full == 1, [(miss, 1), (far, -1)], anterior))
    assert both[miss] and not both[far]
    # nothing changes beyond a bump's reach
    from segbook.interactive import BUMP_REACH
    near = np.zeros_like(whole)
    for v in (miss, far):
        near[tuple(slice(max(c - BUMP_REACH, 0), c + BUMP_REACH + 1) for c in v)] = True
    assert np.array_equal(both[~near], whole[~near] & both[~near]) and not (both & ~whole & ~near).any()


def test_a_click_on_another_structure_scores_it_on_the_kept_output(demo, case, monkeypatch):
    """Each structure's first correction scores it on the tile's output kept from the clicks before,
    whichever structure was scored last: no network run. Only the lead of the structure last scored is
    held, so where no output is kept (an older tile of a large image), correcting another structure runs
    its tile again, once, to the same result."""
    from segbook import click_tiles
    image, g, _ = case
    full = demo.predict_array(image, g.spacing_zyx)
    a, p = deepest(full == 1), deepest(full == 2)
    a_edge = tuple(np.argwhere(full == 1)[0])

    def clicks(kept):
        monkeypatch.setattr(click_tiles, "KEPT_OUTPUTS", kept)
        session = InteractiveSession(demo, image, g.spacing_zyx)
        session.segment(points=[a])
        first, _ = session.segment(points=[p])
        assert session.tiles_run == 1
        edge = tuple(np.argwhere(first)[0])
        results, runs = [], []
        for points, negative in ((p, edge), (p, edge), (a, None), (a, a_edge), (p, edge)):
            mask, info = session.segment(points=[points], negative_points=[negative] if negative else [])
            results.append(mask)
            runs.append(info["tiles"])
        assert not results[0][edge] and not results[3][a_edge]
        assert np.array_equal(results[1], results[0]) and np.array_equal(results[4], results[0])
        return results, runs

    kept, runs = clicks(2)
    assert runs == [0, 0, 0, 0, 0]
    again, runs = clicks(0)
    assert runs == [1, 0, 0, 1, 1]              # a selection alone (the third) needs no lead
    assert all(np.array_equal(x, y) for x, y in zip(kept, again))


def test_a_positive_point_off_the_structure_says_what_it_lies_on(demo, case):
    image, g, _ = case
    full = demo.predict_array(image, g.spacing_zyx)
    session = InteractiveSession(demo, image, g.spacing_zyx)
    anterior, posterior = deepest(full == 1), deepest(full == 2)

    def warned(**prompts):
        mask, info = session.segment(**prompts)
        return [w for w in info["warnings"] if w.startswith("positive point")]

    assert warned(points=[posterior], class_name="anterior") == [
        f"positive point {[float(v) for v in posterior]} lies on posterior, not anterior, for the model: ignored"]
    assert "lies on background, not anterior" in warned(points=[(0, 0, 0)], class_name="anterior")[0]
    # the same voxel positive and negative: the negative point's correction takes it away
    assert "where the other points leave anterior out" in warned(points=[anterior], negative_points=[anterior])[0]
    box = (anterior[0] + 1, 0, 0, image.shape[-3], image.shape[-2], image.shape[-1])
    assert "lies outside the box" in warned(points=[anterior], box=box, class_name="anterior")[0]
    assert warned(points=[anterior]) == []


def test_boxes_limit(demo, case):
    image, g, _ = case
    full = demo.predict_array(image, g.spacing_zyx)
    session = InteractiveSession(demo, image, g.spacing_zyx)
    anterior = deepest(full == 1)
    whole, _ = session.segment(points=[anterior])
    # a box limits the result; a box alone takes the class most present inside it
    box = (anterior[0] - 3, 0, 0, anterior[0] + 4, image.shape[-2], image.shape[-1])
    boxed, info = session.segment(points=[anterior], box=box)
    assert boxed.any() and not boxed[:box[0]].any() and not boxed[box[3]:].any()
    assert np.array_equal(boxed[box[0]:box[3]], whole[box[0]:box[3]])
    alone, info = session.segment(box=box)
    assert info["value"] == 1 and alone.any() and not alone[box[3]:].any()


def test_a_structure_larger_than_a_tile_pulls_in_the_tiles_beyond(demo):
    """A tube five tiles long: the click computes the tile at the point, then the tiles the tube runs into,
    until it is whole; a separate blob of the same class stays out. The network is replaced by one that
    answers each tile from a known label map (what is tested is which tiles are asked for and how their
    answers are put together)."""
    truth = np.zeros((40, 200, 40), np.int16)
    truth[15:25, 10:190, 15:25] = 1           # the tube, along y
    truth[2:6, 2:6, 2:6] = 1                  # another part of class 1
    truth[30:36, 100:110, 30:36] = 2
    image = np.random.default_rng(0).normal(100, 10, truth.shape).astype(np.float32)
    session = InteractiveSession(demo, image, (1.0, 1.0, 1.0))    # the plan's spacing: grid = image
    asked = []

    def oracle(origin, prompts):
        asked.append(origin)
        window = truth[tuple(slice(o, o + p) for o, p in zip(origin, session.patch))]
        return torch.from_numpy(np.stack([window == c for c in range(3)]).astype(np.float32) * 10)
    session._run_tile = oracle
    mask, info = session.segment(points=[(20, 100, 20)])
    expected = truth == 1
    expected[2:6, 2:6, 2:6] = False
    assert np.array_equal(mask, expected)
    assert info["value"] == 1 and info["tiles"] == len(asked) == len(set(asked))
    assert 4 <= len(asked) <= 5               # 180 voxels of tube / 56-voxel tiles, each 3/4 past the last
    # the next click on it computes nothing
    mask, info = session.segment(points=[(20, 30, 20)])
    assert info["tiles"] == 0 and mask.sum() == 10 * 180 * 10


def test_a_runner_that_reuses_its_output_buffer_corrects_as_one_that_does_not(demo):
    """OpenVINO's runner hands out its request's own output buffer, valid until its next call (runners.py).
    The output of the tile a first click computed is kept to score the structure when a later click corrects
    it; tiles computed in between must not change it. Logits here grow along y, so another tile's would
    give another correction."""
    truth = np.zeros((40, 200, 40), np.int16)
    truth[15:25, 10:190, 15:25] = 1           # a tube along y, several tiles long
    image = np.random.default_rng(0).normal(100, 10, truth.shape).astype(np.float32)

    def session_with(reuse: bool):
        session = InteractiveSession(demo, image, (1.0, 1.0, 1.0))
        buffer = torch.zeros((3, *session.patch))

        def runner(origin, prompts):
            window = tuple(slice(o, o + p) for o, p in zip(origin, session.patch))
            scale = 1 + np.arange(200)[window[1]][None, None, :, None] / 20
            out = torch.from_numpy((np.stack([truth[window] == c for c in range(3)]) * scale).astype(np.float32))
            return buffer.copy_(out) if reuse else out
        session._run_tile = runner
        return session

    results = []
    for reuse in (False, True):
        session = session_with(reuse)
        whole, info = session.segment(points=[(20, 100, 20)])
        assert info["tiles"] >= 3                         # tiles beyond the first ran after it
        cut, info = session.segment(points=[(20, 100, 20)], negative_points=[(20, 100, 24)], class_name="anterior")
        assert info["tiles"] == 0 and not cut[20, 100, 24] and cut.sum() < whole.sum()
        results.append(cut)
    assert np.array_equal(*results)


def test_bad_prompts_are_one_line(demo, case):
    image, g, _ = case
    session = InteractiveSession(demo, image, g.spacing_zyx)
    for kwargs, message in [({"points": [(1000, 0, 0)]}, "outside the image"),
                            ({"points": [(1, 2)]}, "three finite"),
                            ({}, "at least one positive point or a box"),
                            ({"box": (50, 50, 50, 60, 60, 60)}, "holds no voxel"),
                            ({"points": [(5, 5, 5)], "class_name": "liver"}, "not an output")]:
        with pytest.raises(InputError, match=message):
            session.segment(**kwargs)


# ---------------------------------------------------------------------------------------- the click simulator
def test_first_click_is_the_deepest_voxel_of_the_target():
    target = np.zeros((20, 20, 30), bool)
    target[2:9, 2:9, 2:9] = True            # 7^3 cube, centre (5, 5, 5)
    target[10:19, 5:14, 10:28] = True       # larger box: its centre is deepest
    (point, positive) = next_click(target, None)
    assert positive and point == (14, 9, 18) or point[0] == 14 and positive
    assert target[point]


def test_next_click_goes_to_the_larger_error_and_signs_it():
    target = np.zeros((30, 30, 30), bool)
    target[5:20, 5:20, 5:20] = True
    excess = target.copy()
    excess[22:29, 22:29, 22:29] = True       # 343 voxels too many
    point, positive = next_click(target, excess)
    assert not positive and point == (25, 25, 25)
    missed = target.copy()
    missed[5:20, 5:20, 5:9] = False           # 900 missed beat the 343 excess
    missed[22:29, 22:29, 22:29] = True
    point, positive = next_click(target, missed)
    assert positive and 5 <= point[2] < 9 and target[point] and not missed[point]
    assert next_click(target, target) is None


def test_the_image_border_is_boundary_and_spacing_counts():
    target = np.zeros((10, 10, 40), bool)
    target[:, :, :] = True    # the whole image: 5 voxels deep along the long axis's middle, not at a corner
    point, _ = next_click(target, None)
    assert point == (4, 4, 4)                 # the first of the deepest, in array order
    flat = np.zeros((9, 9, 9), bool)
    flat[1:8, 1:8, 1:8] = True
    point, _ = next_click(flat, None, spacing=(5.0, 1.0, 1.0))
    assert point[1:] == (4, 4)
    assert dice(flat, flat) == 1 and dice(flat, ~flat) == 0


# ---------------------------------------------------------------------------------------- prompt channels
def test_zero_initialised_prompt_channels_give_the_base_logits_exactly():
    torch.manual_seed(0)
    net = build_stunet(dims=[4, 8, 8], depth=[1, 1, 1], num_classes=3,
                       pool_op_kernel_sizes=[[2, 2, 2], [2, 2, 2]], deep_supervision=False).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        before = net(x)
        extend_input(net, len(CHANNELS))
        prompts = torch.zeros(1, len(CHANNELS), 16, 16, 16)
        after = net(torch.cat([x, prompts], 1))
        assert torch.equal(before, after)
        prompts[:, 0, 8, 8, 8] = 1            # and the new channels are wired in: a click changes the output
        changed = net(torch.cat([x, prompts], 1))
    assert net.input_channels == 1 + len(CHANNELS)
    # zero weights see no click until trained; give them a value to see they are read
    with torch.no_grad():
        net.conv_blocks_context[0][0].conv1.weight[:, 1:] = 0.1
        assert not torch.equal(net(torch.cat([x, prompts], 1)), changed)


def test_prompt_encoding():
    previous = np.zeros((10, 10, 10), bool)
    previous[2:4, 2:4, 2:4] = True
    p = Prompts(points=[(5, 5, 5)], negative_points=[(0, 0, 0)], box=(1, 1, 1, 3, 4, 5), previous=previous)
    out = encode(p, (0, 0, 0), (10, 10, 10), radius=1.5)
    assert out.shape == (4, 10, 10, 10) and out.dtype == np.float32
    assert out[0].sum() == 19 and out[0][5, 5, 5] == 1      # a ball of radius 1.5: 1 + 6 + 12 voxels
    assert out[1][0, 0, 0] == 1 and out[1].sum() == 7         # the octant inside the image: 1 + 3 + 3
    assert out[2].sum() == 2 * 3 * 4 and out[2][1, 1, 1] == 1 and out[2][3, 1, 1] == 0
    assert np.array_equal(out[3] > 0, previous)
    window = encode(p, (4, 4, 4), (4, 4, 4), radius=1.5)       # a window: coordinates shift with it
    assert window[0][1, 1, 1] == 1 and window[3].sum() == 0 and window[2].sum() == 0


# ---------------------------------------------------------------------------------------- the command line
def test_a_structure_between_the_voxels_the_input_reads_is_empty_not_an_error(demo, case):
    """4 mm along y against the plan's 1 mm: of each 4 network-grid slices the input's voxels read 1-2, so a
    structure one network voxel thick may lie where no input voxel reads it."""
    image, _, _ = case
    session = InteractiveSession(demo, image, (1.0, 4.0, 1.0))
    inner = [slice(a, n - b) for (a, b), n in zip(session.pads, session.grid)]
    centre = [(s.start + s.stop) // 2 for s in inner]
    found = []
    for y in range(inner[1].start, inner[1].stop):
        mask = np.zeros(session.grid, dtype=bool)
        mask[centre[0], y, centre[2]] = True
        out = session._to_input(mask)
        assert out.shape == image.shape[1:] and out.sum() <= 1
        found.append(bool(out.any()))
    assert any(found) and not all(found)


def test_cli_click_writes_one_structure_on_the_input_grid(tmp_path, case):
    image, g, labels = case
    path = CASES / "hippocampus_001_image.nii.gz"
    ref = sitk.ReadImage(str(path))
    z, y, x = deepest(labels == 2)
    lps = ref.TransformIndexToPhysicalPoint((x, y, z))
    out = tmp_path / "click.nii.gz"
    r = run_cli("predict", path, "-o", out, "--model", "hippocampus-demo", "--point", ",".join(map(str, lps)),
                "--backend", "torch", "--progress", "none")
    assert r.returncode == 0, r.stderr
    result, rg = read_labels(out)
    assert rg.size == g.size and set(np.unique(result)) == {0, 2}
    assert dice(result == 2, labels == 2) > 0.75
    sidecar = json.loads((tmp_path / "click.json").read_text())
    assert sidecar["result"]["class"] == "posterior" and [c["value"] for c in sidecar["labels"]] == [2]
    # the same click with that result as --previous and a negative point: one line errors stay one line
    r = run_cli("predict", path, "-o", tmp_path / "bad.nii.gz", "--model", "hippocampus-demo",
                "--point", "1,2", "--progress", "none")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--point" in r.stderr
    r = run_cli("predict", path, path, "-o", tmp_path / "many", "--model", "hippocampus-demo",
                "--point", ",".join(map(str, lps)), "--progress", "none")
    assert r.returncode == 2 and "one input" in r.stderr


def test_worker_answers_clicks_and_keeps_the_image_prepared(tmp_path, case):
    """Through the real worker process, as the Slicer module drives it: three clicks on one image; the later
    ones run no network (the tile is kept), a bad click is one error event and the worker goes on."""
    from test_worker import run_worker
    image, g, labels = case
    path = CASES / "hippocampus_001_image.nii.gz"
    ref = sitk.ReadImage(str(path))

    def lps(mask):
        z, y, x = deepest(mask)
        return list(ref.TransformIndexToPhysicalPoint((x, y, z)))

    def click(rid, **prompts):
        return {"id": rid, "command": "predict", "input": str(path), "output": str(tmp_path / f"{rid}.nrrd"),
                "model": "hippocampus-demo", "device": "cpu", **prompts}
    events, _, stderr, rc = run_worker([
        click("c1", points=[lps(labels == 1)]),
        click("c2", points=[lps(labels == 1)], negative_points=[list(ref.GetOrigin())], previous=str(tmp_path / "c1.nrrd")),
        click("bad", points=[[1e4, 0, 0]]),
        # what a request's JSON may hold instead of points and boxes: one line each, naming what is needed
        click("text", points="abc"),
        click("none", points=[[None, 1, 2]]),
        click("words", points=[lps(labels == 1)], negative_points=[["a", "b", "c"]]),
        click("box3", points=[lps(labels == 1)], box_lps=[1, 2, 3]),
        click("roi3", roi_lps=[1, 2, 3]),
        click("c3", points=[lps(labels == 2)], classes=["posterior"]),
        {"command": "shutdown"}])
    assert rc == 0, stderr
    done = {e["request"]: e["result"] for e in events if e["event"] == "done"}
    errors = {e["request"]: e["message"] for e in events if e["event"] == "error"}
    assert set(done) == {"c1", "c2", "c3"} and "outside the image" in errors["bad"]
    assert errors["text"] == "points: a list of points [X, Y, Z] (LPS mm) is needed, got 'abc'"
    assert errors["none"] == "a point needs three finite numbers X,Y,Z (LPS mm), got [None, 1, 2]"
    assert errors["words"] == "a point needs three finite numbers X,Y,Z (LPS mm), got ['a', 'b', 'c']"
    for rid in ("box3", "roi3"):
        assert errors[rid] == "a box needs six finite numbers X0,Y0,Z0,X1,Y1,Z1 (LPS mm), got [1, 2, 3]"
    assert done["c1"]["result"]["tiles"] == 1 and done["c2"]["result"]["tiles"] == 0
    assert done["c3"]["result"]["tiles"] == 0 and done["c3"]["result"]["class"] == "posterior"
    first, _ = read_labels(tmp_path / "c1.nrrd")
    assert set(np.unique(first)) == {0, 1} and dice(first == 1, labels == 1) > 0.8


def test_negative_coordinate_lists_bind_to_their_option():
    """`--roi -50,-20,...` / `--point -12.5,3,4`: argparse alone reads such a value as an unknown option."""
    from segbook.cli import _bind_negative_lists
    assert _bind_negative_lists(["predict", "a", "--roi", "-50,-20,1e2,60,80,180", "--point", "-1.5,2,-3",
                                 "--tta"]) == ["predict", "a", "--roi=-50,-20,1e2,60,80,180",
                                               "--point=-1.5,2,-3", "--tta"]
    assert _bind_negative_lists(["--roi", "-5", "-v"]) == ["--roi", "-5", "-v"]      # a single number: argparse's
    r = run_cli("predict", CASES / "hippocampus_001_image.nii.gz", "-o", "/nonexistent/x.nii.gz", "--model",
                "hippocampus-demo", "--roi", "-50,-20,100,60,80,180", "--progress", "none")
    assert "expected one argument" not in r.stderr and r.returncode == 2


def test_a_tile_that_takes_over_voxels_gives_its_own_lead_there():
    """Where a later tile lies more inside than the tiles scored before, the labels are the later tile's, and
    so must the class's lead be: those voxels count as not scored until that tile is, run again where its
    output is no longer kept."""
    from segbook import click_tiles
    from segbook.click_tiles import Tiles
    g = torch.Generator().manual_seed(1)
    gauss = np.ones((6, 6, 6), np.float32)
    gauss[1:5, 1:5, 1:5] = 2                  # each tile owns its inner part where it is the more inside
    ys = [0, 6, 3, 9, 12]                     # the third lies between the first two, which were scored
    outs = [torch.randn(3, 6, 6, 6, generator=g) for _ in ys]
    tiles = Tiles((6, 18, 6))
    for i, y in enumerate(ys):
        tiles.add((0, y, 0), outs[i], None, gauss, value=1 if i < 2 else None)
    assert len(tiles._kept) == click_tiles.KEPT_OUTPUTS == 2        # the third was pushed out by the last two
    everywhere = (slice(None),) * 3
    assert tiles.unscored(1, everywhere) == [2]
    tiles.rescore(2, outs[2], None, 1)
    tiles.score_class(1, prompted=False)
    assert not np.isnan(tiles.lead).any() and tiles.unscored(1, everywhere) == []
    for i, y in enumerate(ys):
        logits = outs[i].numpy()
        lead = logits[1] - np.maximum(logits[0], logits[2])
        window = (slice(0, 6), slice(y, y + 6), slice(0, 6))
        mine = tiles.owner[window] == i
        assert mine.any() and np.allclose(tiles.lead[window][mine], lead[mine])
        assert np.array_equal(tiles.labels[window][mine], logits.argmax(0)[mine])


@pytest.mark.parametrize("k", [3, 105])
def test_a_tile_with_a_head_labels_as_numpys_argmax_of_its_logits(k):
    """The OpenVINO runner hands the click features and the final 1x1x1 head (runners.py); the tile's labels
    and a class's scores, computed voxel by voxel from them, are numpy's argmax (first class on ties), the
    class's log-odds against all the others together and its lead over the best other one, of the logits
    written out in float64. The tile (4,800 voxels) takes more than one chunk of either kind, the last one
    partial."""
    from segbook.click_tiles import Tiles
    g = torch.Generator().manual_seed(k)
    features = torch.randn(6, 20, 16, 15, generator=g)
    w, b = torch.randn(k, 6, generator=g), torch.randn(k, generator=g)
    w[2], b[2] = w[1], b[1]                     # classes 1 and 2 always tie: the first one wins
    logits = np.einsum("kf,fzyx->kzyx", w.double().numpy(), features.double().numpy()) + b.double().numpy()[:, None, None, None]
    gauss = np.ones((20, 16, 15), np.float32)
    for out, head in ((features, (w, b)), (torch.from_numpy(logits).float(), None)):
        tiles = Tiles((20, 16, 15))
        tiles.add((0, 0, 0), out, head, gauss)
        assert np.array_equal(tiles.labels, logits.argmax(0)) and not (tiles.labels == 2).any()
        tiles.score_class(3 % k, prompted=True)
        own, rest = logits[3 % k], np.log(np.exp(np.delete(logits, 3 % k, axis=0)).sum(0))
        assert np.array_equal(tiles.lead > 0, own > rest)      # a prompted model's: the class's log-odds
        assert np.allclose(tiles.lead, own - rest, atol=1e-5 * np.abs(logits).max())
        # a model without prompt input: the class's lead over the best other one (the tile run again)
        assert tiles.unscored(1, (slice(None),) * 3) == [0]
        tiles.rescore(0, out, head, 1)
        assert tiles.unscored(1, (slice(None),) * 3) == [] and not (tiles.lead > 0).any()   # 1 ties with 2
        tiles.rescore(0, out, head, 3 % k)
        lead = own - np.delete(logits, 3 % k, axis=0).max(0)
        assert np.allclose(tiles.lead, lead, atol=1e-5 * np.abs(logits).max())
        assert np.array_equal(tiles.lead > 0, tiles.labels == 3 % k)
        once = Tiles((20, 16, 15))                     # the class known: scored in the labels' pass
        once.add((0, 0, 0), out, head, gauss, value=3 % k)
        assert np.array_equal(once.lead, tiles.lead) and np.array_equal(once.labels, tiles.labels)
        tiles.rescore(0, out, head, k - 1)           # the last class: no class above it
        lead = logits[k - 1] - logits[:k - 1].max(0)
        assert np.allclose(tiles.lead, lead, atol=1e-5 * np.abs(logits).max())
