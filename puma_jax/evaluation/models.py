"""What an eval run scores with: the generator under test and the metric networks.

Generators (duck-typed):
  reconstruct(images, scale, seed, indices) -> uint8 (B, H, W, 3)          (reconstruction)
  text_to_image(prompts, scales, seed, indices) -> {scale: uint8}          (text-to-image)
  edit(images, instructions, scales, seed, indices) -> {scale: uint8}      (editing)
  chat(images, questions, max_new_tokens=) -> [str]                        (understanding)
`indices` are the records' global positions: record i is sampled with the key
fold_in(key(seed), i), whatever batch or host it lands in, so a run split over hosts and
devices (or resumed) draws the same noise as one big batch. `PipelineGenerator` adapts a
`PumaPipeline` (whose own calls key samples by batch position) to this.

`config.model.kind`:
  "puma"  converted checkpoint directories (the paper's protocol).
  "tiny"  random-weight tiny PUMA models built in-process (seeded): the real code path at toy
          width; slow on a CPU (minutes to compile the five decoders).
  "toy"   a parameter-free deterministic stand-in (block-averaging at each scale's token grid,
          colour-name answers) that makes runner tests fast; its numbers mean nothing.
Metric networks load from converted directories; with `metrics.random_tiny` and no directory
they are tiny random networks (seeded), and the results say so.
"""

from __future__ import annotations

import zlib

import jax
import numpy as np
from flax import nnx

from puma_jax import sharding
from puma_jax.data import imaging, synthetic
from puma_jax.evaluation import fid as fid_lib
from puma_jax.evaluation import metrics as M
from puma_jax.models import pooling


# ----------------------------------------------------------------------------------------------
# Generators


def _block_average(img: np.ndarray, grid: int) -> np.ndarray:
  """Average over a grid x grid partition then upsample: what survives `grid`^2 tokens."""
  h, w, _ = img.shape
  small = imaging.resize(img, grid)
  return imaging.resize(small, (h, w))


class ToyGenerator:
  """Deterministic stand-in for a PUMA model (see the module docstring)."""

  def __init__(self, size: int = 64):
    self.size = size

  @staticmethod
  def _grid(scale: str) -> int:
    return int(round(pooling.SCALE_TOKENS[pooling.scale_index(scale)] ** 0.5))

  def _noise(self, key: str, seed: int, shape) -> np.ndarray:
    rng = np.random.default_rng([zlib.crc32(key.encode()), seed])
    return rng.normal(0, 12, shape)

  def reconstruct(self, images, scale: str, seed: int, indices) -> np.ndarray:
    out = []
    for i, im in zip(indices, images):
      x = _block_average(np.asarray(im), self._grid(scale)).astype(np.float64)
      x += self._noise(f"rec{scale}{i}", seed, x.shape)
      out.append(np.clip(np.round(x), 0, 255).astype(np.uint8))
    return np.stack(out)

  def text_to_image(self, prompts, scales, seed: int, indices) -> dict:
    out = {}
    for s in scales:
      g = self._grid(s)
      imgs = []
      for i, p in zip(indices, prompts):
        base = np.random.default_rng(zlib.crc32(p.encode())).uniform(0, 255, (g, g, 3))
        base = imaging.resize(base.astype(np.uint8), self.size).astype(np.float64)
        imgs.append(
          np.clip(base + self._noise(f"{p}{s}{i}", seed, base.shape), 0, 255).astype(np.uint8)
        )
      out[s] = np.stack(imgs)
    return out

  def edit(self, images, instructions, scales, seed: int, indices) -> dict:
    out = {}
    for s in scales:
      res = []
      for i, im, instr in zip(indices, images, instructions):
        x = _block_average(np.asarray(im), self._grid(s)).astype(np.float64)
        tint = np.random.default_rng(zlib.crc32(instr.encode())).uniform(-30, 30, 3)
        res.append(
          np.clip(x + tint + self._noise(f"{instr}{s}{i}", seed, x.shape), 0, 255).astype(np.uint8)
        )
      out[s] = np.stack(res)
    return out

  def chat(self, images, questions, max_new_tokens: int = 64) -> list[str]:
    answers = []
    for im, q in zip(images, questions):
      mean = np.asarray(im, np.float64).reshape(-1, 3).mean(0)
      name = min(
        synthetic.COLORS, key=lambda c: np.sum((np.array(synthetic.COLORS[c]) - mean) ** 2)
      )
      if "yes or no" in q.lower():
        answers.append("Yes" if name in q.lower() else "No")
      else:
        answers.append(f"It is {name}.")
    return answers


class ReconstructionGenerator:
  """`reconstruct` over one `reconstruct.Reconstructor` per scale."""

  def __init__(self, reconstructors: dict):
    self.reconstructors = reconstructors

  def reconstruct(self, images, scale: str, seed: int, indices) -> np.ndarray:
    from puma_jax.diffusion import sampler as SM

    if scale not in self.reconstructors:
      raise ValueError(f"no decoder for scale {scale} (have {sorted(self.reconstructors)})")
    rec = self.reconstructors[scale]
    feats = rec.features(list(images))
    return np.asarray(SM.to_uint8(rec.sampler(feats, rec.uncond, record_keys(seed, indices))))


def record_keys(seed: int, indices) -> jax.Array:
  """fold_in(key(seed), i) per record: `sampler.sample_keys` of the whole dataset, row i."""
  import jax.numpy as jnp

  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(list(indices), jnp.int32))


class PipelineGenerator:
  """A `PumaPipeline` with per-record sampling keys: features come from the pipeline
  (`return_features=True`), each scale is decoded here with `record_keys`."""

  def __init__(self, pipe):
    self.pipe = pipe

  def _decode(self, feats: dict, scales, seed, indices) -> dict:
    import jax.numpy as jnp
    from puma_jax.diffusion import sampler as SM

    out = {}
    for s in scales:
      if s not in self.pipe.decoders or self.pipe.vae is None:
        raise ValueError(f"scale {s} needs a decoder (model.decoders.{s}) and model.vae")
      # The pipeline's sampler: the decoder's own scheduler config (PumaPipeline docstring).
      sampler = self.pipe.sampler(s)
      f = jnp.asarray(feats[s], jnp.float32)
      uncond = jnp.broadcast_to(jnp.asarray(self.pipe.uncond_features(s)), f.shape)
      out[s] = np.asarray(SM.to_uint8(sampler(f, uncond, record_keys(seed, indices))))
    return out

  def text_to_image(self, prompts, scales, seed: int, indices) -> dict:
    feats = self.pipe.text_to_image(list(prompts), tuple(scales), return_features=True)
    return self._decode(feats, scales, seed, indices)

  def edit(self, images, instructions, scales, seed: int, indices) -> dict:
    feats = self.pipe.edit(list(images), list(instructions), tuple(scales), return_features=True)
    return self._decode(feats, scales, seed, indices)

  def chat(self, images, questions, max_new_tokens: int = 64) -> list[str]:
    return self.pipe.chat(list(images), list(questions), max_new_tokens=max_new_tokens)


def _tiny_parts(seed: int, scales, steps: int):
  from puma_jax.diffusion import sampler as SM
  from puma_jax.models import clip, puma, puma_decoder as PD, unet, vae as V

  decoders = {}
  for s in scales:
    n = pooling.SCALE_TOKENS[pooling.scale_index(s)]
    u = unet.tiny_config(addition_embed_type=None, cross_attention_dim=32)
    dc = PD.PumaDecoderConfig(
      unet=u,
      mapping_dim=clip.tiny().hidden_size,
      mapping_dim1=32,
      num_tokens=n,
      use_embeds=n == 256,
    )
    decoders[s] = numpy_random_module(
      lambda dc=dc: PD.PumaDecoder(dc, rngs=nnx.Rngs(0)), seed + 1 + pooling.scale_index(s)
    )
  vae = numpy_random_module(lambda: V.AutoencoderKL(V.tiny_config(), rngs=nnx.Rngs(0)), seed + 7)
  return decoders, vae, SM.SamplerSettings(num_steps=steps), puma, clip


def build_generator(protocol: str, mcfg, scales):
  kind = mcfg.kind
  if kind == "toy":
    return ToyGenerator(int(mcfg.toy_size))
  from puma_jax.diffusion import sampler as SM

  if kind == "tiny":
    decoders, vae, settings, puma, clip = _tiny_parts(int(mcfg.seed), scales, int(mcfg.steps))
    if protocol == "reconstruction":
      from puma_jax import reconstruct

      cm = numpy_random_module(
        lambda: clip.CLIPVisionModel(clip.tiny(), rngs=nnx.Rngs(0)), int(mcfg.seed)
      )
      return ReconstructionGenerator(
        {s: reconstruct.Reconstructor(cm, decoders[s], vae, s, settings) for s in scales}
      )
    from puma_jax import tokenizer as tokenizer_lib
    from puma_jax.inference.pipelines import PumaPipeline

    model = numpy_random_module(
      lambda: puma.PumaModel(puma.tiny(), rngs=nnx.Rngs(0)), int(mcfg.seed)
    )
    tok = tokenizer_lib.ByteTokenizer()
    return PipelineGenerator(
      PumaPipeline(
        model,
        encode=tok.encode,
        decode=tok.decode,
        special=tok.special,
        decoders=decoders,
        vae=vae,
        settings=settings,
      )
    )
  if kind == "puma":
    settings = SM.SamplerSettings(num_steps=int(mcfg.steps), guidance_scale=float(mcfg.guidance))
    decs = {s: d for s, d in dict(mcfg.decoders).items() if d}
    if protocol == "reconstruction":
      from puma_jax import reconstruct

      missing = [s for s in scales if s not in decs]
      if missing or not mcfg.clip or not mcfg.vae:
        raise M.MissingWeightsError(
          f"reconstruction needs model.clip, model.vae and "
          f"model.decoders for {missing or list(scales)}"
        )
      return ReconstructionGenerator(
        {s: reconstruct.load(decs[s], mcfg.clip, mcfg.vae, s, settings) for s in scales}
      )
    if not mcfg.puma:
      raise M.MissingWeightsError("model.kind='puma' needs model.puma (a converted PUMA dir)")
    from puma_jax.inference.pipelines import PumaPipeline

    return PipelineGenerator(
      PumaPipeline.load(
        mcfg.puma,
        decoders=decs,
        vae=mcfg.vae,
        tokenizer=mcfg.tokenizer or "byte",
        settings=settings,
      )
    )
  raise ValueError(f"model.kind={kind!r}; choose puma, tiny or toy")


# ----------------------------------------------------------------------------------------------
# Metric networks


def numpy_random_module(build, seed: int, gain: float = 1.0, nonneg: str = "") -> nnx.Module:
  """A module with seeded NumPy weights: no per-shape jax.random compiles (slow on CPU).
  `gain`: kernel scale over 1/sqrt(fan_in) (sqrt(2) keeps deep ReLU stacks such as Inception
  from collapsing to one output for every image); parameters whose path contains `nonneg` are
  made non-negative (LPIPS's linear heads are, so distances stay >= 0)."""
  abstract = nnx.eval_shape(build)
  rs = np.random.RandomState(seed)

  def fill(path, v):
    if len(v.shape) >= 2:
      w = gain * rs.randn(*v.shape) / np.sqrt(np.prod(v.shape[:-1]))
      if nonneg and nonneg in "/".join(map(str, path)):
        w = np.abs(w)
      return w.astype(np.float32)
    base = 1.0 if "scale" in str(path[-1]) or "var" in str(path[-1]) else 0.0
    return np.asarray(base + 0.1 * rs.randn(*v.shape), np.float32)

  pure = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  return sharding.materialize(abstract, jax.tree_util.tree_map_with_path(fill, pure))


class ByteClipTokenizer:
  """Tiny CLIP runs only: bytes -> ids below `bos`, the `tokenize` call signature of HF's
  CLIPTokenizer (pad with end-of-text, as CLIP does)."""

  def __init__(self, bos: int, eos: int):
    self.bos, self.eos = bos, eos

  def __call__(self, texts, padding, truncation, max_length, return_attention_mask):
    ids, masks = [], []
    for t in texts:
      body = [b % self.bos for b in t.lower().encode()][: max_length - 2]
      row = [self.bos] + body + [self.eos]
      ids.append(row + [self.eos] * (max_length - len(row)))
      masks.append([1] * len(row) + [0] * (max_length - len(row)))
    return {"input_ids": ids, "attention_mask": masks}


class MetricNets:
  """Lazily loaded metric networks; `random` lists those that are tiny random stand-ins."""

  def __init__(self, cfg, mesh=None):
    self.cfg, self.mesh, self.random = cfg, mesh, []
    self._cache = {}

  def _get(self, name, load, tiny):
    if name not in self._cache:
      path = self.cfg[name]
      if not path and self.cfg.random_tiny:
        self.random.append(name)
        self._cache[name] = tiny()
      else:
        self._cache[name] = load(path)
    return self._cache[name]

  def lpips(self) -> M.LPIPSMetric:
    from puma_jax.models import lpips

    return self._get(
      "lpips",
      lambda p: M.LPIPSMetric.load(p, self.mesh),
      lambda: M.LPIPSMetric(
        numpy_random_module(lambda: lpips.LPIPS(rngs=nnx.Rngs(0)), 11, nonneg="lins")
      ),
    )

  def clip(self) -> M.CLIPScorer:
    from puma_jax.models import clip_text

    def tiny():
      cfg = clip_text.tiny()
      model = numpy_random_module(lambda: clip_text.CLIPModel(cfg, rngs=nnx.Rngs(0)), 12)
      return M.CLIPScorer(
        model, ByteClipTokenizer(cfg.text_config.bos_token_id, cfg.text_config.eos_token_id)
      )

    return self._get("clip", lambda p: M.CLIPScorer.load(p, self.mesh), tiny)

  def dino(self) -> M.DINOScorer:
    from puma_jax.models import vit

    cfg = vit.ViTConfig(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=32,
      patch_size=8,
    )
    return self._get(
      "dino",
      lambda p: M.DINOScorer.load(p, self.mesh),
      lambda: M.DINOScorer(numpy_random_module(lambda: vit.ViTModel(cfg, rngs=nnx.Rngs(0)), 13)),
    )

  def inception(self) -> fid_lib.InceptionFeatures:
    from puma_jax.models import inception

    cfg = inception.InceptionConfig(image_size=inception.MIN_SIZE)
    return self._get(
      "inception",
      lambda p: fid_lib.InceptionFeatures.load(p, self.mesh),
      lambda: fid_lib.InceptionFeatures(
        numpy_random_module(lambda: inception.FIDInceptionV3(cfg, rngs=nnx.Rngs(0)), 14, gain=2.0)
      ),
    )
