"""Model-free checks of images and boxes against synthetic scenes (puma_jax/data/synthetic.py).

A generated image is read the way a person would read the renderer's output:

  foreground   pixels farther than `FG_THRESHOLD` (RGB distance) from the scene's background
               colour. The threshold is half the smallest distance between a background and a
               shape colour allowed on it (green on gray, ~126), so an anti-aliased edge pixel
               counts when it is mostly shape, and a background drawn a little off still reads
               as background.
  colour       the named colour (synthetic.COLORS) most foreground pixels show, each read as a
               mix of a colour and the background (`majority_colour`; a vote, so stray pixels
               do not move it).
  cell         the 3x3 grid cell of the foreground centroid.
  size         the foreground area over the area the renderer gives the true shape. Small and
               large shapes differ 4x in area (side 0.4 vs 0.8 of a cell), so the size is right
               when the ratio lies within a factor 2 (the geometric midpoint) of 1: nearer the
               true size than the other one.
  background   the background colour (synthetic.BACKGROUNDS) most pixels of the image's outer
               ring are nearest to; no shape reaches the ring at 32 pixels or more (boxes keep a
               1/30 margin).

Single-shape scenes are read globally (`check_single`); scenes with several shapes cell by cell
(`check_cells`: each shape's colour inside its own cell, no foreground in empty cells).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from puma_jax.data import synthetic

_COLOR_NAMES = tuple(synthetic.COLORS)
_COLOR_RGB = np.array([synthetic.COLORS[c] for c in _COLOR_NAMES], np.float32)
_BG_RGB = np.array([synthetic._BG_RGB[b] for b in synthetic.BACKGROUNDS], np.float32)


def _min_contrast() -> float:
  """The smallest RGB distance between a background and a shape colour drawn on it."""
  d = [
    float(np.linalg.norm(_BG_RGB[i] - _COLOR_RGB[j]))
    for i, b in enumerate(synthetic.BACKGROUNDS)
    for j, c in enumerate(_COLOR_NAMES)
    if c != b
  ]
  return min(d)


FG_THRESHOLD = 0.5 * _min_contrast()
SIZE_TOLERANCE = 2.0  # area ratio within [1/2, 2]: nearer the true size than the other (4x)


def _check_image(img) -> np.ndarray:
  a = np.asarray(img)
  if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] != a.shape[1] or a.shape[0] < 3:
    raise ValueError(f"expected a square HWC RGB image, got shape {a.shape}")
  return a.astype(np.float32)


def foreground(img, background: str) -> np.ndarray:
  """Boolean (H, W): pixels that are not the scene's background colour."""
  a = _check_image(img)
  if background not in synthetic.BACKGROUNDS:
    raise ValueError(f"unknown background {background!r}; choose from {synthetic.BACKGROUNDS}")
  return np.linalg.norm(a - _BG_RGB[synthetic.BACKGROUNDS.index(background)], axis=-1) > (
    FG_THRESHOLD
  )


def majority_colour(img, mask: np.ndarray, background: str) -> str | None:
  """The named colour most masked pixels show (None when the mask is empty).

  Each pixel is read as a mix a * colour + (1 - a) * background (anti-aliased edges are such
  mixes, and at 32 pixels a small shape is mostly edge): it votes, with weight a, for the
  colour whose mixing line passes nearest to it. Plain nearest-colour voting would read a
  half-covered red pixel on white as orange."""
  a = _check_image(img)[mask]
  if len(a) == 0:
    return None
  bg = _BG_RGB[synthetic.BACKGROUNDS.index(background)]
  d = a - bg  # (N, 3)
  c = _COLOR_RGB - bg  # (K, 3)
  cc = np.maximum((c * c).sum(-1), 1e-6)
  alpha = np.clip((d @ c.T) / cc, 0.0, 1.0)  # (N, K) best mix per colour
  resid = np.linalg.norm(d[:, None] - alpha[..., None] * c[None], axis=-1)
  resid[:, cc < 1.0] = np.inf  # the background colour itself explains nothing
  best = resid.argmin(-1)
  votes = np.bincount(best, weights=alpha[np.arange(len(a)), best], minlength=len(_COLOR_NAMES))
  return _COLOR_NAMES[int(votes.argmax())]


def cell_of(y: float, x: float, size: int) -> int:
  """The 3x3 grid cell (synthetic.CELLS index) of pixel coordinates (centres at i + 0.5)."""
  r = min(2, int((y + 0.5) * 3 / size))
  c = min(2, int((x + 0.5) * 3 / size))
  return 3 * r + c


def cell_masks(size: int) -> np.ndarray:
  """(9, size, size) booleans: the pixels whose centres lie in each cell."""
  idx = np.minimum(2, ((np.arange(size) + 0.5) * 3 / size).astype(int))
  cells = 3 * idx[:, None] + idx[None, :]
  return np.stack([cells == k for k in range(9)])


def background_of(img) -> str:
  """The background colour the image's outer pixel ring is mostly nearest to."""
  a = _check_image(img)
  ring = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
  nearest = np.linalg.norm(ring[:, None] - _BG_RGB[None], axis=-1).argmin(-1)
  return synthetic.BACKGROUNDS[int(np.bincount(nearest, minlength=len(_BG_RGB)).argmax())]


def true_area(shape: synthetic.Shape, background: str, size: int) -> int:
  """Foreground pixels of the renderer's own image of `shape` (the same reading as `check_*`)."""
  img = synthetic.render(synthetic.Scene(background, (shape,)), size)
  return int(foreground(img, background).sum())


def _size_ok(area: float, want: float) -> bool:
  if want <= 0:
    return False
  return 1.0 / SIZE_TOLERANCE <= area / want <= SIZE_TOLERANCE


def check_single(img, scene: synthetic.Scene) -> dict[str, bool]:
  """colour / cell / size / background of a single-shape scene, read from the whole image."""
  if len(scene.shapes) != 1:
    raise ValueError(f"check_single needs a one-shape scene; got {len(scene.shapes)} shapes")
  s = scene.shapes[0]
  size = _check_image(img).shape[0]
  mask = foreground(img, scene.background)
  out = {"background": background_of(img) == scene.background}
  if not mask.any():
    return {**out, "colour": False, "cell": False, "size": False}
  ys, xs = np.nonzero(mask)
  out["colour"] = majority_colour(img, mask, scene.background) == s.color
  out["cell"] = cell_of(float(ys.mean()), float(xs.mean()), size) == s.cell
  out["size"] = _size_ok(float(mask.sum()), true_area(s, scene.background, size))
  return out


def empty_cell_limit(size: int) -> float:
  """Foreground pixels below which a cell counts as empty: half the smallest shape's area."""
  return 0.5 * min(
    true_area(synthetic.Shape(k, "red", 4, "small"), "white", size) for k in synthetic.SHAPES
  )


def check_cells(img, scene: synthetic.Scene) -> dict[str, bool]:
  """Per-cell reading of a scene with any number of shapes: "cell<k>" is True when cell k
  holds what the scene puts there (a shape: its colour is the cell's majority colour; nothing:
  fewer foreground pixels than `empty_cell_limit`), "background" when the background matches."""
  a = _check_image(img)
  size = a.shape[0]
  mask = foreground(a, scene.background)
  cells = cell_masks(size)
  limit = empty_cell_limit(size)
  shapes = {s.cell: s for s in scene.shapes}
  out = {"background": background_of(a) == scene.background}
  for k in range(9):
    m = mask & cells[k]
    if k in shapes:
      out[f"cell{k}"] = (
        bool(m.sum() >= limit) and majority_colour(a, m, scene.background) == shapes[k].color
      )
    else:
      out[f"cell{k}"] = bool(m.sum() < limit)
  return out


EDIT_OPS = ("color", "shape", "move", "size", "add", "remove", "background")


def edit_op(source: synthetic.Scene, target: synthetic.Scene) -> str:
  """Which of synthetic.edit's operations turns `source` into `target`."""
  if source.background != target.background:
    return "background"
  if len(target.shapes) > len(source.shapes):
    return "add"
  if len(target.shapes) < len(source.shapes):
    return "remove"
  for a, b in zip(source.shapes, target.shapes):
    if a != b:
      for field, op in (("color", "color"), ("kind", "shape"), ("cell", "move"), ("size", "size")):
        if getattr(a, field) != getattr(b, field):
          return op
  raise ValueError("source and target scenes are the same: not an edit")


def check_edit(img, source: synthetic.Scene, target: synthetic.Scene) -> dict[str, bool | None]:
  """{"edit": the change asked for is visible (None for a change of shape kind, which needs a
  shape classifier), "kept": everything else matches the target (cells and background)}."""
  op = edit_op(source, target)
  got = check_cells(img, target)
  src = {s.cell: s for s in source.shapes}
  tgt = {s.cell: s for s in target.shapes}
  changed = {k for k in set(src) | set(tgt) if src.get(k) != tgt.get(k)}
  if op == "background":
    edit = got["background"]
    kept = all(v for k, v in got.items() if k != "background")
  else:
    kept = got["background"] and all(
      v for k, v in got.items() if k.startswith("cell") and int(k[4:]) not in changed
    )
    if op == "shape":
      edit = None
    elif op == "size":
      k = next(iter(changed))
      mask = foreground(img, target.background) & cell_masks(np.shape(img)[0])[k]
      edit = got[f"cell{k}"] and _size_ok(
        float(mask.sum()), true_area(tgt[k], target.background, np.shape(img)[0])
      )
    else:
      edit = all(got[f"cell{k}"] for k in changed)
  return {"edit": edit, "kept": kept, "op": op}


def iou(a: Sequence[float], b: Sequence[float]) -> float:
  """Intersection over union of two normalized xyxy boxes (0 for a degenerate union)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != (4,) or b.shape != (4,):
    raise ValueError(f"boxes must be 4 numbers [x0, y0, x1, y1]; got {a.tolist()}, {b.tolist()}")
  w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = w * h
  union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
  union += max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
  return float(inter / union) if union > 0 else 0.0


def parse_boxes(tokens: Sequence[int], pos0: int, num_position_tokens: int) -> list[list[float]]:
  """Boxes from generated token ids, in the format grounding is trained in (`sequence.build`:
  each box is 4 consecutive position tokens pos0 + bin, x0 y0 x1 y1): every run of 4 position
  tokens in a row is one box (bin centres, `sequence.bins_to_box`); a run broken by another
  token before its 4th is dropped."""
  from puma_jax import sequence as seq

  boxes, run = [], []
  for t in tokens:
    b = int(t) - pos0
    if 0 <= b < num_position_tokens:
      run.append(b)
      if len(run) == 4:
        boxes.append(seq.bins_to_box(run))
        run = []
    else:
      run = []
  return boxes
