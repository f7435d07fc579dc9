"""Image metrics of the paper's evaluation protocols (docs/DESIGN.md §13), in JAX.

Two layers:
  * pure, jit-able, batched functions of (model, images): `psnr`, `lpips`, `clip_image_embeds`,
    `clip_text_embeds`, `clip_i`, `clip_t`, `dino_score`, `cosine`. They take NHWC float images
    **in [0, 1]** and return one value per image (B,). Range conversions needed by a reference
    ([-1, 1] for LPIPS, CLIP/ImageNet normalization for CLIP/DINO) happen inside.
  * loaded scorers (`LPIPSMetric`, `CLIPScorer`, `DINOScorer`): built from converted weight
    directories (`python -m puma_jax.convert ...`), holding split parameters and jitted
    functions; calling them validates inputs on the host first (shape, size agreement, value
    range), so misuse fails with a message instead of a silently wrong number.

Conventions (match the paper's tables):
  PSNR     per image, 10 log10(data_range^2 / MSE) over all pixels and channels; identical
           images give +inf. Images in [0, data_range] (default 1).
  LPIPS    v0.1, AlexNet trunk + linear heads (lpips package, `normalize=True` semantics: [0, 1]
           inputs mapped to [-1, 1]). Lower = more similar.
  LPIPS_d  diversity: LPIPS between two generations of the same prompt (different seeds).
  CLIP-I   cosine of the CLIP ViT-B/32 image embeddings (after `visual_projection`) of the
           generated and the reference image; raw cosine in [-1, 1], *not* scaled by 100.
  CLIP-T   cosine of the image embedding and the caption's text embedding (after
           `text_projection`); raw cosine (the paper's ~0.3 values), not scaled by 100, not
           clipped at 0.
  DINO     cosine of DINO ViT-S/16 class-token features (final layernorm, no pooler).
CLIP images are resized shortest-side-to-224 (bicubic) and center-cropped like
`CLIPImageProcessor`; DINO images are resized to 224x224 like a `ViTImageProcessor`, with the
filter and mean/std of the checkpoint's `preprocessor_config.json` when it is present (bicubic and
ImageNet statistics otherwise). Resizing uses `jax.image.resize` (antialiased), close to but not
bit-identical with PIL.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from puma_jax import checkpoints
from puma_jax.models import clip as clip_vision
from puma_jax.models import vit

# Slack for float images that went through a decoder and a clip: tiny excursions are rounding.
RANGE_TOLERANCE = 1e-3


class MetricInputError(ValueError):
  """Images or tokens that a metric cannot score; the message names the argument."""


class MissingWeightsError(FileNotFoundError):
  """A metric's converted weight directory is absent."""


# ----------------------------------------------------------------------------------------------
# Input checks (host side; skipped for values under a jax trace)


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def check_images(
  x, name: str = "images", value_range: tuple[float, float] = (0.0, 1.0), channels: int = 3
) -> None:
  """Raises `MetricInputError` unless `x` is a float NHWC batch within `value_range`."""
  shape = tuple(np.shape(x))
  if len(shape) != 4:
    hint = " (add a batch axis)" if len(shape) == 3 else ""
    raise MetricInputError(
      f"{name}: expected NHWC images (batch, height, width, {channels}); got shape {shape}{hint}"
    )
  if shape[-1] != channels:
    hint = " (it looks NCHW: transpose to NHWC)" if shape[1] == channels else ""
    raise MetricInputError(f"{name}: expected {channels} channels last; got shape {shape}{hint}")
  if shape[0] == 0:
    raise MetricInputError(f"{name}: empty batch")
  dtype = getattr(x, "dtype", np.dtype(np.float32))
  if not jnp.issubdtype(dtype, jnp.floating):  # jnp: knows bfloat16
    raise MetricInputError(
      f"{name}: expected float images in [{value_range[0]}, "
      f"{value_range[1]}]; got dtype {dtype} (divide uint8 images by 255)"
    )
  if _is_traced(x):
    return
  arr = np.asarray(x, np.float32)
  if not np.isfinite(arr).all():
    raise MetricInputError(f"{name}: contains NaN or infinite values")
  lo, hi = float(arr.min()), float(arr.max())
  tol = RANGE_TOLERANCE * (value_range[1] - value_range[0])
  if lo < value_range[0] - tol or hi > value_range[1] + tol:
    hint = ""
    if value_range == (0.0, 1.0) and lo >= -1 - tol and lo < 0:
      hint = "; images in [-1, 1] must be mapped with (x + 1) / 2"
    elif value_range == (0.0, 1.0) and hi > 1 + tol and hi <= 255:
      hint = "; images in [0, 255] must be divided by 255"
    raise MetricInputError(
      f"{name}: values span [{lo:.4g}, {hi:.4g}], outside "
      f"[{value_range[0]}, {value_range[1]}]{hint}"
    )


def check_pair(a, b, names=("images", "references")) -> None:
  """Two batches that are compared image by image must have the same shape."""
  check_images(a, names[0])
  check_images(b, names[1])
  if tuple(np.shape(a)) != tuple(np.shape(b)):
    raise MetricInputError(
      f"{names[0]} {tuple(np.shape(a))} and {names[1]} "
      f"{tuple(np.shape(b))} differ in shape; resize them to one size first"
    )


def check_same_batch(images, references) -> None:
  """Two checked batches compared item by item; unlike `check_pair` their image sizes may
  differ (each side is resized on its own)."""
  check_images(images, "images")
  check_images(references, "references")
  if np.shape(images)[0] != np.shape(references)[0]:
    raise MetricInputError(
      f"images ({np.shape(images)[0]}) and references "
      f"({np.shape(references)[0]}) differ in batch size"
    )


def stack_images(images: Sequence, name: str = "images") -> np.ndarray:
  """A list of HWC images of one size -> an NHWC batch; mixed sizes are an error naming them."""
  if len(images) == 0:
    raise MetricInputError(f"{name}: no images")
  arrays = [np.asarray(im) for im in images]
  first = arrays[0].shape
  for i, a in enumerate(arrays):
    if a.ndim != 3:
      raise MetricInputError(f"{name}[{i}]: expected an HWC image; got shape {a.shape}")
    if a.shape != first:
      raise MetricInputError(
        f"{name}: mixed image sizes: {name}[0] is {first}, {name}[{i}] is "
        f"{a.shape}; resize them to one size first"
      )
  return np.stack(arrays)


# ----------------------------------------------------------------------------------------------
# Pure metric functions (jit-able; images NHWC in [0, 1])


def psnr(a: jax.Array, b: jax.Array, data_range: float = 1.0) -> jax.Array:
  """Per-image PSNR in dB, (B,)."""
  diff = a.astype(jnp.float32) - b.astype(jnp.float32)
  mse = jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))
  return 10.0 * jnp.log10(jnp.float32(data_range) ** 2 / mse)


def cosine(a: jax.Array, b: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Row-wise cosine similarity of (B, D) embeddings."""
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  na = jnp.sqrt(jnp.sum(a * a, -1))
  nb = jnp.sqrt(jnp.sum(b * b, -1))
  return jnp.sum(a * b, -1) / jnp.maximum(na * nb, eps)


def lpips(model, a: jax.Array, b: jax.Array) -> jax.Array:
  """LPIPS distance per image pair, (B,); `model` a `puma_jax.models.lpips.LPIPS`."""
  return model(2.0 * a - 1.0, 2.0 * b - 1.0)


def resize_center_crop(images: jax.Array, size: int, method: str = "cubic") -> jax.Array:
  """Shortest side to `size` then a centered size x size crop (CLIPImageProcessor geometry)."""
  b, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  short, long = (h, w) if h <= w else (w, h)
  new_long = int(size * long / short)
  nh, nw = (size, new_long) if h <= w else (new_long, size)
  images = jax.image.resize(images, (b, nh, nw, c), method, antialias=True)
  top, left = (nh - size) // 2, (nw - size) // 2
  return images[:, top : top + size, left : left + size]


def clip_pixels(images: jax.Array, size: int) -> jax.Array:
  x = resize_center_crop(images.astype(jnp.float32), size)
  return clip_vision.normalize(x)


def clip_image_embeds(model, images: jax.Array) -> jax.Array:
  """Projected CLIP image embeddings (B, P) of [0, 1] images; `model` a `clip_text.CLIPModel`."""
  return model.get_image_features(clip_pixels(images, model.config.vision_config.image_size))


def clip_text_embeds(
  model, input_ids: jax.Array, attention_mask: jax.Array | None = None
) -> jax.Array:
  return model.get_text_features(input_ids, attention_mask)


def clip_i(model, images: jax.Array, references: jax.Array) -> jax.Array:
  """CLIP-I per pair, (B,): raw cosine of the image embeddings."""
  both = clip_image_embeds(model, jnp.concatenate([images, references], 0))
  n = images.shape[0]
  return cosine(both[:n], both[n:])


def clip_t(
  model, images: jax.Array, input_ids: jax.Array, attention_mask: jax.Array | None = None
) -> jax.Array:
  """CLIP-T per (image, caption), (B,): raw cosine of image and text embeddings."""
  return cosine(
    clip_image_embeds(model, images), clip_text_embeds(model, input_ids, attention_mask)
  )


def dino_features(model, images: jax.Array, preprocessing: dict | None = None) -> jax.Array:
  """Class-token features (B, D); `preprocessing`: keyword arguments of `vit.preprocess`."""
  kw = {"size": model.config.image_size, **(preprocessing or {})}
  return model.cls_features(vit.preprocess(images, **kw))


def dino_score(
  model, images: jax.Array, references: jax.Array, preprocessing: dict | None = None
) -> jax.Array:
  """DINO per pair, (B,): cosine of DINO ViT-S/16 class tokens; `model` a `vit.ViTModel`."""
  both = dino_features(model, jnp.concatenate([images, references], 0), preprocessing)
  n = images.shape[0]
  return cosine(both[:n], both[n:])


# ----------------------------------------------------------------------------------------------
# Loaded scorers


def load_weights(path, family: str, what: str, dtype=jnp.float32, mesh=None) -> nnx.Module:
  """`checkpoints.load_module` with an error that says how to produce the missing directory."""
  path = Path(path) if path else None
  if path is None or not (path / checkpoints.CONFIG_FILE).exists():
    reason = (
      "no directory given"
      if path is None
      else (f"{path} does not exist" if not path.exists() else f"{path} holds no converted model")
    )
    raise MissingWeightsError(
      f"{what} needs converted {family!r} weights: {reason}; make them "
      f"with `python -m puma_jax.convert {family} --src=... --dst=DIR`"
    )
  return checkpoints.load_module(path, dtype=dtype, mesh=mesh, family=family)


class _Scorer:
  """Holds a split model; `self._jit(fn)` jits `fn(model, *args)` with parameters as inputs."""

  def __init__(self, model: nnx.Module):
    self.model = model
    self.graphdef, self.state = nnx.split(model)

  def _jit(self, fn):
    graphdef = self.graphdef
    jitted = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
    return lambda *args: jitted(self.state, *args)


class LPIPSMetric(_Scorer):
  """`LPIPSMetric.load(dir)(images, references)` -> LPIPS per pair (B,), images in [0, 1]."""

  family = "lpips-alex"

  def __init__(self, model):
    super().__init__(model)
    self._fn = self._jit(lpips)

  @classmethod
  def load(cls, path, mesh=None):
    return cls(load_weights(path, cls.family, "LPIPS", mesh=mesh))

  def __call__(self, images, references) -> jax.Array:
    check_pair(images, references)
    return self._fn(jnp.asarray(images), jnp.asarray(references))

  def diversity(self, first, second) -> jax.Array:
    """LPIPS_d: LPIPS between two generations of the same prompts (one pair per prompt)."""
    check_pair(first, second, ("first generations", "second generations"))
    return self._fn(jnp.asarray(first), jnp.asarray(second))


class CLIPScorer(_Scorer):
  """CLIP-I / CLIP-T from a converted `clip` directory (CLIP ViT-B/32 for the paper)."""

  family = "clip"

  def __init__(self, model, tokenizer=None):
    super().__init__(model)
    self.tokenizer = tokenizer
    self._image = self._jit(clip_image_embeds)
    self._text = self._jit(clip_text_embeds)
    self._clip_i = self._jit(clip_i)
    self._clip_t = self._jit(clip_t)

  @classmethod
  def load(cls, path, mesh=None, tokenizer: bool = True):
    model = load_weights(path, cls.family, "CLIP-I/CLIP-T", mesh=mesh)
    tok = None
    if tokenizer:
      from puma_jax.evaluation import clip_tokenizer

      tok = clip_tokenizer.load(path)
    return cls(model, tok)

  def tokenize(self, texts: Sequence[str]):
    if self.tokenizer is None:
      raise MetricInputError(
        "CLIP-T on raw text needs a tokenizer; load the scorer from a "
        "directory holding vocab.json and merges.txt"
      )
    from puma_jax.evaluation import clip_tokenizer

    return clip_tokenizer.tokenize(
      self.tokenizer, texts, self.model.config.text_config.max_position_embeddings
    )

  def image_embeds(self, images) -> jax.Array:
    check_images(images)
    return self._image(jnp.asarray(images))

  def text_embeds(self, texts: Sequence[str]) -> jax.Array:
    ids, mask = self.tokenize(texts)
    return self._text(jnp.asarray(ids), jnp.asarray(mask))

  def clip_i(self, images, references) -> jax.Array:
    check_same_batch(images, references)
    a, b = jnp.asarray(images), jnp.asarray(references)
    if a.shape[1:] != b.shape[1:]:  # each side is resized on its own; one jit per shape
      return cosine(self._image(a), self._image(b))
    return self._clip_i(a, b)

  def clip_t(self, images, texts: Sequence[str]) -> jax.Array:
    check_images(images)
    if isinstance(texts, str):
      raise MetricInputError("texts must be a list of captions, one per image; got one string")
    if len(texts) != np.shape(images)[0]:
      raise MetricInputError(f"{len(texts)} captions for {np.shape(images)[0]} images")
    ids, mask = self.tokenize(texts)
    return self._clip_t(jnp.asarray(images), jnp.asarray(ids), jnp.asarray(mask))


# PIL resample codes of `preprocessor_config.json` -> jax.image.resize methods.
_RESAMPLE = {2: "linear", 3: "cubic"}


def vit_preprocessing(path) -> dict:
  """`vit.preprocess` keywords from a converted directory's `preprocessor_config.json`, if any."""
  cfg_path = Path(path) / "preprocessor_config.json"
  if not cfg_path.exists():
    return {}
  import json

  cfg = json.loads(cfg_path.read_text())
  out = {}
  if "resample" in cfg:
    if cfg["resample"] not in _RESAMPLE:
      raise MetricInputError(
        f"{cfg_path}: resample={cfg['resample']} is not supported "
        f"(supported: {sorted(_RESAMPLE)}, bilinear and bicubic)"
      )
    out["method"] = _RESAMPLE[cfg["resample"]]
  if cfg.get("do_normalize", True):
    out.update(
      {k: tuple(cfg[f]) for k, f in (("mean", "image_mean"), ("std", "image_std")) if f in cfg}
    )
  else:
    out.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  return out


class DINOScorer(_Scorer):
  """`DINOScorer.load(dir)(images, references)` -> DINO score per pair (B,)."""

  family = "dino-vit"

  def __init__(self, model, preprocessing: dict | None = None):
    super().__init__(model)
    self.preprocessing = dict(preprocessing or {})
    pre = self.preprocessing
    self._features = self._jit(lambda m, x: dino_features(m, x, pre))
    self._score = self._jit(lambda m, x, y: dino_score(m, x, y, pre))

  @classmethod
  def load(cls, path, mesh=None):
    model = load_weights(path, cls.family, "DINO score", mesh=mesh)
    return cls(model, vit_preprocessing(path))

  def features(self, images) -> jax.Array:
    check_images(images)
    return self._features(jnp.asarray(images))

  def __call__(self, images, references) -> jax.Array:
    check_same_batch(images, references)
    a, b = jnp.asarray(images), jnp.asarray(references)
    if a.shape[1:] != b.shape[1:]:
      return cosine(self._features(a), self._features(b))
    return self._score(a, b)


_psnr_jit = jax.jit(psnr, static_argnames=("data_range",))


def psnr_checked(images, references, data_range: float = 1.0) -> jax.Array:
  """Host-checked, jitted `psnr`."""
  check_images(images, "images", (0.0, data_range))
  check_images(references, "references", (0.0, data_range))
  if tuple(np.shape(images)) != tuple(np.shape(references)):
    raise MetricInputError(
      f"images {tuple(np.shape(images))} and references "
      f"{tuple(np.shape(references))} differ in shape"
    )
  return _psnr_jit(jnp.asarray(images), jnp.asarray(references), data_range=float(data_range))
