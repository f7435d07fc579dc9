"""Sampling for people: prompts (and images) in, PNGs, a labelled grid and a record out.

    python -m puma_jax.sample SUBCOMMAND --release=DIR --out=DIR [flags]

Subcommands:
  text_to_image  --prompt=TEXT (repeatable) or --prompts_file=FILE (one prompt per line)
  edit           an image and an instruction
  conditional    a condition image (--condition=canny|inpaint|colorize) and an optional prompt
  reconstruct    an image -> its features at each scale -> that scale's decoder
  chat           an image and a question -> answers.jsonl
  ground         an image and a phrase -> answers.jsonl with the box, and the box drawn

Tasks that take images read --prompts_file as JSON lines {"image": PATH, "prompt": TEXT}
(relative image paths are relative to the file), or --image=PATH with --prompt=TEXT (one image
for many prompts, one prompt for many images, or as many of each, paired in order).

Image outputs (text_to_image, edit, conditional, reconstruct): one PNG per image
(`NNNN_<scale>.png`), `grid.png` (rows = inputs, columns = scales, labelled) and
`samples.jsonl`, one line per image with its file, prompt, scale, seed and every other setting:
input i is drawn with seed `--seed + i` (at every scale), so an image depends on neither the
batch it was drawn in, --batch_size nor the device count (beyond float rounding: docs/SAMPLING.md),
and `--seed=<its seed> --prompt=<its prompt> --scales=<its scale>` draws it again alone.

`--release` is a release directory (docs/SAMPLING.md; `python -m puma_jax.tools.tiny_release`
makes a tiny one); `--puma`, `--decoders=f0=DIR,f4=DIR`, `--vae`, `--clip` and `--tokenizer`
give the parts separately (or override the release's). Only the decoders a run decodes with
are loaded, in --dtype (bfloat16 on GPU/TPU, float32 on CPU by default). Batches are split over
all local devices (--devices=N: the first N). Bad input exits with code 2 and a message naming it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import flags

from puma_jax import release as release_lib
from puma_jax.diffusion import schedulers
from puma_jax.models import pooling

IMAGE_OUTPUT = ("text_to_image", "edit", "conditional", "reconstruct")
TEXT_OUTPUT = ("chat", "ground")
SUBCOMMANDS = IMAGE_OUTPUT + TEXT_OUTPUT
CONDITIONS = ("canny", "inpaint", "colorize")
AUTO = "auto"
ROUTER_TASK = {"text_to_image": "t2i", "edit": "edit", "conditional": "conditional"}


class SampleError(ValueError):
  """Bad input to the sample command (exit code 2)."""


@dataclasses.dataclass(frozen=True)
class Options:
  """Everything a run depends on (the CLI flags); see `define_flags` for each field."""

  command: str
  out: str
  release: str = ""
  puma: str = ""
  decoders: tuple[tuple[str, str], ...] = ()
  vae: str = ""
  clip: str = ""
  tokenizer: str = ""
  prompts: tuple[str, ...] = ()
  prompts_file: str = ""
  images: tuple[str, ...] = ()
  scales: str = AUTO
  steps: int = 50
  guidance: float = 2.0
  scheduler: str = "ddpm"
  seed: int = 0
  batch_size: int = 4
  dtype: str = ""
  condition: str = ""
  max_new_tokens: int = 64
  devices: int = 0


@dataclasses.dataclass(frozen=True)
class Request:
  index: int
  prompt: str
  image: str = ""  # input image path ("" for text_to_image)


# -- inputs ---------------------------------------------------------------------------------------


def parse_scales(text: str, command: str) -> tuple[str, ...] | None:
  """ "auto" -> None (the router, or the task default); else scale names in the order given."""
  text = text.strip()
  if text == AUTO:
    if command in ("reconstruct",):
      return tuple(pooling.SCALE_NAMES)
    return None
  names = [s.strip() for s in text.split(",") if s.strip()]
  if not names:
    raise SampleError(f"--scales is empty; give scale names {pooling.SCALE_NAMES} or {AUTO}")
  for s in names:
    if s not in pooling.SCALE_NAMES:
      raise SampleError(
        f"--scales: unknown scale {s!r}; scales are {', '.join(pooling.SCALE_NAMES)} (or {AUTO})"
      )
  if len(set(names)) != len(names):
    raise SampleError(f"--scales names a scale twice: {text}")
  return tuple(names)


def read_requests(o: Options) -> list[Request]:
  """The run's inputs, in order, from --prompt / --image / --prompts_file."""
  takes_image = o.command != "text_to_image"
  if o.prompts_file:
    if o.prompts or o.images:
      raise SampleError("give --prompts_file or --prompt/--image, not both")
    path = Path(o.prompts_file)
    try:
      lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
      raise SampleError(f"--prompts_file {path}: cannot be read ({e})") from None
    numbered = [(i + 1, l) for i, l in enumerate(lines) if l.strip()]
    if not numbered:
      raise SampleError(f"--prompts_file {path} is empty (no non-blank lines)")
    if not takes_image:
      return [Request(i, l.strip()) for i, (_, l) in enumerate(numbered)]
    out = []
    for i, (n, line) in enumerate(numbered):
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise SampleError(
          f"--prompts_file {path} line {n}: not JSON ({e}); {o.command} reads "
          'lines {"image": PATH, "prompt": TEXT}'
        ) from None
      if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
        raise SampleError(f"--prompts_file {path} line {n}: missing key 'image' (a path)")
      prompt = rec.get("prompt", "")
      if not isinstance(prompt, str):
        raise SampleError(f"--prompts_file {path} line {n}: key 'prompt' must be a string")
      image = Path(rec["image"])
      image = image if image.is_absolute() else path.parent / image
      out.append(Request(i, prompt, str(image)))
    return out
  prompts, images = list(o.prompts), list(o.images)
  if not takes_image:
    if images:
      raise SampleError("text_to_image takes no --image")
    if not prompts:
      raise SampleError("give --prompt=TEXT (repeatable) or --prompts_file=FILE")
    return [Request(i, p) for i, p in enumerate(prompts)]
  if not images:
    raise SampleError(
      f"{o.command} needs --image=PATH (repeatable) or --prompts_file=FILE "
      'with lines {"image": PATH, "prompt": TEXT}'
    )
  if not prompts:
    if o.command in ("edit", "chat", "ground"):
      raise SampleError(f"{o.command} needs --prompt=TEXT (an instruction, question or phrase)")
    prompts = [""]
  if len(images) == 1:
    images = images * len(prompts)
  elif len(prompts) == 1:
    prompts = prompts * len(images)
  if len(images) != len(prompts):
    raise SampleError(
      f"got {len(images)} --image and {len(prompts)} --prompt; give one of "
      "them once or both equally often"
    )
  return [Request(i, p, im) for i, (im, p) in enumerate(zip(images, prompts))]


def load_image(path: str):
  from PIL import Image, UnidentifiedImageError

  try:
    with Image.open(path) as im:
      return im.convert("RGB")
  except (OSError, UnidentifiedImageError, ValueError) as e:
    raise SampleError(f"image {path} cannot be read ({e})") from None


# -- models ---------------------------------------------------------------------------------------


def default_dtype() -> str:
  import jax

  return "bfloat16" if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else "float32"


@dataclasses.dataclass
class Parts:
  """Where each part comes from: the release, overridden by the separate part flags."""

  puma: str
  decoders: dict[str, str]
  vae: str
  clip: str
  tokenizer: str
  release: release_lib.Release | None


def resolve_parts(o: Options) -> Parts:
  rel = release_lib.Release.open(o.release) if o.release else None

  def part(flag_value, name):
    if flag_value:
      return flag_value
    return str(rel.part(name)) if rel is not None and rel.has(name) else ""

  decoders = {s: str(p) for s, p in rel.decoders().items()} if rel is not None else {}
  for s, d in o.decoders:
    pooling.scale_index(s)
    decoders[s] = d
  tokenizer = o.tokenizer or (rel.tokenizer if rel is not None else "byte")
  return Parts(
    part(o.puma, "puma"),
    dict(sorted(decoders.items())),
    part(o.vae, "vae"),
    part(o.clip, "clip"),
    tokenizer,
    rel,
  )


def check_parts(o: Options, parts: Parts, scales) -> None:
  """Fails before anything is loaded when the run needs a part that is not there."""
  where = f"release {parts.release.root}" if parts.release is not None else "the part flags"
  if not o.release and not (o.puma or o.clip):
    raise SampleError("give --release=DIR (or the parts: --puma, --decoders, --vae, --clip)")
  if o.command == "reconstruct":
    if not (parts.clip or parts.puma):
      raise SampleError(f"reconstruct needs a CLIP: {where} has neither puma/ nor clip/")
  elif not parts.puma:
    raise SampleError(f"{o.command} needs the PumaModel: {where} has no puma/ (give --puma)")
  if o.command in TEXT_OUTPUT:
    return
  for s in scales or ():
    if s not in parts.decoders:
      raise SampleError(
        f"{where} has no decoder for scale {s} (it has "
        f"{', '.join(parts.decoders) or 'none'}); choose --scales from those"
      )
  if scales is None and not parts.decoders:
    raise SampleError(f"{where} has no decoders")
  if not parts.vae:
    raise SampleError(f"{where} has no VAE (needed to turn latents into pixels)")


def make_mesh(devices: int):
  import jax
  from puma_jax import sharding

  avail = jax.local_devices()
  n = devices or len(avail)
  if not 1 <= n <= len(avail):
    raise SampleError(f"--devices={devices}: {len(avail)} local device(s) available")
  return sharding.make_mesh({"data": n}, avail[:n])


def settings_of(o: Options):
  from puma_jax.diffusion import sampler as sampler_lib

  return sampler_lib.SamplerSettings(
    num_steps=o.steps, guidance_scale=o.guidance, scheduler=o.scheduler
  )


def load_pipeline(o: Options, parts: Parts, mesh, dtype):
  from puma_jax.inference.pipelines import PumaPipeline

  return PumaPipeline.load(
    parts.puma,
    decoders=parts.decoders,
    vae=parts.vae,
    tokenizer=parts.tokenizer,
    dtype=dtype,
    param_dtype=dtype,
    mesh=mesh,
    settings=settings_of(o),
  )


class Reconstruction:
  """image -> CLIP features at a scale -> that scale's decoder, with CLIP from clip/ or puma/."""

  def __init__(self, o: Options, parts: Parts, mesh, dtype):
    from puma_jax import checkpoints

    kw = {"dtype": dtype, "param_dtype": dtype, "mesh": mesh}
    if parts.clip:
      self.clip = checkpoints.load_module(parts.clip, family="clip-vision", **kw)
    else:  # the PumaModel carries the CLIP it was trained with
      self.clip = checkpoints.load_module(parts.puma, family="puma", **kw).clip
    self.vae = checkpoints.load_module(parts.vae, family="vae", **kw)
    self.parts, self.kw, self.o = parts, kw, o
    self._recs = {}

  def __call__(self, scale: str, images, seeds) -> np.ndarray:
    from puma_jax import checkpoints, reconstruct
    from puma_jax.diffusion import sampler as sampler_lib

    if scale not in self._recs:
      path = self.parts.decoders[scale]
      dec = checkpoints.load_module(path, family="puma-decoder", **self.kw)
      self._recs[scale] = reconstruct.Reconstructor(
        self.clip,
        dec,
        self.vae,
        scale,
        settings_of(self.o),
        sampler_lib.decoder_scheduler_config(path),  # the schedule it was trained with
      )
    rec = self._recs[scale]
    feats = rec.features(images)
    out = rec.sampler(feats, rec.uncond, sampler_lib.example_keys(seeds))
    return sampler_lib.to_uint8(np.asarray(out, np.float32))


# -- outputs --------------------------------------------------------------------------------------


class Progress:
  """One line per update on stderr, at most about 20 updates a run (never a flood)."""

  def __init__(self, total: int, what: str, stream=None):
    self.total, self.what, self.done = total, what, 0
    self.stream = stream or sys.stderr
    self.t0 = time.perf_counter()
    self.every = max(1, total // 20)

  def update(self, n: int = 1) -> None:
    self.done += n
    if self.done % self.every and self.done != self.total:
      return
    dt = time.perf_counter() - self.t0
    eta = dt / self.done * (self.total - self.done)
    width = 20
    bar = "#" * round(width * self.done / self.total)
    print(
      f"{self.what} [{bar:<{width}}] {self.done}/{self.total} batches  {dt:.1f}s  ETA {eta:.0f}s",
      file=self.stream,
      flush=True,
    )


def _font(size: int):
  from PIL import ImageFont

  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: fixed-size bitmap font
    return ImageFont.load_default()


def _fit(text: str, draw, font, width: int) -> str:
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength(text + "...", font=font) > width:
    text = text[:-1]
  return text + "..."


def make_grid(rows: Sequence[tuple[str, dict]], columns: Sequence[str], cell: int):
  """rows: (label, {column: uint8 HWC image}); missing cells stay blank. A labelled PIL image:
  column names on top, row labels on the left, images scaled (nearest) to `cell` pixels."""
  from PIL import Image, ImageDraw

  font = _font(14)
  label_w, head_h, pad = max(160, cell), 24, 4
  w = label_w + len(columns) * (cell + pad) + pad
  h = head_h + len(rows) * (cell + pad) + pad
  grid = Image.new("RGB", (w, h), "white")
  draw = ImageDraw.Draw(grid)
  for j, c in enumerate(columns):
    draw.text(
      (label_w + pad + j * (cell + pad) + cell // 2, head_h // 2),
      c,
      fill="black",
      font=font,
      anchor="mm",
    )
  for i, (label, cells) in enumerate(rows):
    y = head_h + pad + i * (cell + pad)
    words, lines = label.split(), [""]
    for word in words:  # wrap the label into the cell height
      trial = (lines[-1] + " " + word).strip()
      if draw.textlength(trial, font=font) <= label_w - 2 * pad or not lines[-1]:
        lines[-1] = trial
      else:
        lines.append(word)
    max_lines = max(1, cell // 18)
    if len(lines) > max_lines:
      lines = lines[: max_lines - 1] + [" ".join(lines[max_lines - 1 :])]
    for k, line in enumerate(lines):
      draw.text(
        (pad, y + k * 18), _fit(line, draw, font, label_w - 2 * pad), fill="black", font=font
      )
    for j, c in enumerate(columns):
      if c in cells:
        im = Image.fromarray(np.asarray(cells[c])).resize((cell, cell), Image.NEAREST)
        grid.paste(im, (label_w + pad + j * (cell + pad), y))
  return grid


def draw_box(image, box, label: str = ""):
  """The normalized [x0, y0, x1, y1] box drawn on a copy of `image` (PIL)."""
  from PIL import ImageDraw

  im = image.copy()
  if box is None:
    return im
  w, h = im.size
  xy = [box[0] * w, box[1] * h, box[2] * w, box[3] * h]
  draw = ImageDraw.Draw(im)
  draw.rectangle(xy, outline=(255, 0, 0), width=max(2, min(w, h) // 100))
  if label:
    draw.text((xy[0] + 3, xy[1] + 2), label, fill=(255, 0, 0), font=_font(max(12, h // 30)))
  return im


def _write_jsonl(path: Path, records) -> None:
  path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


# -- the run --------------------------------------------------------------------------------------


def _batches(reqs: list[Request], size: int):
  for i in range(0, len(reqs), size):
    yield reqs[i : i + size]


def _pad(items: list, multiple: int) -> list:
  """Repeats the last item so the batch splits over the devices; the copies are dropped."""
  return items + [items[-1]] * (-len(items) % multiple)


def run(o: Options, log=print) -> Path:
  """Runs one sample command; raises SampleError on bad input."""
  import jax.numpy as jnp

  if o.command not in SUBCOMMANDS:
    raise SampleError(f"unknown subcommand {o.command!r}; choose from {', '.join(SUBCOMMANDS)}")
  if not o.out:
    raise SampleError("--out=DIR is required")
  if o.scheduler not in schedulers.SCHEDULERS:
    raise SampleError(f"--scheduler={o.scheduler!r}: choose from {sorted(schedulers.SCHEDULERS)}")
  if o.steps < 1 or o.batch_size < 1 or o.max_new_tokens < 1:
    raise SampleError("--steps, --batch_size and --max_new_tokens must be >= 1")
  if o.command == "conditional" and o.condition not in CONDITIONS:
    raise SampleError(
      f"conditional needs --condition, one of {', '.join(CONDITIONS)} (got {o.condition!r})"
    )
  dtype_name = o.dtype or default_dtype()
  if dtype_name not in ("float32", "bfloat16"):
    raise SampleError(f"--dtype={dtype_name!r}: choose float32 or bfloat16")
  scales = parse_scales(o.scales, o.command)
  requests = read_requests(o)
  parts = resolve_parts(o)
  check_parts(o, parts, scales)
  pil_images = {r.image: load_image(r.image) for r in requests if r.image}
  out = Path(o.out)
  out.mkdir(parents=True, exist_ok=True)

  mesh = make_mesh(o.devices)
  n_dev = mesh.devices.size
  dtype = jnp.dtype(dtype_name)
  settings = {
    "task": o.command,
    "steps": o.steps,
    "guidance": o.guidance,
    "scheduler": o.scheduler,
    "dtype": dtype_name,
    "release": str(parts.release.root) if parts.release else "",
    "parts": {
      "puma": parts.puma,
      "vae": parts.vae,
      "clip": parts.clip,
      "tokenizer": parts.tokenizer,
    },
  }
  if o.command == "conditional":
    settings["condition"] = o.condition
  from puma_jax import sharding

  t0 = time.perf_counter()
  with sharding.use_mesh(mesh):
    if o.command == "reconstruct":
      model = Reconstruction(o, parts, mesh, dtype)
    else:
      model = load_pipeline(o, parts, mesh, dtype)
    log(f"loaded in {time.perf_counter() - t0:.1f}s ({dtype_name}, {n_dev} device(s))")
    batches = list(_batches(requests, o.batch_size))
    progress = Progress(len(batches), o.command)
    if o.command in TEXT_OUTPUT:
      return _run_text(o, model, batches, pil_images, n_dev, out, progress, log)
    return _run_images(
      o, model, parts, batches, pil_images, scales, n_dev, out, progress, settings, log
    )


def _run_images(o, model, parts, batches, pil_images, scales, n_dev, out, progress, settings, log):
  from PIL import Image

  records, rows, used = [], [], []
  for batch in batches:
    padded = _pad(batch, n_dev)
    seeds = [o.seed + r.index for r in padded]
    images = [pil_images[r.image] for r in padded] if o.command != "text_to_image" else None
    per_scale: dict[str, np.ndarray] = {}
    chosen = None
    if o.command == "reconstruct":
      for s in scales:
        per_scale[s] = model(s, images, seeds)
    else:
      prompts = [r.prompt for r in padded]
      if o.command == "text_to_image":
        feats = model.text_to_image(prompts, scales=scales, return_features=True)
      elif o.command == "edit":
        feats = model.edit(images, prompts, scales=scales, return_features=True)
      else:
        feats = model.conditional(images, o.condition, prompts, scales=scales, return_features=True)
      chosen = feats.pop("chosen", None)
      for s in feats:
        # With the router, each input is decoded only at the scale chosen for it.
        idx = [i for i in range(len(padded)) if chosen is None or chosen[i] == s]
        sub = _pad(idx, n_dev)
        imgs = model.decode_features(s, feats[s][sub], [seeds[i] for i in sub])
        per_scale[s] = {i: imgs[k] for k, i in enumerate(sub)}
    for i, r in enumerate(batch):
      cells = {}
      for s in scales or pooling.SCALE_NAMES:
        got = per_scale.get(s)
        if got is None or (isinstance(got, dict) and i not in got):
          continue
        img = got[i]
        name = f"{r.index:04d}_{s}.png"
        Image.fromarray(np.asarray(img)).save(out / name)
        cells[s] = img
        if s not in used:
          used.append(s)
        rec = {
          "file": name,
          "index": r.index,
          "prompt": r.prompt,
          "scale": s,
          "seed": o.seed + r.index,
          **settings,
          "decoder": parts.decoders[s],
        }
        if r.image:
          rec["image"] = r.image
        if chosen is not None:
          rec["scale_chosen_by"] = "router" if model.model.router is not None else ("task default")
        records.append(rec)
      if r.image:
        cells["input"] = np.asarray(pil_images[r.image])
      rows.append((r.prompt or Path(r.image).name, cells))
    progress.update()
  columns = list(scales) if scales is not None else sorted(used, key=pooling.scale_index)
  if o.command != "text_to_image":
    columns = ["input"] + columns
  cell = max(
    96, max(int(np.asarray(v).shape[0]) for _, c in rows for k, v in c.items() if k != "input")
  )
  make_grid(rows, columns, cell).save(out / "grid.png")
  _write_jsonl(out / "samples.jsonl", records)
  log(f"{len(records)} image(s) -> {out}/ (grid.png, samples.jsonl)")
  return out


def _run_text(o, pipe, batches, pil_images, n_dev, out, progress, log):
  records = []
  for batch in batches:
    padded = _pad(batch, n_dev)
    images = [pil_images[r.image] for r in padded]
    prompts = [r.prompt for r in padded]
    if o.command == "chat":
      answers = pipe.chat(images, prompts, max_new_tokens=o.max_new_tokens)[: len(batch)]
      for r, a in zip(batch, answers):
        records.append({"index": r.index, "image": r.image, "prompt": r.prompt, "answer": a})
    else:
      boxes = pipe.ground(images, prompts)[: len(batch)]
      for r, box in zip(batch, boxes):
        name = f"{r.index:04d}_boxes.png"
        draw_box(pil_images[r.image], box, r.prompt).save(out / name)
        records.append(
          {
            "index": r.index,
            "image": r.image,
            "prompt": r.prompt,
            "answer": "none" if box is None else "[" + ", ".join(f"{v:.3f}" for v in box) + "]",
            "boxes": [] if box is None else [list(map(float, box))],
            "file": name,
          }
        )
    progress.update()
  for rec in records:
    log(f"[{rec['index']}] {rec['prompt']} -> {rec['answer']}")
  _write_jsonl(out / "answers.jsonl", records)
  log(f"{len(records)} answer(s) -> {out / 'answers.jsonl'}")
  return out


# -- CLI ------------------------------------------------------------------------------------------

FLAGS = flags.FlagValues()


def define_flags(fv: flags.FlagValues) -> None:
  d = dict(flag_values=fv)
  flags.DEFINE_string("release", "", "release directory (docs/SAMPLING.md)", **d)
  flags.DEFINE_string("puma", "", "converted PumaModel dir (overrides the release's)", **d)
  flags.DEFINE_list(
    "decoders", [], "SCALE=DIR,... converted decoder dirs (add to / override the release's)", **d
  )
  flags.DEFINE_string("vae", "", "converted VAE dir (overrides the release's)", **d)
  flags.DEFINE_string("clip", "", "converted clip-vision dir (reconstruct without puma/)", **d)
  flags.DEFINE_string("tokenizer", "", "'byte' or a tokenizer dir (default: the release's)", **d)
  flags.DEFINE_multi_string("prompt", [], "prompt / instruction / question (repeatable)", **d)
  flags.DEFINE_string(
    "prompts_file",
    "",
    'text_to_image: one prompt per line; others: JSON lines {"image": PATH, "prompt": TEXT}',
    **d,
  )
  flags.DEFINE_multi_string("image", [], "input image (repeatable)", **d)
  flags.DEFINE_string(
    "scales",
    AUTO,
    "comma-separated scales (f0 finest .. f4 coarsest), or "
    "auto: the router / the task's default (reconstruct: all five)",
    **d,
  )
  flags.DEFINE_integer("steps", 50, "denoising steps (the paper: 50 DDPM steps)", **d)
  flags.DEFINE_float("guidance", 2.0, "classifier-free guidance scale (the paper: 2.0)", **d)
  flags.DEFINE_enum("scheduler", "ddpm", sorted(schedulers.SCHEDULERS), "diffusion scheduler", **d)
  flags.DEFINE_integer("seed", 0, "input i is drawn with seed + i", **d)
  flags.DEFINE_integer("batch_size", 4, "inputs per batch", **d)
  flags.DEFINE_enum(
    "dtype",
    "",
    ["", "float32", "bfloat16"],
    "compute and weight dtype (default: bfloat16 on GPU/TPU, float32 on CPU)",
    **d,
  )
  flags.DEFINE_enum("condition", "", ["", *CONDITIONS], "conditional: the condition type", **d)
  flags.DEFINE_integer("max_new_tokens", 64, "chat: longest answer in tokens", **d)
  flags.DEFINE_integer("devices", 0, "local devices to split batches over (0: all)", **d)
  flags.DEFINE_string("out", "", "output directory", **d)


define_flags(FLAGS)


def options_from_flags(command: str, fv: flags.FlagValues) -> Options:
  decoders = []
  for item in fv.decoders:
    scale, eq, path = item.partition("=")
    if not eq or not path:
      raise SampleError(f"--decoders entry {item!r} must be SCALE=DIR, e.g. f0=/ckpt/dec_f0")
    if scale not in pooling.SCALE_NAMES:
      raise SampleError(
        f"--decoders: unknown scale {scale!r}; scales are {', '.join(pooling.SCALE_NAMES)}"
      )
    decoders.append((scale, path))
  return Options(
    command=command,
    out=fv.out,
    release=fv.release,
    puma=fv.puma,
    decoders=tuple(decoders),
    vae=fv.vae,
    clip=fv.clip,
    tokenizer=fv.tokenizer,
    prompts=tuple(fv.prompt),
    prompts_file=fv.prompts_file,
    images=tuple(fv.image),
    scales=fv.scales,
    steps=fv.steps,
    guidance=fv.guidance,
    scheduler=fv.scheduler,
    seed=fv.seed,
    batch_size=fv.batch_size,
    dtype=fv.dtype,
    condition=fv.condition,
    max_new_tokens=fv.max_new_tokens,
    devices=fv.devices,
  )


def _main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise SampleError(f"give a subcommand, one of {', '.join(SUBCOMMANDS)} (--help for more)")
  if len(argv) > 2 or argv[1] not in SUBCOMMANDS:
    bad = argv[1] if argv[1] not in SUBCOMMANDS else " ".join(argv[2:])
    raise SampleError(f"unknown subcommand {bad!r}; choose from {', '.join(SUBCOMMANDS)}")
  run(options_from_flags(argv[1], FLAGS))


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI on `argv` (without the program name; default: the command line) and returns
  the exit status (2: bad input, named in one line on stderr)."""
  from puma_jax import cli

  argv = sys.argv if argv is None else ["python -m puma_jax.sample", *argv]
  return cli.run(
    _main, argv, flag_values=FLAGS, doc=__doc__, expected=(ValueError, OSError), positional=True
  )


if __name__ == "__main__":
  raise SystemExit(main())
