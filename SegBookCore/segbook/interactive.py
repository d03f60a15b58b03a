"""Interactive segmentation: one session per image, one cheap call per click.

    session = InteractiveSession(predictor, image, spacing)     # preprocesses once (SamPredictor.set_image)
    mask, info = session.segment(points=[(z, y, x)])             # the structure under the point
    mask, info = session.segment(points=[p1, p2], negative_points=[n1], previous=mask)

Every call carries all the prompts so far (as nnInteractive's session holds them) and returns one structure
as a boolean (z, y, x) mask on the input grid. The network runs only on tiles around the prompts, each
centred on what it must decide (one tile where the structure fits in one), and a structure that leaves the
tiles computed so far pulls in the tile beyond, until it is whole or meets the image border.

Two kinds of model answer:
- any model (no prompt input): the class the model gives at the first positive point (or the class
  named) is taken, and of it the connected parts that the positive points touch. Every later click
  corrects the model around itself: the class's logit gets a bump there (a Gaussian of BUMP_SIGMA voxels of
  the network grid) just high enough for the clicked voxel to lead the best other class by BUMP_MARGIN
  (positive point) or to trail it by that much (negative point), so that what the model nearly gave the
  class around a miss joins it, and what it barely gave around an excess leaves; the parts the positive
  points touch are then taken again. A box keeps what lies inside it (with no point: the class most present
  in the box).
  Tiles depend on nothing but the image, so they are kept for the next clicks: a click inside the region
  already computed costs no network run (correcting another structure runs again those tiles it needs
  whose output is no longer kept: click_tiles keeps the last few).
- a model trained with prompts (`config.prompts`): the prompts are encoded as its extra input channels
  (segbook.prompts) and it decides the structure: its voxels are where the class's probability against
  all the others (softmax of the class's logit vs the log-sum-exp of the rest) exceeds one half; every
  click after the first then gets the same bump on that log-odds, so that no click is left unanswered
  where the network did not follow it; of those, the parts that touch a positive point (all, with only a
  box). Tiles depend on the prompts and are computed anew for each call.

Coordinates: the input grid's (z, y, x) voxel indices (floats allowed); boxes (z0, y0, x0, z1, y1, x1), end
exclusive. The network grid is the preprocessed one (crop to non-zero, plan spacing, padding to the patch).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from scipy import ndimage

from .errors import InputError
from .click_tiles import Tiles
from .export import linear_weights, _nearest
from .inference import Predictor, _cpu_count, _inference_state
from .preprocess import preprocess, separate_axis
from .prompts import Prompts, encode
from .sliding_window import compute_steps, gaussian_weights, padding_for_patch

__all__ = ["InteractiveSession"]

log = logging.getLogger(__name__)

# A correcting click's bump: its width in voxels of the network grid and how far the clicked voxel is put past
# the decision. Chosen on hippocampus-demo's training cases (widths 2-5, margins 0.5-4; 3 and 1 were best,
# and the held-out cases were not used to choose): benchmarks/RESULTS.md, "Clicks".
BUMP_SIGMA, BUMP_MARGIN = 3.0, 1.0
BUMP_REACH = int(np.ceil(4 * BUMP_SIGMA))      # voxels along each axis; the bump is 3e-4 of its height there


class InteractiveSession:
    """One image and one Predictor; `segment` answers each click. See the module docstring."""

    def __init__(self, predictor: Predictor, image, spacing):
        self.predictor, self.config = predictor, predictor.config
        image, spacing = predictor.check_image(image, spacing)
        self.shape = tuple(image.shape[1:])
        plan = self.config.plan
        self.patch = tuple(int(p) for p in plan.patch_size)
        with _inference_state(predictor.network, None):
            self.pre = preprocess(image, spacing, plan)
        self.pads = padding_for_patch(self.pre.data.shape[1:], self.patch)
        self.data = torch.from_numpy(np.pad(self.pre.data, [(0, 0)] + self.pads)
                                     if any(sum(p) for p in self.pads) else self.pre.data)
        self.grid = tuple(self.data.shape[1:])                 # the padded network grid
        axis = separate_axis(plan.spacing, spacing)
        self.modes = ["nearest" if a == axis else "linear" for a in range(3)]
        self.prompted = bool(self.config.prompts)
        self.radius = float(self.config.prompts["radius"]) if self.prompted else 0.0
        self.gauss = gaussian_weights(self.patch, dtype=np.float32)
        self._cache = Tiles(self.grid)      # tiles of a model without prompt input, kept across clicks
        self.tiles_run = 0                   # network runs, all calls together

    # ------------------------------------------------------------------ coordinates
    def _to_grid(self, p) -> np.ndarray:
        """Input voxel (z, y, x) -> network-grid coordinates (pixel centres aligned, as the resampling)."""
        p = np.asarray(p, dtype=float)
        if p.shape != (3,) or not np.all(np.isfinite(p)):
            raise InputError(f"a point needs three finite coordinates, got {list(np.ravel(p))}")
        if np.any(p < -0.5) or np.any(p > np.asarray(self.shape) - 0.5):
            raise InputError(f"point {[round(float(v), 2) for v in p]} (voxels z, y, x) lies outside the image "
                             f"{self.shape}")
        lo = np.array([b[0] for b in self.pre.bbox])
        crop = np.asarray(self.pre.shape_cropped, dtype=float)
        new = np.asarray(self.pre.data.shape[1:], dtype=float)
        q = (p - lo + 0.5) * new / crop - 0.5
        q = np.clip(q, 0, new - 1)          # a point outside the non-zero crop: its nearest voxel in it
        return q + np.array([a for a, _ in self.pads])

    def _box_to_grid(self, box) -> tuple[int, ...]:
        box = [float(v) for v in box]
        if len(box) != 6:
            raise InputError(f"a box needs 6 numbers (z0, y0, x0, z1, y1, x1), got {box}")
        lo = np.clip(np.ceil(np.minimum(box[:3], box[3:])), 0, self.shape)
        hi = np.clip(np.floor(np.maximum(box[:3], box[3:])), 0, self.shape)
        if np.any(hi - lo < 1):
            raise InputError(f"box {box} (voxels z, y, x) holds no voxel of the image {self.shape}")
        a, b = self._to_grid(lo), self._to_grid(hi - 1)
        return tuple(int(v) for v in np.floor(a)) + tuple(int(v) + 1 for v in np.ceil(b))

    def _mask_to_grid(self, mask: np.ndarray) -> np.ndarray:
        """Boolean mask on the input grid -> the network grid (nearest), for the `previous` channel."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.shape:
            raise InputError(f"previous segmentation of shape {mask.shape} does not match the image {self.shape}")
        crop = mask[tuple(slice(a, b) for a, b in self.pre.bbox)]
        idx = np.ix_(*[_nearest(n, m) for n, m in zip(crop.shape, self.pre.data.shape[1:])])
        return np.pad(crop[idx], self.pads)

    def _to_input(self, mask: np.ndarray) -> np.ndarray:
        """Boolean network-grid mask -> the input grid: linear interpolation of the mask (nearest along a
        separately resampled axis) thresholded at one half, as the export resamples a two-class logit map;
        only the mask's bounding box is resampled."""
        out = np.zeros(self.shape, dtype=bool)
        inner = mask[tuple(slice(a, s - b) for (a, b), s in zip(self.pads, self.grid))]
        bounds = _bounds(inner)
        if bounds is None:
            return out
        index, weights, region = [], [], []
        for axis, n in enumerate(bounds):
            src, dst = inner.shape[axis], self.pre.shape_cropped[axis]
            if self.modes[axis] == "nearest":
                i0 = _nearest(src, dst)
                i1, w = i0, np.zeros(dst, np.float32)
            else:
                i0, i1, w = linear_weights(src, dst)
            keep = np.nonzero((i1 >= n.start) & (i0 < n.stop))[0]
            if not len(keep):       # the mask lies between the network voxels the input's voxels read
                return out
            j0, j1 = int(keep[0]), int(keep[-1]) + 1
            index.append((i0[j0:j1], i1[j0:j1]))
            weights.append(w[j0:j1])
            region.append((j0, j1))
        x = torch.from_numpy(inner.astype(np.float32))
        for axis in range(3):
            a = x.index_select(axis, torch.from_numpy(index[axis][0]))
            b = x.index_select(axis, torch.from_numpy(index[axis][1]))
            shape = [1, 1, 1]
            shape[axis] = -1
            x = torch.lerp(a, b, torch.from_numpy(weights[axis]).view(shape))
        lo = [b[0] for b in self.pre.bbox]
        out[tuple(slice(l + j0, l + j1) for l, (j0, j1) in zip(lo, region))] = (x > 0.5).numpy()
        return out

    # ------------------------------------------------------------------ tiles
    def _origin(self, centre) -> tuple[int, int, int]:
        """The tile centred (as far as the grid allows) on `centre` (network-grid coordinates)."""
        return tuple(int(min(max(round(c - p / 2), 0), g - p)) for c, p, g in zip(centre, self.patch, self.grid))

    def _run_tile(self, origin, prompts: Prompts | None) -> torch.Tensor:
        """The runner's output for the tile at `origin`: (K, *patch) logits, or features when the runner has a
        head (runners.py); `click_tiles` turns either into logits a few thousand voxels at a time."""
        window = tuple(slice(o, o + p) for o, p in zip(origin, self.patch))
        tile = self.data[(slice(None), *window)]
        if prompts is not None:
            tile = torch.cat([tile, torch.from_numpy(encode(prompts, origin, self.patch, self.radius))])
        p = self.predictor
        threads = _cpu_count() if p.device.type == "cpu" else None
        with _inference_state(p.network, threads):
            return p._predict_tile(tile).float().cpu()

    def _covered(self, tiles: Tiles, centre) -> bool:
        """Whether `centre` lies in the inner half of a tile already computed (its labels there are final)."""
        c = np.asarray(centre)
        return any(np.all(np.abs(c - (np.asarray(o) + np.asarray(self.patch) / 2)) <= np.asarray(self.patch) / 4)
                   for o in tiles.origins)

    # ------------------------------------------------------------------ the call
    def segment(self, points=(), negative_points=(), box=None, previous=None, class_name: str | None = None):
        """One structure from all prompts so far. Returns (mask, info): mask a boolean (z, y, x) array on
        the input grid, info {"class": name, "value": label value, "tiles": network runs of this call,
        "warnings": [...]} (an empty result says so there). Raises InputError (one line) for a point the
        model calls background with no class named, or prompts it cannot use (outside the image, none)."""
        t0, runs0 = time.perf_counter(), self.tiles_run
        if not len(points) and box is None:
            raise InputError("give at least one positive point or a box")
        pos = [self._to_grid(p) for p in points]
        neg = [self._to_grid(p) for p in negative_points]
        gbox = self._box_to_grid(box) if box is not None else None
        value = self.predictor._class_index(class_name) if class_name else None
        warnings: list[str] = []
        if self.prompted:
            prompts = Prompts([tuple(p) for p in pos], [tuple(p) for p in neg], gbox,
                              self._mask_to_grid(previous) if previous is not None else None)
            tiles = Tiles(self.grid)      # the prompts change what every tile computes
        else:
            prompts, tiles = None, self._cache
        # the tiles the prompts themselves need: one per positive point, the box's
        centres = list(pos)
        if gbox is not None:
            centres += self._box_centres(gbox)
        for c in centres:
            if not self._covered(tiles, c):
                self._add(tiles, self._origin(c), prompts, value)
        if value is None:
            value = self._choose_class(tiles, pos, gbox, points)
            if self.prompted:
                tiles.score_class(value, prompted=True)
        mask = self._select(tiles, value, pos, neg, gbox, points, warnings)
        # a structure reaching the edge of what was computed: compute the tile beyond, until it is whole
        while True:
            edge = self._open_edge(tiles, mask, gbox)
            if edge is None:
                break
            self._add(tiles, edge, prompts, value)
            mask = self._select(tiles, value, pos, neg, gbox, points, warnings)
        out = self._to_input(mask)
        if box is not None:
            lo = np.clip(np.ceil(np.minimum(box[:3], box[3:])).astype(int), 0, self.shape)
            hi = np.clip(np.floor(np.maximum(box[:3], box[3:])).astype(int), 0, self.shape)
            inside = np.zeros(self.shape, dtype=bool)
            inside[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
            out &= inside
        info = {"class": self.config.class_names[value], "value": int(value), "tiles": self.tiles_run - runs0,
                "voxels": int(out.sum()), "seconds": round(time.perf_counter() - t0, 3),
                "warnings": list(dict.fromkeys(warnings))}
        if not info["voxels"]:
            info["warnings"].append("the prompts select nothing")
        log.info("click: %s", info)
        return out, info

    def _box_centres(self, gbox) -> list:
        """Tile centres covering the box (nnU-Net's tile positions over it where it exceeds one tile)."""
        size = [min(max(b - a, p), g) for a, b, p, g in zip(gbox[:3], gbox[3:], self.patch, self.grid)]
        starts = [max(0, min(int(a), g - s)) for a, s, g in zip(gbox[:3], size, self.grid)]
        steps = compute_steps(size, self.patch, 0.5)
        return [tuple(s + o + p / 2 for s, o, p in zip(starts, offset, self.patch))
                for offset in np.array(np.meshgrid(*steps, indexing="ij")).reshape(3, -1).T]

    def _add(self, tiles: Tiles, origin, prompts, value) -> None:
        if origin in tiles.origins:
            return
        out = self._run_tile(origin, prompts)
        self.tiles_run += 1
        tiles.add(origin, out, self.predictor.runner.head, self.gauss, value, self.prompted)

    def _choose_class(self, tiles: Tiles, pos, gbox, points) -> int:
        """The class the model gives at the first positive point; with only a box, the class most present in
        it; background -> InputError."""
        if pos:
            value = int(tiles.labels[tuple(np.round(pos[0]).astype(int))])
            if value == 0:
                raise InputError(f"the model {self.config.name} finds background at point "
                                 f"{[round(float(v), 1) for v in points[0]]} (voxels z, y, x): click inside a "
                                 f"structure or name the class to segment")
            return value
        window = tuple(slice(a, b) for a, b in zip(gbox[:3], gbox[3:]))
        counts = np.bincount(tiles.labels[window].ravel(), minlength=len(self.config.class_names))
        counts[0] = 0
        if counts.max() == 0:
            raise InputError("the model finds only background inside the box: name the class to segment")
        return int(counts.argmax())

    def _select(self, tiles: Tiles, value, pos, neg, gbox, points, warnings) -> np.ndarray:
        """The structure on the network grid from the tiles computed so far (worked out inside their bounding
        box: nothing is known outside it)."""
        w = tiles.window()
        off = np.array([s.start for s in w])
        labels, known = tiles.labels[w], tiles.weight[w] > 0
        fg = (tiles.lead[w] > 0 if self.prompted else labels == value) & known
        fg = self._correct(tiles, value, fg, w, pos[1:], neg)
        if gbox is not None:
            fg &= _box_mask(fg.shape, np.asarray(gbox[:3]) - off, np.asarray(gbox[3:]) - off)
        mask = np.zeros(self.grid, dtype=bool)
        if not pos:             # a box alone: everything of the class inside it
            mask[w] = fg
            return mask
        parts, _ = ndimage.label(fg)
        chosen = set()          # the selected connected parts
        for p, original in zip(pos, points):
            at = tuple(np.round(p - off).astype(int))
            if parts[at]:
                chosen.add(int(parts[at]))
            else:
                warnings.append(f"positive point {[round(float(v), 1) for v in original]} "
                                f"{self._why_not(value, labels[at], gbox, np.round(p))}: ignored")
        if not chosen and fg.any():
            # the class was named and no point lies on it: its part nearest to the first point
            near = ndimage.distance_transform_edt(parts == 0, return_distances=False, return_indices=True)
            chosen.add(int(parts[tuple(near[(slice(None), *np.round(pos[0] - off).astype(int))])]))
            warnings.append(f"no positive point lies on {self.config.class_names[value]}: took its part nearest "
                            f"to the first point")
        mask[w] = np.isin(parts, sorted(chosen))
        return mask

    def _why_not(self, value, label, gbox, voxel) -> str:
        """Why a positive point on `voxel` (network grid), where the model gives `label`, holds no `value`."""
        names = self.config.class_names
        if gbox is not None and not all(a <= v < b for v, a, b in zip(voxel, gbox[:3], gbox[3:])):
            return "lies outside the box"
        if label != value:
            return f"lies on {names[label]}, not {names[value]}, for the model"
        return f"lies where the other points leave {names[value]} out"

    def _correct(self, tiles: Tiles, value, fg, w, pos, neg) -> np.ndarray:
        """`fg`, the class in the tiles' window `w`, corrected by the clicks `pos` (the positive points after
        the first) and `neg` (network-grid coordinates), as the module docstring says. The bumps' heights are
        found together: each click in turn is raised to its margin given the others' bumps, three rounds."""
        off = np.array([s.start for s in w])
        clicks = [(np.round(p).astype(int) - off, sign) for points, sign in ((pos, 1.0), (neg, -1.0))
                  for p in points]
        clicks = [(c, sign) for c, sign in clicks if np.all(c >= 0) and np.all(c < fg.shape)]
        if not clicks:
            return fg
        at = np.array([c for c, _ in clicks])
        signs = np.array([sign for _, sign in clicks])
        lo = np.maximum(at.min(0) - BUMP_REACH, 0)
        hi = np.minimum(at.max(0) + BUMP_REACH + 1, fg.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        in_grid = tuple(slice(a + o, b + o) for a, b, o in zip(lo, hi, off))
        # the structure's lead not kept there: run again (a prompted call has scored all its tiles)
        for index in tiles.unscored(value, in_grid):
            tiles.rescore(index, self._run_tile(tiles.origins[index], None), self.predictor.runner.head, value)
            self.tiles_run += 1
        tiles.score_class(value, self.prompted)
        lead = tiles.lead[in_grid]
        at = at - lo
        gap = at[:, None, :] - at[None, :, :]
        reach = np.abs(gap).max(-1) <= BUMP_REACH
        bump_at = np.exp(-(gap ** 2).sum(-1) / (2 * BUMP_SIGMA ** 2)) * reach   # bump j's value at click i
        height = np.zeros(len(clicks))
        own = lead[tuple(at.T)]
        for _ in range(3):
            for i in range(len(clicks)):
                need = BUMP_MARGIN - signs[i] * (own[i] + bump_at[i] @ height)
                if need > 0:
                    height[i] += signs[i] * need
        bias = np.zeros(lead.shape, dtype=np.float32)
        for c, h in zip(at, height):
            if h:
                window = tuple(slice(max(v - BUMP_REACH, 0), min(v + BUMP_REACH + 1, n)) for v, n in zip(c, lead.shape))
                d2 = sum((g - v) ** 2 for g, v in zip(np.ogrid[window], c))
                bias[window] += (h * np.exp(-d2 / (2 * BUMP_SIGMA ** 2))).astype(np.float32)
        moved = np.abs(bias) > 1e-3
        out = fg.copy()
        out[box][moved] = (lead + bias > 0)[moved]       # NaN (no tile there) + bias > 0 is False
        return out

    def _open_edge(self, tiles: Tiles, mask: np.ndarray, gbox):
        """The origin of a tile not yet computed that the structure runs into (its largest contact with the
        region not computed, inside the box if any), or None when the structure is whole."""
        # worked out around the structure only (its bounding box and one voxel more): a dilation over all
        # the tiles computed cost more than the rest of a click but the network
        w = _bounds(mask, tiles.window(), margin=1)
        if w is None:
            return None
        off = np.array([s.start for s in w])
        touch = ndimage.binary_dilation(mask[w]) & (tiles.weight[w] == 0)
        if gbox is not None:
            touch &= _box_mask(touch.shape, np.asarray(gbox[:3]) - off, np.asarray(gbox[3:]) - off)
        if not touch.any():
            return None
        groups, n = ndimage.label(touch)
        sizes = np.bincount(groups.ravel())[1:]
        half = np.asarray(self.patch) / 2
        centres = np.asarray(tiles.origins) + half
        for g in np.argsort(-sizes) + 1:
            contact = np.argwhere(groups == g).mean(axis=0) + off
            # past the face of the nearest tile it leaves: the next tile reaches three quarters beyond it
            d = contact - centres[np.argmin(np.abs((contact - centres) / half).max(axis=1))]
            face = np.abs(d) >= half - 1
            origin = self._origin(np.where(face, contact + np.sign(d) * half / 2, contact))
            if origin not in tiles.origins:
                return origin
        return None


def _bounds(mask: np.ndarray, window=None, margin: int = 0):
    """The bounding box (slices) of `mask`'s voxels, all of which lie in `window` (slices; default: all),
    grown by `margin` voxels inside the array; None when there are none."""
    window = window or tuple(slice(0, n) for n in mask.shape)
    inner = mask[window]
    lo, hi = [], []
    for axis in range(3):
        hit = np.nonzero(inner.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        if not len(hit):
            return None
        lo.append(window[axis].start + int(hit[0]) - margin)
        hi.append(window[axis].start + int(hit[-1]) + 1 + margin)
    return tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(lo, hi, mask.shape))


def _box_mask(shape, lo, hi) -> np.ndarray:
    """A boolean array of `shape`, True in [lo, hi) (clipped to it)."""
    out = np.zeros(shape, dtype=bool)
    lo, hi = np.clip(lo, 0, shape).astype(int), np.clip(hi, 0, shape).astype(int)
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return out

