"""PumaModel: frozen CLIP -> five scales -> projector -> LLaMA -> LM head + feature head.

docs/DESIGN.md §6, with our decisions marked there: an input projector (2-layer MLP,
feature_dim -> d_model) plus a learned embedding per scale and per position within the scale
maps features into the sequence; an output head (2-layer MLP, d_model -> feature_dim) regresses
at each position the *next* feature token. An optional router head reads the hidden state at
`[IMG]` and scores the five scales (the scale to decode; see `puma_jax.inference.router`).

Batches follow `puma_jax.sequence.pack`: per-position `tokens`, `positions`, `segment_ids`,
`image_index` (which of the row's images, -1 for text), `image_token` (0..340 within the
image, f4 first) and either `images` (B, M, H, W, 3) preprocessed for CLIP or precomputed
`image_features` (B, M, 341, feature_dim).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from puma_jax import sharding
from puma_jax.models import clip as clip_lib
from puma_jax.models import layers, llama, pooling
from puma_jax.models.base import ModelConfig
from puma_jax.sequence import GEN_ORDER, IMAGE_TOKENS, SLOT_POS, SLOT_SCALE

NUM_SCALES = 5


@dataclasses.dataclass(frozen=True)
class PumaConfig(ModelConfig):
  llm: llama.LlamaConfig = dataclasses.field(default_factory=llama.LlamaConfig)
  clip: clip_lib.CLIPVisionConfig = dataclasses.field(default_factory=clip_lib.CLIPVisionConfig)
  img_start_id: int = 3  # [IMG]
  img_end_id: int = 4  # [/IMG]
  pos0_id: int = 5  # first of the 224 grounding position tokens
  pad_id: int = 0
  router: bool = False  # learned scale-router head on the [IMG] hidden state

  def __post_init__(self):
    if isinstance(self.llm, Mapping):
      object.__setattr__(self, "llm", llama.LlamaConfig.from_dict(self.llm))
    if isinstance(self.clip, Mapping):
      object.__setattr__(self, "clip", clip_lib.CLIPVisionConfig.from_dict(self.clip))
    if self.clip.grid != 16:
      raise ValueError(
        f"PumaConfig: the CLIP patch grid must be 16x16 for PUMA's five scales; "
        f"clip.image_size={self.clip.image_size} / patch_size="
        f"{self.clip.patch_size} gives {self.clip.grid}x{self.clip.grid}"
      )
    v = self.llm.vocab_size
    for f in ("img_start_id", "img_end_id", "pad_id"):
      if not 0 <= getattr(self, f) < v:
        raise ValueError(
          f"PumaConfig: {f}={getattr(self, f)} outside the vocabulary (llm.vocab_size={v})"
        )
    if not 0 <= self.pos0_id <= v - 224:
      raise ValueError(
        f"PumaConfig: pos0_id={self.pos0_id} leaves no room for 224 position "
        f"tokens in llm.vocab_size={v}"
      )

  @property
  def feature_dim(self) -> int:
    return self.clip.hidden_size

  def to_dict(self):
    d = dataclasses.asdict(self)
    d["llm"] = self.llm.to_dict()
    d["clip"] = self.clip.to_dict()
    return d


class MLP2(nnx.Module):
  """Linear -> GELU -> Linear."""

  def __init__(self, d_in, d_hidden, d_out, axes, *, dtype, param_dtype, rngs):
    self.fc1 = layers.Dense(
      d_in, d_hidden, axes=(axes[0], axes[1]), dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.fc2 = layers.Dense(
      d_hidden, d_out, axes=(axes[1], axes[2]), dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


def encode_features(clip: nnx.Module, images: jax.Array) -> jax.Array:
  """(..., H, W, 3) preprocessed images -> (..., 341, F): the frozen CLIP's five scales, f4
  first, in the order the MLLM's sequence holds them (`sequence.GEN_ORDER`)."""
  lead = images.shape[:-3]
  flat = images.reshape((-1,) + images.shape[-3:])
  feats = scale_features(clip_lib.patch_features(clip, flat))
  return feats.reshape(lead + feats.shape[1:])


def scale_features(patches: jax.Array) -> jax.Array:
  """(B, N, F) CLIP patch tokens -> (B, 341, F): their five scales, f4 first (`encode_features`
  without the CLIP)."""
  scales = pooling.multi_granular(jax.lax.stop_gradient(jnp.asarray(patches)))
  return jnp.concatenate([scales[s] for s in GEN_ORDER], axis=1)


class PumaModel(nnx.Module):
  def __init__(
    self, config: PumaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ):
    self.config = config
    self.dtype = dtype
    d, f = config.llm.hidden_size, config.feature_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.clip = clip_lib.CLIPVisionModel(config.clip, **kw)
    self.llm = llama.LlamaForCausalLM(config.llm, **kw)
    # The feature width is a model width too: "embed" lets FSDP shard both ends.
    self.projector = MLP2(f, d, d, ("embed", "mlp", "embed"), **kw)
    self.scale_embed = layers.param(
      rngs, nnx.initializers.normal(0.02), (NUM_SCALES, d), (None, "embed"), param_dtype
    )
    self.pos_embed = layers.param(
      rngs, nnx.initializers.normal(0.02), (256, d), (None, "embed"), param_dtype
    )
    self.head = MLP2(d, d, f, ("embed", "mlp", "embed"), **kw)
    self.router = layers.Dense(d, NUM_SCALES, axes=("embed", None), **kw) if config.router else None

  # -- features ----------------------------------------------------------------------------------

  def encode_images(self, images: jax.Array) -> jax.Array:
    """(..., H, W, 3) preprocessed images -> (..., 341, F) features, f4 first, frozen CLIP."""
    return encode_features(self.clip, images)

  def slot_embed(self, feats: jax.Array, slot: jax.Array) -> jax.Array:
    """Projected features plus their scale and in-scale position embeddings."""
    slot = jnp.clip(slot, 0, IMAGE_TOKENS - 1)
    scale = jnp.asarray(SLOT_SCALE)[slot]
    pos = jnp.asarray(SLOT_POS)[slot]
    e = self.projector(feats.astype(self.dtype))
    return (
      e
      + self.scale_embed[...].astype(self.dtype)[scale]
      + self.pos_embed[...].astype(self.dtype)[pos]
    )

  def gather_features(
    self, image_feats: jax.Array, image_index: jax.Array, image_token: jax.Array
  ) -> jax.Array:
    """(B, M, 341, F) per-row image features -> (B, T, F) aligned with the sequence."""
    b = image_index.shape[0]
    rows = jnp.arange(b)[:, None]
    g = image_feats[rows, jnp.maximum(image_index, 0), jnp.maximum(image_token, 0)]
    return jnp.where((image_index >= 0)[..., None], g, 0).astype(image_feats.dtype)

  def input_embeddings(self, tokens, image_index, image_token, feats):
    """Token embeddings at text positions, slot embeddings at feature positions."""
    is_feat = (image_index >= 0)[..., None]
    tok = self.llm.embed(jnp.where(image_index >= 0, self.config.pad_id, tokens))
    x = jnp.where(is_feat, self.slot_embed(feats, image_token), tok)
    return sharding.constrain(x, ("batch", "act_seq", "act_embed"))

  # -- training forward --------------------------------------------------------------------------

  def __call__(self, batch: Mapping[str, jax.Array], logits: bool = True) -> dict[str, jax.Array]:
    """Teacher-forced forward. Returns logits (B, T, V) float32, feature_pred (B, T, F),
    features (B, T, F) (the inputs at feature slots: shifted by one, the targets) and, with a
    router, router_logits (B, T, 5). With `logits=False`, `hidden` (B, T, D) (what
    `self.llm.logits` projects) instead of the logits: the training loss projects it in chunks
    (`losses.text_ce`)."""
    tokens = jnp.asarray(batch["tokens"])
    if "image_features" in batch:
      image_feats = jnp.asarray(batch["image_features"])
      if image_feats.shape[-2:] != (IMAGE_TOKENS, self.config.feature_dim):
        raise ValueError(
          f"image_features must be (batch, images, {IMAGE_TOKENS}, "
          f"{self.config.feature_dim}); got {tuple(image_feats.shape)}"
        )
    else:
      image_feats = self.encode_images(jnp.asarray(batch["images"]))
    feats = self.gather_features(image_feats, batch["image_index"], batch["image_token"])
    x = self.input_embeddings(tokens, batch["image_index"], batch["image_token"], feats)
    hidden, _ = self.llm.decode_embeddings(
      x, positions=batch.get("positions"), segment_ids=batch.get("segment_ids")
    )
    out = {"feature_pred": self.head(hidden), "features": feats}
    if logits:
      out["logits"] = self.llm.logits(hidden)
    else:
      out["hidden"] = hidden
    if self.router is not None:
      out["router_logits"] = self.router(hidden).astype(jnp.float32)
    return out


def tiny(vocab_size: int = 512, router: bool = True, **llm_kw) -> PumaConfig:
  """Toy PUMA for CPU: byte-level vocabulary (see sequence.ByteTokenizer), tiny CLIP/LLaMA."""
  from puma_jax.tokenizer import ByteTokenizer

  tok = ByteTokenizer()
  llm_cfg = llama.tiny(vocab_size=vocab_size, max_position_embeddings=2048, **llm_kw)
  s = tok.special
  return PumaConfig(
    llm=llm_cfg,
    clip=clip_lib.tiny(),
    img_start_id=s.img_start,
    img_end_id=s.img_end,
    pos0_id=s.pos0,
    pad_id=s.pad,
    router=router,
  )


def paper(router: bool = True) -> PumaConfig:
  """LLaMA-3-8B grown by PUMA's 226 tokens ([IMG], [/IMG], 224 positions) and CLIP ViT-L/14."""
  base = llama.llama3_8b()
  v = base.vocab_size
  return PumaConfig(
    llm=base.replace(vocab_size=v + 226),
    clip=clip_lib.vit_l14(),
    img_start_id=v,
    img_end_id=v + 1,
    pos0_id=v + 2,
    pad_id=base.eos_token_id,
    router=router,
  )


def param_breakdown(model_or_abstract: nnx.Module) -> dict[str, int]:
  """Parameter counts by part (the decoders are separate modules; see puma_decoder)."""
  out = {}
  for name in ("llm", "clip", "projector", "head", "router"):
    part = getattr(model_or_abstract, name, None)
    if part is not None:
      out[name] = sharding.count_params(part)
  out["scale_pos_embed"] = int(
    np.prod(model_or_abstract.scale_embed.shape) + np.prod(model_or_abstract.pos_embed.shape)
  )
  out["total"] = sum(out.values())
  return out
