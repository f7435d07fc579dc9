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

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from puma_jax import sequence as seq
from puma_jax.diffusion import sampler as sampler_lib
from puma_jax.inference import generation, router, text
from puma_jax.models import clip as clip_lib, pooling


class PumaPipeline:

  def __init__(self, model, *, encode, decode, special: seq.SpecialTokens,
               decoders: Mapping[str, object] | None = None, vae=None,
               settings: sampler_lib.SamplerSettings = sampler_lib.SamplerSettings()):
    self.model, self.encode, self.decode_text, self.special = model, encode, decode, special
    self.decoders = dict(decoders or {})
    for name, dec in self.decoders.items():
      s = pooling.scale_index(name)
      if dec.config.num_tokens != pooling.SCALE_TOKENS[s]:
        raise ValueError(f"decoder given for scale {name} ({pooling.SCALE_TOKENS[s]} tokens) "
                         f"was built for num_tokens={dec.config.num_tokens}")
    self.vae = vae
    self.settings = settings
    self._samplers: dict[str, sampler_lib.DecoderSampler] = {}
    self._uncond: dict[str, np.ndarray] = {}

  @classmethod
  def load(cls, puma_dir: str, *, decoders: Mapping[str, str] | None = None, vae: str = "",
           tokenizer: str = "byte", dtype=jnp.float32, **kw) -> PumaPipeline:
    from puma_jax import checkpoints, tokenizer as tokenizer_lib
    model = checkpoints.load_module(puma_dir, family="puma", dtype=dtype)
    encode, decode, special = tokenizer_lib.load(tokenizer)
    decs = {s: checkpoints.load_module(d, family="puma-decoder", dtype=dtype)
            for s, d in (decoders or {}).items()}
    v = checkpoints.load_module(vae, family="vae", dtype=dtype) if vae else None
    return cls(model, encode=encode, decode=decode, special=special, decoders=decs, vae=v, **kw)

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
    return [seq.build_prompt(segs, self.encode, self.special, open_image=True)
            for segs in segment_lists]

  def decode_features(self, scale: str, features, seed: int = 0) -> np.ndarray:
    """(B, tokens, F) features of `scale` -> uint8 images (B, H, W, 3)."""
    if scale not in self.decoders:
      raise ValueError(f"no decoder for scale {scale}: pass decoders={{'{scale}': ...}} "
                       f"(loaded: {sorted(self.decoders) or 'none'})")
    if self.vae is None:
      raise ValueError("no VAE: pass vae=... to decode features into pixels")
    if scale not in self._samplers:
      self._samplers[scale] = sampler_lib.DecoderSampler(self.decoders[scale], self.vae,
                                                         self.settings)
    features = jnp.asarray(features, jnp.float32)
    uncond = jnp.broadcast_to(jnp.asarray(self.uncond_features(scale)), features.shape)
    keys = sampler_lib.sample_keys(seed, features.shape[0])
    return sampler_lib.to_uint8(self._samplers[scale](features, uncond, keys))

  def _generate(self, kind: str, segment_lists, images, scales, seed, return_features,
                cond_type=None):
    prompts = self._prompts(segment_lists)
    if isinstance(scales, str):
      scales = (scales,)
    for s in scales or ():
      pooling.scale_index(s)
    # Generate through the finest scale that may be decoded (any, when the router chooses).
    through = "f0" if scales is None else min(scales, key=pooling.scale_index)
    feats, logits = generation.generate_features(self.model, prompts, through, images=images)
    if scales is None:
      chosen = (router.choose(kind, logits) if logits is not None else
                [router.default_scale(kind, cond_type)] * len(prompts))
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

  def text_to_image(self, prompts: str | Sequence[str], scales=("f3",), *, seed: int = 0,
                    return_features: bool = False) -> dict:
    """{scale: uint8 images (B, H, W, 3)} for each requested scale (figure 9 of the paper);
    `scales=None`: one scale per prompt chosen by the router (its names under "chosen")."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return self._generate("t2i", [[seq.Text(p)] for p in prompts], None, scales, seed,
                          return_features)

  def edit(self, images: Sequence, instructions: Sequence[str], scales=None, *, seed: int = 0,
           return_features: bool = False) -> dict:
    segs = [[seq.Image(0), seq.Text(t)] for t in instructions]
    return self._generate("edit", segs, self.pixels(images), scales, seed, return_features)

  def conditional(self, images: Sequence, cond_type: str, prompt: str = "", scales=None, *,
                  seed: int = 0, return_features: bool = False) -> dict:
    """canny-to-image, inpainting or colorization from condition images."""
    segs = [seq.conditional(cond_type, prompt)[:2] for _ in images]
    return self._generate("conditional", segs, self.pixels(images), scales, seed,
                          return_features, cond_type=cond_type)

  def chat(self, images: Sequence, questions: Sequence[str], max_new_tokens: int = 64,
           **sampling) -> list[str]:
    """Answers with the paper's system message (LLaVA-1.5 layout)."""
    segs = [[seq.Text(seq.SYSTEM_MESSAGE + " USER: "), seq.Image(0),
             seq.Text("\n" + q + " ASSISTANT:")] for q in questions]
    prompts = [seq.build_prompt(s, self.encode, self.special) for s in segs]
    out = text.generate_text(self.model, prompts, max_new_tokens, images=self.pixels(images),
                             stop_tokens=(self.special.eos,), **sampling)
    return [self.decode_text([t for t in o if t != self.special.eos]).strip() for o in out]

  def ground(self, images: Sequence, phrases: Sequence[str]) -> list[list[float] | None]:
    """One normalized [x_min, y_min, x_max, y_max] box per phrase (None if the model did not
    answer with four position tokens)."""
    prompts = [seq.build_prompt([seq.Image(0), seq.Text(p)], self.encode, self.special)
               for p in phrases]
    out = text.generate_text(self.model, prompts, 5, images=self.pixels(images),
                             stop_tokens=(self.special.eos,))
    p0 = self.special.pos0
    boxes = []
    for toks in out:
      bins = [t - p0 for t in toks if 0 <= t - p0 < seq.NUM_POSITION_TOKENS][:4]
      boxes.append(seq.bins_to_box(bins) if len(bins) == 4 else None)
    return boxes
