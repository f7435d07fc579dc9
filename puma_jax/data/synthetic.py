"""Built-in synthetic data: coloured shapes on plain backgrounds, for every PUMA task.

Generated deterministically in memory from (seed, scene id); nothing is downloaded. A scene is
1-2 shapes (kind, colour, cell of a 3x3 grid, size) on a background colour. From a scene come:
captions (pairs), grounding boxes, chat questions and answers, edit instructions with source and
target images, and (through the ordinary conditional parser) canny / inpainting / colorization
pairs; the text-only family states facts about the same words and shows no scene. The held-out
split never contains a scene whose description occurs in the training split, so held-out scores
measure generalization, not recall.

Sources emit *raw records* in the same formats the file readers produce (GRIT-style noun
chunks, LLaVA conversations, ...), so the synthetic set exercises the same parsers.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {
  "red": (220, 30, 30),
  "green": (30, 170, 60),
  "blue": (40, 70, 220),
  "yellow": (240, 210, 30),
  "purple": (140, 50, 170),
  "orange": (245, 140, 20),
  "cyan": (40, 200, 220),
  "white": (250, 250, 250),
  "black": (15, 15, 15),
}
BACKGROUNDS = ("white", "black", "gray")
_BG_RGB = {"white": (250, 250, 250), "black": (15, 15, 15), "gray": (128, 128, 128)}
CELLS = (
  "top left",
  "top",
  "top right",
  "left",
  "center",
  "right",
  "bottom left",
  "bottom",
  "bottom right",
)
SIZES = ("small", "large")
NUMBERS = ("zero", "one", "two", "three")
FAMILIES = ("pairs", "grounding", "chat", "edit", "text", "conditional")


@dataclasses.dataclass(frozen=True)
class Shape:
  kind: str
  color: str
  cell: int
  size: str

  def phrase(self) -> str:
    return f"a {self.size} {self.color} {self.kind}"


@dataclasses.dataclass(frozen=True)
class Scene:
  background: str
  shapes: tuple  # tuple[Shape, ...]

  def descriptor(self) -> tuple:
    return (self.background, tuple(sorted(dataclasses.astuple(s) for s in self.shapes)))


def _random_shape(rng, background: str, used_cells=()) -> Shape:
  colors = [c for c in COLORS if c != background]
  cells = [i for i in range(len(CELLS)) if i not in used_cells]
  return Shape(
    SHAPES[rng.integers(len(SHAPES))],
    colors[rng.integers(len(colors))],
    int(cells[rng.integers(len(cells))]),
    SIZES[rng.integers(len(SIZES))],
  )


def make_scene(seed: int, scene_id: int) -> Scene:
  rng = np.random.default_rng([seed, scene_id, 7])
  bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
  shapes = [_random_shape(rng, bg)]
  if rng.random() < 0.5:
    shapes.append(_random_shape(rng, bg, used_cells=(shapes[0].cell,)))
  return Scene(bg, tuple(shapes))


def shape_box(s: Shape) -> np.ndarray:
  """Normalized xyxy box of a shape: a cell is a third of the image; small shapes fill 40% of
  it, large ones 80%."""
  r, c = divmod(s.cell, 3)
  half = (0.4 if s.size == "large" else 0.2) / 3
  cy, cx = (r + 0.5) / 3, (c + 0.5) / 3
  return np.array([cx - half, cy - half, cx + half, cy + half], np.float32)


def render(scene: Scene, size: int) -> np.ndarray:
  """Rasterize with 4x4 supersampling so edges are anti-aliased at any size (uint8 HWC)."""
  ss = 4
  n = size * ss
  yy, xx = (np.mgrid[0:n, 0:n] + 0.5) / n
  img = np.empty((n, n, 3), np.float32)
  img[:] = _BG_RGB[scene.background]
  for s in scene.shapes:
    x0, y0, x1, y1 = shape_box(s)
    cx, cy, h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    u, v = (xx - cx) / h, (yy - cy) / h  # in [-1, 1] inside the box
    if s.kind == "circle":
      inside = u * u + v * v <= 1
    elif s.kind == "square":
      inside = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    elif s.kind == "triangle":  # apex up
      inside = (v <= 1) & (v >= -1) & (np.abs(u) <= (v + 1) / 2)
    elif s.kind == "diamond":
      inside = np.abs(u) + np.abs(v) <= 1
    else:  # cross
      inside = ((np.abs(u) <= 0.3) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1))
    img[inside] = COLORS[s.color]
  img = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def caption(scene: Scene) -> tuple[str, list[tuple[int, int]]]:
  """Caption and the character span of each shape's phrase."""
  text, spans = "", []
  for i, s in enumerate(scene.shapes):
    if i:
      text += " and "
    p = s.phrase()
    spans.append((len(text), len(text) + len(p)))
    text += f"{p} at the {CELLS[s.cell]}"
  return text + f" on a {scene.background} background", spans


def description(scene: Scene) -> str:
  """The answer to "Describe the image.": the caption as a sentence."""
  text = caption(scene)[0]
  return text[0].upper() + text[1:] + "."


_CORNERS = {
  "circle": "no",
  "square": "four",
  "triangle": "three",
  "diamond": "four",
  "cross": "twelve",
}
_MIXES = (
  ("red", "yellow", "orange"),
  ("blue", "yellow", "green"),
  ("red", "blue", "purple"),
  ("green", "blue", "cyan"),
  ("black", "white", "gray"),
)
_WORDS = NUMBERS + ("four", "five", "six")  # the sums of two of NUMBERS


def _fact(rng) -> str:
  """One sentence whose words after its first few follow from the words before them."""
  kind = int(rng.integers(5))
  if kind == 0:
    shape = SHAPES[rng.integers(len(SHAPES))]
    return f"A {shape} has {_CORNERS[shape]} corners."
  if kind == 1:
    a, b, c = _MIXES[rng.integers(len(_MIXES))]
    return f"Mixing {a} and {b} gives {c}."
  if kind == 2:
    a, b = rng.integers(len(NUMBERS), size=2)
    return f"{_WORDS[a].capitalize()} plus {_WORDS[b]} is {_WORDS[a + b]}."
  if kind == 3:
    shape = SHAPES[rng.integers(len(SHAPES))]
    return f"A large {shape} is bigger than a small {shape}."
  # Neighbouring cells of the 3x3 grid: "Above the left is the top left."
  cell = int(rng.integers(len(CELLS)))
  r, c = divmod(cell, 3)
  moves = [
    (w, rr, cc)
    for w, rr, cc in (
      ("Above", r - 1, c),
      ("Below", r + 1, c),
      ("Left of", r, c - 1),
      ("Right of", r, c + 1),
    )
    if 0 <= rr < 3 and 0 <= cc < 3
  ]
  word, rr, cc = moves[rng.integers(len(moves))]
  return f"{word} the {CELLS[cell]} is the {CELLS[rr * 3 + cc]}."


def _facts(rng) -> str:
  """The text family's record: three to six facts about the synthetic world's words (shapes,
  colours, numbers, the grid), never a description of a scene."""
  return " ".join(_fact(rng) for _ in range(int(rng.integers(3, 7))))


def _questions(scene: Scene, rng) -> list[tuple[str, str]]:
  qa = []
  s = scene.shapes[rng.integers(len(scene.shapes))]
  qa.append((f"What colour is the {s.kind} at the {CELLS[s.cell]}?", f"It is {s.color}."))
  article = "An" if s.color[0] in "aeiou" else "A"  # "An orange circle."
  qa.append((f"What shape is at the {CELLS[s.cell]}?", f"{article} {s.color} {s.kind}."))
  qa.append((f"Where is the {s.color} {s.kind}?", f"At the {CELLS[s.cell]}."))
  n = len(scene.shapes)
  qa.append(("How many shapes are there?", f"There {'is' if n == 1 else 'are'} {NUMBERS[n]}."))
  qa.append(("What colour is the background?", f"The background is {scene.background}."))
  qa.append(("Describe the image.", description(scene)))
  order = rng.permutation(len(qa))
  return [qa[i] for i in order[: int(rng.integers(1, 3))]]


def edit(scene: Scene, rng) -> tuple[Scene, str]:
  """One of: recolour, change shape, move, resize, add, remove, change background."""
  shapes = list(scene.shapes)
  i = int(rng.integers(len(shapes)))
  s = shapes[i]
  ops = ["color", "shape", "move", "size", "background"]
  ops += ["add"] if len(shapes) == 1 else ["remove"]
  op = ops[rng.integers(len(ops))]
  bg = scene.background
  name = f"the {s.color} {s.kind}"
  if op == "color":
    choices = [c for c in COLORS if c not in (s.color, bg)]
    c = choices[rng.integers(len(choices))]
    shapes[i], instr = dataclasses.replace(s, color=c), f"Make {name} {c}."
  elif op == "shape":
    k = [k for k in SHAPES if k != s.kind][rng.integers(len(SHAPES) - 1)]
    shapes[i], instr = dataclasses.replace(s, kind=k), f"Turn {name} into a {k}."
  elif op == "move":
    free = [c for c in range(9) if c not in {t.cell for t in shapes}]
    c = free[rng.integers(len(free))]
    shapes[i], instr = dataclasses.replace(s, cell=c), f"Move {name} to the {CELLS[c]}."
  elif op == "size":
    z = "small" if s.size == "large" else "large"
    shapes[i] = dataclasses.replace(s, size=z)
    instr = f"Make {name} {'smaller' if z == 'small' else 'larger'}."
  elif op == "add":
    t = _random_shape(rng, bg, used_cells=(s.cell,))
    shapes.append(t)
    instr = f"Add {t.phrase()} at the {CELLS[t.cell]}."
  elif op == "remove":
    shapes.pop(i)
    instr = f"Remove {name}."
  else:
    nb = [b for b in BACKGROUNDS if b != bg and all(t.color != b for t in shapes)]
    if not nb:  # every other background clashes with a shape colour: recolour instead
      return edit(Scene(bg, tuple(shapes)), rng)
    bg = nb[rng.integers(len(nb))]
    instr = f"Change the background to {bg}."
  return Scene(bg, tuple(shapes)), instr


class SyntheticSource:
  """Random-access raw records of one source family for one split (grain data source).

  Train scenes are ids 0..num_train-1; held-out scenes come from a disjoint id range and are
  kept only if their descriptor never occurs among the training scenes.
  """

  def __init__(
    self,
    family: str,
    split: str = "train",
    *,
    seed: int = 0,
    image_size: int = 64,
    num_train: int = 2000,
    num_eval: int = 200,
  ):
    if family not in FAMILIES:
      raise ValueError(f"synthetic family {family!r}; choose from {FAMILIES}")
    if split not in ("train", "eval"):
      raise ValueError(f"synthetic split {split!r}; choose train or eval")
    self.family, self.split, self.seed, self.image_size = family, split, seed, image_size
    if split == "train":
      self.ids = np.arange(num_train)
    else:
      seen = {make_scene(seed, i).descriptor() for i in range(num_train)}
      ids, j = [], 0
      while len(ids) < num_eval:
        sid = 1_000_000_000 + j
        if make_scene(seed, sid).descriptor() not in seen:
          ids.append(sid)
        j += 1
        if j > 100 * num_eval + 1000:
          raise ValueError(
            "synthetic: cannot find enough held-out scenes unseen in training; "
            "lower num_train or num_eval"
          )
      self.ids = np.asarray(ids)

  def __len__(self):
    return len(self.ids)

  def __repr__(self):
    return f"SyntheticSource({self.family}, {self.split}, {len(self)} records)"

  def __getitem__(self, i):
    sid = int(self.ids[i])
    scene = make_scene(self.seed, sid)
    rng = np.random.default_rng([self.seed, sid, FAMILIES.index(self.family)])
    key = f"{self.split}:{sid}"
    size = self.image_size
    if self.family in ("pairs", "conditional"):
      return {"key": key, "image": render(scene, size), "caption": caption(scene)[0]}
    if self.family == "grounding":
      text, spans = caption(scene)
      chunks = [[a, b, *shape_box(s).tolist(), 1.0] for (a, b), s in zip(spans, scene.shapes)]
      return {"key": key, "image": render(scene, size), "caption": text, "noun_chunks": chunks}
    if self.family == "chat":
      conv = []
      for j, (q, a) in enumerate(_questions(scene, rng)):
        conv += [
          {"from": "human", "value": ("<image>\n" if j == 0 else "") + q},
          {"from": "gpt", "value": a},
        ]
      return {"key": key, "image": render(scene, size), "conversations": conv}
    if self.family == "edit":
      target, instr = edit(scene, rng)
      return {
        "key": key,
        "source": render(scene, size),
        "target": render(target, size),
        "instruction": instr,
      }
    # Text-only rows, like PUMA's The Pile, are not about the image families' pictures: a row
    # describing a scene without showing it would train the captions' own contexts ("a small
    # ___") towards the colours' prior, the answer that ignores the image (docs/DESIGN.md §11).
    return {"key": key, "text": _facts(rng)}
