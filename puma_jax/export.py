"""Training workdir -> release (puma_jax/release.py; layout in docs/SAMPLING.md).

    python -m puma_jax.export --workdir=W --dst=R          # a new release from one workdir
    python -m puma_jax.export --workdir=W --into=R         # add W's part to an existing release
    [--step=N]                                             # default: the newest checkpoint

An MLLM-stage workdir gives the PumaModel (`puma/`) and its tokenizer (from the workdir's
config.json: "byte", or a tokenizer directory copied to `tokenizer/` with PUMA's tokens). A
decoder-stage workdir gives `decoders/<scale>`, plus its frozen VAE when the release has none
and its frozen CLIP when the release has neither `puma/` nor `clip/`. A VAE-stage workdir gives
`vae/`. `save_module_dir` writes a workdir's trained model as a module dir instead (the
`--config.init.*` input of the next stage).

Checkpoints are read through `read_checkpoint` only: parameters (trainable and frozen, as NumPy
arrays), step, the stage description saved with them, and the workdir's config.json; the
optimizer and data-iterator state are never read.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from absl import flags

from puma_jax import release as release_lib

CHECKPOINTS_DIR = "checkpoints"
CONFIG_FILE = "config.json"
STAGES = ("mllm", "decoder", "vae")  # training stages whose checkpoints export reads


class ExportError(ValueError):
  pass


@dataclasses.dataclass
class WorkdirCheckpoint:
  """One training checkpoint: `params` merges the trainable and the frozen parameters into the
  model's nested pure dict; `meta` is the stage description saved with it ("stage": "mllm" |
  "decoder" | "vae", the model configs); `config` the workdir's config.json."""

  workdir: Path
  step: int
  params: dict
  meta: dict
  config: dict

  @property
  def stage(self) -> str:
    return self.meta["stage"]

  @property
  def source(self) -> str:
    return f"training workdir {self.workdir} (step {self.step})"


def _merge(a: dict, b: dict, path: str = "") -> dict:
  out = dict(a)
  for k, v in b.items():
    if k in out and isinstance(out[k], dict) and isinstance(v, dict):
      out[k] = _merge(out[k], v, f"{path}{k}.")
    elif k in out:
      raise ExportError(f"parameter {path}{k} is both trainable and frozen in the checkpoint")
    else:
      out[k] = v
  return out


def read_checkpoint(workdir: str | Path, step: int | None = None) -> WorkdirCheckpoint:
  """The parameters, step and stage description of a training checkpoint in `workdir`."""
  import jax
  import orbax.checkpoint as ocp

  workdir = Path(workdir).absolute()
  ckpt_dir = workdir / CHECKPOINTS_DIR
  if not ckpt_dir.is_dir():
    raise ExportError(
      f"{workdir}: no {CHECKPOINTS_DIR}/ directory; is it a training workdir "
      "(python -m puma_jax.main --workdir=...)?"
    )
  cfg_path = workdir / CONFIG_FILE
  try:
    config = json.loads(cfg_path.read_text())
  except FileNotFoundError:
    raise ExportError(f"{cfg_path}: missing (train.py writes it at the start of a run)") from None
  except json.JSONDecodeError as e:
    raise ExportError(f"{cfg_path}: not valid JSON ({e})") from None
  from puma_jax.training.checkpoints import TRAIN_ITEMS

  # PyTree handlers (not Standard) for the arrays: they can restore part of `state`.
  kinds = {
    "state": ocp.PyTreeCheckpointHandler,
    "frozen": ocp.PyTreeCheckpointHandler,
    "meta": ocp.JsonCheckpointHandler,
    "data": ocp.JsonCheckpointHandler,
  }
  if set(kinds) != set(TRAIN_ITEMS):
    raise ExportError(f"training checkpoints hold {TRAIN_ITEMS}; export reads {tuple(kinds)}")
  handlers = {name: kind() for name, kind in kinds.items()}
  manager = ocp.CheckpointManager(
    ckpt_dir,
    item_handlers=handlers,
    options=ocp.CheckpointManagerOptions(read_only=True, create=False),
  )
  try:
    steps = manager.all_steps()
    if not steps:
      raise ExportError(f"{ckpt_dir}: no finished checkpoint")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise ExportError(f"{ckpt_dir}: no checkpoint at step {step} (have {sorted(steps)})")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict) or meta.get("stage") not in STAGES:
      raise ExportError(f"{ckpt_dir}/{step}/meta: no known stage ({meta!r:.200})")
    item_meta = manager.item_metadata(step)

    def target(name, keep=None):
      tree = getattr(item_meta[name], "tree", item_meta[name])
      if keep is not None:
        tree = {k: tree[k] for k in keep}
      # NumPy on the host: exporting a model larger than one accelerator must still work.
      item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
      restore_args = jax.tree.map(
        lambda m: ocp.RestoreArgs(restore_type=np.ndarray, dtype=m.dtype), tree
      )
      return ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=keep is not None
      )

    items = {"state": target("state", keep=("params", "step"))}
    if _has_item(item_meta, "frozen"):  # absent where the stage froze nothing (vae)
      items["frozen"] = target("frozen")
    got = manager.restore(step, args=ocp.args.Composite(**items))
  finally:
    manager.close()
  params = _merge(got["state"]["params"], (got["frozen"] if "frozen" in items else None) or {})
  return WorkdirCheckpoint(workdir, int(step), params, meta, config)


def _has_item(item_meta, name: str) -> bool:
  try:
    return item_meta[name] is not None
  except KeyError:
    return False


def _dotted(path) -> str:
  # Orbax restores list indices as string keys ("0"), to_pure_dict has ints: compare as text.
  return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _module(family: str, config_dict: dict, params: dict):
  """The registry model `family` built abstractly and filled with `params` (NumPy)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from puma_jax.models import registry

  cfg = registry.config_class(family).from_dict(config_dict)
  abstract = nnx.eval_shape(lambda: registry.build(family, cfg, rngs=nnx.Rngs(0)))
  graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
  want = nnx.to_pure_dict(state)
  flat_want = {_dotted(p): v.shape for p, v in jax.tree_util.tree_flatten_with_path(want)[0]}
  flat_got = {_dotted(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  missing, extra = sorted(set(flat_want) - set(flat_got)), sorted(set(flat_got) - set(flat_want))
  bad = [k for k in flat_want if k in flat_got and tuple(np.shape(flat_got[k])) != flat_want[k]]
  if missing or extra or bad:
    raise ExportError(
      f"checkpoint parameters do not match the {family} config: missing "
      f"{missing[:5]}, unexpected {extra[:5]}, shape mismatches {bad[:5]}"
    )
  values = jax.tree_util.tree_map_with_path(lambda p, _: flat_got[_dotted(p)], want)
  nnx.replace_by_pure_dict(state, values)
  rest = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), rest)
  return cfg, nnx.merge(graphdef, state, rest)


def write_mllm(writer: release_lib.ReleaseWriter, ckpt: WorkdirCheckpoint) -> None:
  """puma/ and the tokenizer from an MLLM-stage checkpoint."""
  from puma_jax import checkpoints

  cfg, model = _module("puma", ckpt.meta["model"], ckpt.params)
  checkpoints.save_module(writer.part_dir("puma"), "puma", cfg, model, source=ckpt.source)
  writer.add_part("puma", source=ckpt.source)
  tok = str(ckpt.config.get("tokenizer", "byte") or "")
  if not tok:
    raise ExportError(
      f"{ckpt.workdir / CONFIG_FILE}: key 'tokenizer' is empty; the release "
      "needs the tokenizer the model was trained with"
    )
  if tok == release_lib.BYTE_TOKENIZER:
    writer.set_tokenizer(tok)
  else:
    from puma_jax import tokenizer as tokenizer_lib

    try:
      tokenizer_lib.PumaTokenizer.from_dir(tok).save(writer.tokenizer_dir())
    except (OSError, ValueError) as e:
      raise ExportError(
        f"{ckpt.workdir / CONFIG_FILE}: tokenizer {tok!r} cannot be read ({e})"
      ) from None
    writer.set_tokenizer(release_lib.TOKENIZER_DIR)


def decoder_scheduler(ckpt: WorkdirCheckpoint) -> dict:
  """The scheduler config a decoder-stage checkpoint was trained with (`schedulers.to_dict`):
  from its stage description, else (checkpoints written before it held one) from the workdir's
  config.json, else SDXL's defaults (what the decoder stage used before it was configurable)."""
  from puma_jax.diffusion import schedulers as S

  d = ckpt.meta.get("scheduler")
  where = f"{ckpt.source}: stage description key 'scheduler'"
  if d is None:
    d = (ckpt.config.get("model") or {}).get("scheduler")
    where = f"{ckpt.workdir / CONFIG_FILE}: key 'model.scheduler'"
  if d is None:
    return S.to_dict(S.SchedulerConfig())
  try:
    return S.to_dict(S.from_diffusers_config(d))
  except (TypeError, ValueError, AttributeError) as e:
    raise ExportError(f"{where}: {e}") from None


def _module_meta(ckpt: WorkdirCheckpoint) -> dict:
  """What a trained module dir records beside its config: the source and, for a decoder, the
  schedule it must be sampled with (`sampler.SCHEDULER_KEY`)."""
  from puma_jax.diffusion import sampler as sampler_lib

  meta = {"source": ckpt.source}
  if ckpt.stage == "decoder":
    meta[sampler_lib.SCHEDULER_KEY] = decoder_scheduler(ckpt)
  return meta


def write_decoder(writer: release_lib.ReleaseWriter, ckpt: WorkdirCheckpoint) -> None:
  """decoders/<scale> from a decoder-stage checkpoint, plus its frozen VAE (and CLIP) when the
  release has no other source for them."""
  from puma_jax import checkpoints

  scale = ckpt.meta.get("scale")
  dec_cfg, dec = _module("puma-decoder", ckpt.meta["decoder"], ckpt.params["decoder"])
  checkpoints.save_module(
    writer.decoder_dir(scale), "puma-decoder", dec_cfg, dec, **_module_meta(ckpt)
  )
  writer.add_decoder(scale, source=ckpt.source)
  parts = writer.manifest["parts"]
  frozen = f"{ckpt.source}, frozen during decoder training"
  if "vae" not in parts:
    vcfg, vae = _module("vae", ckpt.meta["vae"], ckpt.params["vae"])
    checkpoints.save_module(writer.part_dir("vae"), "vae", vcfg, vae, source=frozen)
    writer.add_part("vae", source=frozen)
  if "puma" not in parts and "clip" not in parts:
    ccfg, clip = _module("clip-vision", ckpt.meta["clip"], ckpt.params["clip"])
    checkpoints.save_module(writer.part_dir("clip"), "clip-vision", ccfg, clip, source=frozen)
    writer.add_part("clip", source=frozen)


def write_vae(writer: release_lib.ReleaseWriter, ckpt: WorkdirCheckpoint) -> None:
  """vae/ from a VAE-stage checkpoint."""
  from puma_jax import checkpoints

  if "vae" in writer.manifest["parts"]:
    raise ExportError(f"the release already has a vae part; not replacing it with {ckpt.source}")
  family, cfg, model = trained_module(ckpt)
  checkpoints.save_module(writer.part_dir("vae"), family, cfg, model, source=ckpt.source)
  writer.add_part("vae", source=ckpt.source)


def write_workdir(writer: release_lib.ReleaseWriter, ckpt: WorkdirCheckpoint) -> None:
  if ckpt.stage == "mllm":
    write_mllm(writer, ckpt)
  elif ckpt.stage == "vae":
    write_vae(writer, ckpt)
  else:
    write_decoder(writer, ckpt)


def trained_module(ckpt: WorkdirCheckpoint):
  """(family, config, module) of the model a checkpoint's stage trains: the PumaModel of an
  MLLM stage, the decoder of a decoder stage, the VAE of a VAE stage (frozen parts left out)."""
  if ckpt.stage == "mllm":
    return ("puma", *_module("puma", ckpt.meta["model"], ckpt.params))
  if ckpt.stage == "decoder":
    return ("puma-decoder", *_module("puma-decoder", ckpt.meta["decoder"], ckpt.params["decoder"]))
  return ("vae", *_module("vae", ckpt.meta["vae"], ckpt.params["vae"]))


def save_module_dir(workdir: str | Path, dst: str | Path, step: int | None = None) -> Path:
  """Writes the model a training workdir trained (`trained_module`) at checkpoint `step`
  (default: the newest) as a module dir (`checkpoints.save_module`): a VAE workdir's for
  `--config.init.vae`, an MLLM workdir's PumaModel for `--config.init.puma`, a decoder with the
  schedule it was trained with."""
  from puma_jax import checkpoints

  ckpt = read_checkpoint(workdir, step)
  family, cfg, model = trained_module(ckpt)
  try:
    return checkpoints.save_module(dst, family, cfg, model, **_module_meta(ckpt))
  except checkpoints.CheckpointError as e:
    raise ExportError(f"{ckpt.source} -> {dst}: {e}") from None


def export(
  workdir: str | Path,
  *,
  dst: str | Path = "",
  into: str | Path = "",
  step: int | None = None,
  name: str = "",
) -> Path:
  """Writes `workdir`'s trained part into a new release `dst` or an existing release `into`."""
  if bool(dst) == bool(into):
    raise ExportError("give exactly one of dst (a new release) and into (an existing one)")
  ckpt = read_checkpoint(workdir, step)
  created_by = "python -m puma_jax.export"
  if into:
    with release_lib.ReleaseWriter(into, into=True, created_by=created_by) as w:
      write_workdir(w, ckpt)
    return Path(into)
  with release_lib.ReleaseWriter(
    dst, name=name or Path(workdir).absolute().name, created_by=created_by
  ) as w:
    write_workdir(w, ckpt)
  return Path(dst)


FLAGS = flags.FlagValues()
flags.DEFINE_string(
  "workdir", None, "training workdir (python -m puma_jax.main)", flag_values=FLAGS, required=True
)
flags.DEFINE_string(
  "dst", "", "new release directory (must not exist or be empty)", flag_values=FLAGS
)
flags.DEFINE_string("into", "", "existing release to add the workdir's part to", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)", flag_values=FLAGS)
flags.DEFINE_string(
  "name", "", "release name for --dst (default: the workdir's name)", flag_values=FLAGS
)


def _main(argv: list[str]) -> None:
  f = FLAGS
  out = export(f.workdir, dst=f.dst, into=f.into, step=f.step, name=f.name)
  rel = release_lib.Release.open(out)
  print(f"release {out}: parts {sorted(rel.manifest['parts'])}, decoders {list(rel.scales)}")


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI on `argv` (without the program name; default: the command line)."""
  from puma_jax import cli

  argv = sys.argv if argv is None else ["python -m puma_jax.export", *argv]
  return cli.run(_main, argv, flag_values=FLAGS, doc=__doc__, expected=(ValueError, OSError))


if __name__ == "__main__":
  raise SystemExit(main())
