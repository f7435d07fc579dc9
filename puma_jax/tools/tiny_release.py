"""A complete tiny release from seeded random weights, in seconds (layout: docs/SAMPLING.md).

    python -m puma_jax.tools.tiny_release --dst=/tmp/tiny_release [--seed=0]
    python -m puma_jax.tools.tiny_release --dst=R --from-workdir=workdirs/default

It holds what a converted PUMA release holds: the PumaModel (`puma.tiny()`: 2-layer LLaMA,
2-layer CLIP with the real 16x16 patch grid), the five decoders f0..f4 (the toy UNet of
configs/decoder.py:tiny_fK), the toy VAE and the built-in byte tokenizer; images are 32x32.
`--from-workdir=W` (repeatable) takes parts from training workdirs instead (an MLLM workdir: the
PumaModel and its tokenizer, e.g. the README's tiny run; a decoder workdir: its scale's decoder
and its VAE; a VAE workdir: the VAE); the rest stays random. The images mean nothing; the code
path is the real one.
"""

from __future__ import annotations

import sys

from absl import flags

from puma_jax import release as release_lib
from puma_jax.models import pooling

NAME = "tiny-random"
CREATED_BY = "python -m puma_jax.tools.tiny_release"
DECODER_SAMPLE_SIZE = 16  # latent pixels; x2 (the toy VAE) = 32-pixel images, as decoder.py:tiny


def decoder_config(scale: str, feature_dim: int):
  """The toy decoder of configs/decoder.py:tiny_<scale> reading `feature_dim`-wide features."""
  from puma_jax.models import puma_decoder

  tokens = pooling.SCALE_TOKENS[pooling.scale_index(scale)]
  cfg = puma_decoder.tiny_config(tokens, sample_size=DECODER_SAMPLE_SIZE)
  return cfg.replace(mapping_dim=feature_dim)


def random_module(build, seed: int):
  """build()'s module with seeded NumPy weights: kernels and embeddings N(0, 1/fan_in), norm
  scales 1, biases 0. The model's own initializers would compile an XLA program per parameter
  shape (or one large one), minutes on a busy 2-core machine; NumPy takes milliseconds."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      return np.ones(leaf.shape, leaf.dtype)
    if name == "bias":
      return np.zeros(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) or 1
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

  values = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(params))
  nnx.replace_by_pure_dict(params, values)
  rest = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), rest)
  return nnx.merge(graphdef, params, rest)


def make(
  dst,
  *,
  seed: int = 0,
  workdirs=(),
  scales=pooling.SCALE_NAMES,
  clip=None,
  untrained: bool = False,
) -> release_lib.Release:
  """Writes the tiny release to `dst` (which must not exist or be empty) and opens it.

  `workdirs`: training workdirs whose trained parts it takes; with `untrained` only their
  architectures (the model configs saved with their newest checkpoints), every weight random:
  the untrained baseline of a trained release. `clip`: a clip-vision module dir whose weights
  the random PumaModel's CLIP takes (the baseline then reads the features the trained
  decoders were trained on)."""
  from flax import nnx
  from puma_jax import assemble, checkpoints, export
  from puma_jax.diffusion import sampler as sampler_lib, schedulers
  from puma_jax.models import puma, puma_decoder, vae

  ckpts = [export.read_checkpoint(w) for w in workdirs]
  # the architectures of the parts left random (the trained ones' when untrained)
  arch_mllm = next((c.meta["model"] for c in ckpts if c.stage == "mllm"), None)
  arch_dec = {c.meta["scale"]: c.meta for c in ckpts if c.stage == "decoder"}
  # and the schedules they are sampled with (a random decoder: SDXL's, the default)
  sched_dec = {c.meta["scale"]: export.decoder_scheduler(c) for c in ckpts if c.stage == "decoder"}
  if untrained:
    ckpts = []
  random = f"{CREATED_BY} (seeded random weights, seed {seed})"
  name = "tiny-untrained" if untrained else NAME if not ckpts else "tiny-trained"
  with release_lib.ReleaseWriter(dst, name=name, created_by=CREATED_BY) as w:
    for c in ckpts:
      if c.stage == "mllm":
        export.write_mllm(w, c)
    if "puma" not in w.manifest["parts"]:
      cfg = puma.PumaConfig.from_dict(arch_mllm) if arch_mllm else puma.tiny()
      model = random_module(lambda: puma.PumaModel(cfg, rngs=nnx.Rngs(0)), seed)
      source = random
      if clip:
        assemble.load_components(model, clip_dir=str(clip))
        source = f"{random}; CLIP from {clip}"
      checkpoints.save_module(w.part_dir("puma"), "puma", cfg, model, source=source)
      w.add_part("puma", source=source)
      w.set_tokenizer(release_lib.BYTE_TOKENIZER)
    for c in ckpts:
      if c.stage == "vae":  # before the decoders: their frozen VAE is only the fallback
        export.write_vae(w, c)
    for c in ckpts:
      if c.stage == "decoder":
        export.write_decoder(w, c)
    if "vae" not in w.manifest["parts"]:
      vae_arch = next((m["vae"] for m in arch_dec.values()), None)
      cfg = vae.VAEConfig.from_dict(vae_arch) if vae_arch else vae.tiny_config()
      model = random_module(lambda: vae.AutoencoderKL(cfg, rngs=nnx.Rngs(0)), seed + 1)
      checkpoints.save_module(w.part_dir("vae"), "vae", cfg, model, source=random)
      w.add_part("vae", source=random)
    feature_dim = checkpoints.load_config(w.part_dir("puma"))[1].feature_dim
    for s in release_lib.sort_scales(scales):
      if s in w.manifest["parts"]["decoders"]:
        continue
      if s in arch_dec:
        cfg = puma_decoder.PumaDecoderConfig.from_dict(arch_dec[s]["decoder"])
      else:
        cfg = decoder_config(s, feature_dim)
      model = random_module(
        lambda: puma_decoder.PumaDecoder(cfg, rngs=nnx.Rngs(0)), seed + 2 + pooling.scale_index(s)
      )
      sched = sched_dec.get(s) or schedulers.to_dict(schedulers.SchedulerConfig())
      checkpoints.save_module(
        w.decoder_dir(s),
        "puma-decoder",
        cfg,
        model,
        source=random,
        **{sampler_lib.SCHEDULER_KEY: sched},
      )
      w.add_decoder(s, source=random)
  return release_lib.Release.open(dst)


FLAGS = flags.FlagValues()
flags.DEFINE_string(
  "dst",
  None,
  "release directory to create (must not exist or be empty)",
  flag_values=FLAGS,
  required=True,
)
flags.DEFINE_integer("seed", 0, "seed of the random weights", flag_values=FLAGS)
flags.DEFINE_multi_string(
  "from_workdir",
  [],
  "training workdir to take a part from "
  "(repeatable): MLLM -> puma/ + tokenizer, decoder -> its scale",
  flag_values=FLAGS,
)
flags.DEFINE_alias("from-workdir", "from_workdir", flag_values=FLAGS)
flags.DEFINE_list("scales", list(pooling.SCALE_NAMES), "decoders to include", flag_values=FLAGS)


def _main(argv: list[str]) -> None:
  for s in FLAGS.scales:
    pooling.scale_index(s)
  rel = make(FLAGS.dst, seed=FLAGS.seed, workdirs=FLAGS.from_workdir, scales=FLAGS.scales)
  print(
    f"tiny release {rel.root}: decoders {', '.join(rel.scales)}, {rel.image_size}x"
    f"{rel.image_size} images, tokenizer {rel.manifest['tokenizer']}"
  )


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI on `argv` (without the program name; default: the command line)."""
  from puma_jax import cli

  argv = sys.argv if argv is None else ["python -m puma_jax.tools.tiny_release", *argv]
  return cli.run(_main, argv, flag_values=FLAGS, doc=__doc__, expected=(ValueError, OSError))


if __name__ == "__main__":
  raise SystemExit(main())
