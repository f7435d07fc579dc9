"""End-user PUMA pipelines: text-to-image, editing, conditional generation, chat, grounding.

    pipe = PumaPipeline.load(puma_dir, decoders={"f0": dir0, "f3": dir3}, vae=vae_dir,
                             tokenizer=tok_dir)
    images = pipe.text_to_image(["a red circle"], scales=("f4", "f3"))   # {scale: uint8 images}
    images = pipe.edit([img], ["make it blue"])                           # scale chosen by router
    answers = pipe.chat([img], ["What colour is it?"])
    boxes = pipe.ground([img], ["the circle"])

Image features are generated coarse to fine with the KV cache (`generation.generate_features`),
stopping after the finest scale needed; each requested scale is decoded by its own decoder with
classifier-free guidance whose unconditional input is the black image's features at that scale
(docs/DESIGN.md §4). `scales=None` lets the router choose (`router.choose`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from puma_jax import sequence as seq
from puma_jax.data import rows
from puma_jax.diffusion import sampler as sampler_lib
from puma_jax.inference import generation, router, text
from puma_jax.models import clip as clip_lib, pooling


class PumaPipeline:
  """`decoders` maps scales to decoder modules or to converted decoder directories; a directory
  (and a `vae` given as a directory) is loaded on first use, with `load_kw` (dtype,
  param_dtype, mesh), so a request loads only the decoders it decodes with.

  Each decoder is sampled with the noise schedule it was trained with: a directory's recorded
  one (`sampler.decoder_scheduler_config`). `scheduler_config` (one config, or {scale: config})
  sets it for decoders given as modules (default: SDXL's) and may change a directory's sampling
  fields only: one that contradicts its trained schedule raises."""

  def __init__(
    self,
    model,
    *,
    encode,
    decode,
    special: seq.SpecialTokens,
    decoders: Mapping[str, object] | None = None,
    vae=None,
    settings: sampler_lib.SamplerSettings = sampler_lib.SamplerSettings(),
    scheduler_config=None,
    load_kw: Mapping | None = None,
  ):
    self.model, self.encode, self.decode_text, self.special = model, encode, decode, special
    self.decoders: dict[str, object] = {}
    self._decoder_dirs: dict[str, str] = {}
    for name, dec in (decoders or {}).items():
      pooling.scale_index(name)
      if isinstance(dec, (str, os.PathLike)):
        self._decoder_dirs[name] = os.fspath(dec)
      else:
        self._check_decoder(name, dec)
        self.decoders[name] = dec
    self._vae = vae
    self.settings = settings
    self.scheduler_config = scheduler_config  # None | SchedulerConfig | {scale: SchedulerConfig}
    self.load_kw = dict(load_kw or {})
    self._samplers: dict[str, sampler_lib.DecoderSampler] = {}
    self._uncond: dict[str, np.ndarray] = {}

  @staticmethod
  def _check_decoder(name, dec):
    s = pooling.scale_index(name)
    if dec.config.num_tokens != pooling.SCALE_TOKENS[s]:
      raise ValueError(
        f"decoder given for scale {name} ({pooling.SCALE_TOKENS[s]} tokens) "
        f"was built for num_tokens={dec.config.num_tokens}"
      )

  @classmethod
  def load(
    cls,
    puma_dir: str,
    *,
    decoders: Mapping[str, str] | None = None,
    vae: str = "",
    tokenizer: str = "byte",
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    mesh=None,
    **kw,
  ) -> PumaPipeline:
    """The PumaModel is loaded now; decoders and the VAE when first needed (same dtypes)."""
    from puma_jax import checkpoints, tokenizer as tokenizer_lib

    load_kw = {"dtype": dtype, "param_dtype": param_dtype, "mesh": mesh}
    model = checkpoints.load_module(puma_dir, family="puma", **load_kw)
    encode, decode, special = tokenizer_lib.load(tokenizer)
    return cls(
      model,
      encode=encode,
      decode=decode,
      special=special,
      decoders=decoders,
      vae=vae or None,
      load_kw=load_kw,
      **kw,
    )

  @classmethod
  def from_release(cls, release, **kw) -> PumaPipeline:
    """From a release directory (puma_jax/release.py; docs/SAMPLING.md) or `Release`."""
    from puma_jax import release as release_lib

    rel = release if isinstance(release, release_lib.Release) else release_lib.Release.open(release)
    return cls.load(
      str(rel.puma),
      decoders={s: str(p) for s, p in rel.decoders().items()},
      vae=str(rel.vae) if rel.has("vae") else "",
      tokenizer=rel.tokenizer,
      **kw,
    )

  @property
  def scales(self) -> tuple[str, ...]:
    """Scales this pipeline can decode (loaded or loadable), fine to coarse."""
    return tuple(sorted(set(self.decoders) | set(self._decoder_dirs), key=pooling.scale_index))

  def decoder(self, scale: str):
    if scale not in self.decoders:
      if scale not in self._decoder_dirs:
        raise ValueError(
          f"no decoder for scale {scale}: pass decoders={{'{scale}': ...}} "
          f"(available: {list(self.scales) or 'none'})"
        )
      from puma_jax import checkpoints

      dec = checkpoints.load_module(
        self._decoder_dirs[scale], family="puma-decoder", **self.load_kw
      )
      self._check_decoder(scale, dec)
      self.decoders[scale] = dec
    return self.decoders[scale]

  @property
  def vae(self):
    if isinstance(self._vae, (str, os.PathLike)):
      from puma_jax import checkpoints

      self._vae = checkpoints.load_module(self._vae, family="vae", **self.load_kw)
    return self._vae

  @vae.setter
  def vae(self, value):
    self._vae = value

  def scheduler_config_for(self, scale: str):
    """The scheduler config `scale`'s decoder is sampled with (see the class docstring)."""
    given = self.scheduler_config
    if isinstance(given, Mapping):
      given = given.get(scale)
    if scale in self._decoder_dirs:
      path = self._decoder_dirs[scale]
      trained = sampler_lib.decoder_scheduler_config(path)
      return sampler_lib.resolve_scheduler_config(trained, given, f"decoder {scale} ({path})")
    return given

  def sampler(self, scale: str) -> sampler_lib.DecoderSampler:
    """`scale`'s decoder sampler (built once, with `settings` and its scheduler config)."""
    if scale not in self._samplers:
      if self.vae is None:
        raise ValueError("no VAE: pass vae=... to decode features into pixels")
      self._samplers[scale] = sampler_lib.DecoderSampler(
        self.decoder(scale), self.vae, self.settings, self.scheduler_config_for(scale)
      )
    return self._samplers[scale]

  # -- pieces ------------------------------------------------------------------------------------

  def pixels(self, images: Sequence) -> jax.Array:
    """uint8 HWC arrays or PIL images -> (B, 1, S, S, 3) CLIP inputs (the public transform)."""
    x = clip_lib.preprocess_pil(images, self.model.config.clip.image_size)
    return jnp.asarray(x)[:, None]

  def uncond_features(self, scale: str) -> np.ndarray:
    """The black image's features at `scale` (the CFG unconditional input)."""
    if scale not in self._uncond:
      tokens = pooling.SCALE_TOKENS[pooling.scale_index(scale)]
      self._uncond[scale] = np.asarray(clip_lib.black_features(self.model.clip, tokens))[0]
    return self._uncond[scale]

  def _prompts(self, segment_lists) -> list[dict]:
    return [
      seq.build_prompt(segs, self.encode, self.special, open_image=True) for segs in segment_lists
    ]

  def decode_features(self, scale: str, features, seed: int | Sequence[int] = 0) -> np.ndarray:
    """(B, tokens, F) features of `scale` -> uint8 images (B, H, W, 3).

    `seed`: an int (sample b gets key fold_in(key(seed), b)) or one seed per example (example
    b gets fold_in(key(seed[b]), 0), the image it would get alone with that int seed), so an
    image does not depend on the batch it was drawn in."""
    decoder = self.decoder(scale)
    if self.vae is None:
      raise ValueError("no VAE: pass vae=... to decode features into pixels")
    _check_features(scale, features, decoder.config)
    sampler = self.sampler(scale)
    features = jnp.asarray(features, jnp.float32)
    uncond = jnp.broadcast_to(jnp.asarray(self.uncond_features(scale)), features.shape)
    keys = (
      sampler_lib.sample_keys(seed, features.shape[0])
      if np.ndim(seed) == 0
      else (sampler_lib.example_keys(seed))
    )
    if keys.shape[0] != features.shape[0]:
      raise ValueError(f"got {keys.shape[0]} seeds for {features.shape[0]} examples")
    return sampler_lib.to_uint8(sampler(features, uncond, keys))

  def _generate(
    self, kind: str, segment_lists, images, scales, seed, return_features, cond_type=None
  ):
    prompts = self._prompts(segment_lists)
    if isinstance(scales, str):
      scales = (scales,)
    for s in scales or ():
      pooling.scale_index(s)
    # Generate through the finest scale that may be decoded (any, when the router chooses).
    through = "f0" if scales is None else min(scales, key=pooling.scale_index)
    feats, logits = generation.generate_features(self.model, prompts, through, images=images)
    if scales is None:
      chosen = (
        router.choose(kind, logits)
        if logits is not None
        else [router.default_scale(kind, cond_type)] * len(prompts)
      )
      scales = tuple(sorted(set(chosen), key=pooling.scale_index))
      per_example = chosen
    else:
      per_example = None
    out = {}
    for s in scales:
      f = generation.scale_slice(feats, s)
      out[s] = np.asarray(f) if return_features else self.decode_features(s, f, seed)
    if per_example is not None:
      out["chosen"] = list(per_example)
    return out

  # -- end-user pipelines ----------------------------------------------------------------------

  def text_to_image(
    self,
    prompts: str | Sequence[str],
    scales=("f3",),
    *,
    seed: int = 0,
    return_features: bool = False,
  ) -> dict:
    """{scale: uint8 images (B, H, W, 3)} for each requested scale (figure 9 of the paper);
    `scales=None`: one scale per prompt chosen by the router (its names under "chosen")."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    _check_texts(prompts, "prompts")
    _check_scales(scales)
    return self._generate(
      "t2i", [[seq.Text(p)] for p in prompts], None, scales, seed, return_features
    )

  def edit(
    self,
    images: Sequence,
    instructions: Sequence[str],
    scales=None,
    *,
    seed: int = 0,
    return_features: bool = False,
  ) -> dict:
    _check_pairs(images, instructions, "instructions")
    _check_scales(scales)
    segs = [[seq.Image(0), seq.Text(t)] for t in instructions]
    return self._generate("edit", segs, self.pixels(images), scales, seed, return_features)

  def conditional(
    self,
    images: Sequence,
    cond_type: str,
    prompt: str | Sequence[str] = "",
    scales=None,
    *,
    seed: int = 0,
    return_features: bool = False,
  ) -> dict:
    """canny-to-image, inpainting or colorization from condition images (one prompt for all,
    or one per image)."""
    _check_images(images)
    _check_scales(scales)
    prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(images):
      raise ValueError(f"got {len(prompts)} prompts for {len(images)} condition images")
    segs = [seq.conditional(cond_type, p)[:2] for p in prompts]
    return self._generate(
      "conditional", segs, self.pixels(images), scales, seed, return_features, cond_type=cond_type
    )

  def chat(
    self, images: Sequence, questions: Sequence[str], max_new_tokens: int = 64, **sampling
  ) -> list[str]:
    """Answers with the paper's system message (LLaVA-1.5 layout), each prompt built by the
    training layout itself (`data.rows.chat_prompt`)."""
    _check_pairs(images, questions, "questions")
    prompts = [seq.build_prompt(rows.chat_prompt(q), self.encode, self.special) for q in questions]
    out = text.generate_text(
      self.model,
      prompts,
      max_new_tokens,
      images=self.pixels(images),
      stop_tokens=(self.special.eos,),
      **sampling,
    )
    return [self.decode_text([t for t in o if t != self.special.eos]).strip() for o in out]

  def ground(self, images: Sequence, phrases: Sequence[str]) -> list[list[float]]:
    """One normalized [x_min, y_min, x_max, y_max] box per phrase, asked as training lays a
    grounded caption out (`sequence.grounding_prompt`: image, grounding marker, phrase)."""
    _check_pairs(images, phrases, "phrases")
    prompts = [
      seq.build_prompt(seq.grounding_prompt(p, [(0, len(p))]), self.encode, self.special)
      for p in phrases
    ]
    return self.answer_boxes(prompts, images)

  def answer_boxes(self, prompts: Sequence[dict], images: Sequence) -> list[list[float]]:
    """The box each grounding prompt (`sequence.build_prompt` of a `sequence.grounding_prompt`)
    asks for, one image per prompt. Decoding is restricted to the position tokens for exactly
    4 tokens, so every prompt gets a box: unrestricted, a model may continue the caption."""
    _check_images(images)
    if len(prompts) != len(images):
      raise ValueError(f"got {len(images)} image(s) and {len(prompts)} prompts: give one per image")
    out = text.generate_text(
      self.model,
      prompts,
      4,
      images=self.pixels(images),
      stop_tokens=(),
      allowed_tokens=self.special.positions,
    )
    return [seq.bins_to_box([t - self.special.pos0 for t in toks]) for toks in out]


# -- input checks of the public methods: a wrong input is a ValueError naming it, never a
# silently shorter (zip) or black (NaN) result.


def _check_texts(texts, what: str) -> None:
  if isinstance(texts, str) or not isinstance(texts, Sequence):
    raise ValueError(f"{what} must be a list of strings, got {type(texts).__name__}")
  if not texts:
    raise ValueError(f"{what} is empty: give at least one")
  bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
  if bad:
    raise ValueError(f"{what}[{bad[0]}] is a {type(texts[bad[0]]).__name__}, not a string")


def _check_images(images) -> None:
  if isinstance(images, (str, bytes)) or not hasattr(images, "__len__"):
    raise ValueError(f"images must be a list of images, got {type(images).__name__}")
  if len(images) == 0:
    raise ValueError("images is empty: give at least one")
  for i, img in enumerate(images):
    size = getattr(img, "size", None)
    shape = (size[1], size[0]) if isinstance(size, tuple) else np.shape(img)[:2]
    if len(shape) < 2 or min(shape) < 1:
      raise ValueError(f"images[{i}] is empty (size {tuple(shape)})")


def _check_pairs(images, texts, what: str) -> None:
  """One text per image: a mismatch would otherwise drop or repeat examples silently."""
  _check_images(images)
  _check_texts(texts, what)
  if len(images) != len(texts):
    raise ValueError(f"got {len(images)} image(s) and {len(texts)} {what}: give one per image")


def _check_scales(scales) -> None:
  if scales is None:
    return
  names = (scales,) if isinstance(scales, str) else tuple(scales)
  if not names:
    raise ValueError(
      "scales=() names no scale: give one or more of f0..f4, or None to let the router choose"
    )
  for s in names:
    pooling.scale_index(s)


def _check_features(scale: str, features, config) -> None:
  shape = tuple(np.shape(features))
  want = (pooling.SCALE_TOKENS[pooling.scale_index(scale)], config.mapping_dim)
  if len(shape) != 3 or shape[0] < 1 or shape[1:] != want:
    raise ValueError(
      f"features for {scale} must have shape (B >= 1, {want[0]}, {want[1]}); got {shape}"
    )
  if not np.all(np.isfinite(np.asarray(features, np.float32))):
    raise ValueError(f"features for {scale} contain NaN or infinite values")
