"""Whole-release conversion: the public PUMA snapshot plus CLIP-L and the SDXL VAE (and,
optionally, a LLaMA) into one release directory (the layout of `puma_jax/release.py`).

    python -m puma_jax.convert puma-release --src=SNAPSHOT --dst=R \\
        [--clip=HF_CLIP_DIR] [--vae=SDXL_VAE_DIR] [--llm=LLAMA_DIR]

SNAPSHOT holds PUMA's decoders `unet_1, unet_4, unet_16, unet_64, unet_256` (any subset), either
directly or under `stable-diffusion-xl-base-1.0/` as published; each is a diffusers UNet folder
whose weights also hold the mapping layer (and, for 256 tokens, `embed_img_pos`), converted by
the puma-decoder converter into `decoders/f4 .. f0` (the folder's token count is the scale).
`--vae` defaults to a `vae/` folder next to the decoders or in SNAPSHOT, `--clip` to SNAPSHOT's
`clip-vit-large-patch14/` or `clip/`; each of --clip, --vae and --llm may be a HF/diffusers
folder (converted here) or a folder already converted by `python -m puma_jax.convert` (copied).

Without --llm the release is reconstruction-only: it has `clip/`. With --llm (HF or converted
LLaMA, with its tokenizer files) the CLIP and the LLaMA are assembled into a PumaModel
(`puma_jax.assemble`; projector and heads newly initialized) in `puma/`, and the LLaMA's
tokenizer with PUMA's tokens goes to `tokenizer/`.

The release is built in a temporary sibling of R and renamed into place at the end: a failure
leaves nothing at R, and an R that exists and is not empty is refused before any work.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from absl import flags

from puma_jax import checkpoints, cli, release
from puma_jax.convert import convert
from puma_jax.convert.core import ConversionError
from puma_jax.models import pooling

NAME = "puma-public"
CREATED_BY = "python -m puma_jax.convert puma-release"
# Where the public snapshot keeps the decoders (below SNAPSHOT, or SNAPSHOT itself).
DECODER_ROOTS = ("stable-diffusion-xl-base-1.0", ".")
CLIP_DEFAULTS = ("clip-vit-large-patch14", "clip")


def decoder_folder(scale: str) -> str:
  """The public folder of a scale's decoder: f0 (256 tokens) -> unet_256, ..., f4 -> unet_1."""
  return f"unet_{pooling.SCALE_TOKENS[pooling.scale_index(scale)]}"


def find_decoders(src: Path) -> tuple[Path, dict[str, Path]]:
  """(the folder holding them, {scale: unet_N folder}) of the decoders in snapshot `src`."""
  for root in DECODER_ROOTS:
    base = src / root
    found = {
      s: base / decoder_folder(s)
      for s in pooling.SCALE_NAMES
      if (base / decoder_folder(s)).is_dir()
    }
    if found:
      return base, found
  names = ", ".join(decoder_folder(s) for s in reversed(pooling.SCALE_NAMES))
  listing = sorted(p.name for p in src.iterdir())[:12]
  raise ConversionError(
    f"--src {src}: no PUMA decoder folders ({names}) in it or in "
    f"{src / DECODER_ROOTS[0]}; it holds {listing}"
  )


def _first_dir(candidates) -> Path | None:
  return next((c for c in candidates if c.is_dir()), None)


def _is_converted(path: Path) -> bool:
  return (path / checkpoints.CONFIG_FILE).is_file()


def _convert_or_copy(family: str, src: Path, dst: Path, flag: str) -> str:
  """Converts HF/diffusers folder `src` (or copies a converted one) to `dst`; returns the
  manifest's `source` text."""
  if not src.is_dir():
    raise ConversionError(f"{flag}={src}: not a directory")
  if _is_converted(src):
    stored = checkpoints.load_info(src)["family"]
    if stored != family:
      raise ConversionError(f"{flag}={src} holds a converted {stored!r} model, not {family!r}")
    shutil.copytree(src, dst)
    return f"{src.absolute()} (converted)"
  convert(family, src, dst)
  return str(src.absolute())


def _copy_tokenizer(llm: Path, converted_llm: Path, config, dst: Path) -> None:
  """PUMA's tokenizer (the LLaMA's plus [IMG], [/IMG], 224 positions) into `dst`, checked to
  give the ids the assembled model was built with."""
  from puma_jax import assemble, tokenizer

  tok_dir = next(
    (
      d
      for d in (llm, converted_llm)
      if any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    ),
    None,
  )
  if tok_dir is None:
    raise ConversionError(
      f"--llm={llm} has no tokenizer files (tokenizer.json or "
      "tokenizer.model); a release with a PumaModel needs its tokenizer"
    )
  tok = tokenizer.PumaTokenizer.from_dir(tok_dir)
  assemble._check_token_ids(tok, config, f"--llm={llm}: its tokenizer")
  tok.save(dst)


class _Progress:
  """One line per part: `[k/n] what <- source ... done in Ts`."""

  def __init__(self, total: int):
    self.total, self.k = total, 0

  def __call__(self, what: str, src) -> _Progress:
    self.k += 1
    print(f"[{self.k}/{self.total}] {what} <- {src} ...", end="", flush=True)
    return self

  def __enter__(self):
    self.t0 = time.time()

  def __exit__(self, exc_type, *_):
    print(f" done in {time.time() - self.t0:.1f}s" if exc_type is None else " failed", flush=True)


def convert_release(src, dst, *, clip=None, vae=None, llm=None, name: str = NAME) -> Path:
  """Converts snapshot `src` (+ CLIP, VAE, optional LLaMA) into release `dst`; returns `dst`."""
  src, dst = Path(src), Path(dst)
  # Refuses a non-empty destination before any work.
  writer = release.ReleaseWriter(dst, name=name, created_by=CREATED_BY)
  if not src.is_dir():
    raise ConversionError(f"--src={src}: not a directory (the PUMA snapshot with unet_N folders)")
  root, decoders = find_decoders(src)
  vae = Path(vae) if vae else _first_dir([root / "vae", src / "vae"])
  if vae is None:
    raise ConversionError(
      f"no VAE: {root / 'vae'} does not exist; pass --vae=SDXL_VAE_DIR "
      "(stable-diffusion-xl-base-1.0/vae)"
    )
  clip = Path(clip) if clip else _first_dir([src / c for c in CLIP_DEFAULTS])
  if clip is None:
    raise ConversionError(
      f"no CLIP: {src} has no {' or '.join(CLIP_DEFAULTS)} folder; pass "
      "--clip=HF_CLIP_DIR (openai/clip-vit-large-patch14)"
    )
  llm = Path(llm) if llm else None
  progress = _Progress(len(decoders) + 2 + (2 if llm else 0))
  with writer as w:
    for scale, folder in decoders.items():
      with progress(f"decoders/{scale}", folder):
        convert("puma-decoder", folder, w.decoder_dir(scale))
      w.add_decoder(scale, source=str(folder.absolute()))
    with progress("vae", vae):
      w.add_part("vae", source=_convert_or_copy("vae", vae, w.part_dir("vae"), "--vae"))
    if llm is None:
      with progress("clip", clip):
        w.add_part(
          "clip", source=_convert_or_copy("clip-vision", clip, w.part_dir("clip"), "--clip")
        )
    else:
      _add_puma(w, progress, clip, llm)
  return dst


def _add_puma(w: release.ReleaseWriter, progress: _Progress, clip: Path, llm: Path) -> None:
  """CLIP + LLaMA -> puma/ (assembled) and tokenizer/; the converted parts are scratch."""
  from puma_jax import assemble

  with tempfile.TemporaryDirectory(prefix=".puma-release-", dir=w.dst.parent) as scratch:
    scratch = Path(scratch)
    with progress("clip (for puma/)", clip):
      clip_src = _convert_or_copy("clip-vision", clip, scratch / "clip", "--clip")
    with progress("puma (assembled with the LLaMA)", llm):
      llm_src = _convert_or_copy("llama", llm, scratch / "llama", "--llm")
      try:
        config, model = assemble.assemble(scratch / "clip", scratch / "llama")
      except ValueError as e:
        raise ConversionError(
          f"assembling the PumaModel from --clip={clip} and --llm={llm}: {e}"
        ) from None
      _copy_tokenizer(llm, scratch / "llama", config, w.tokenizer_dir())
      checkpoints.save_module(w.part_dir("puma"), "puma", config, model)
    w.add_part(
      "puma",
      source=f"CLIP {clip_src} + LLaMA {llm_src}; projector, scale and "
      "position embeddings and heads newly initialized",
    )
    w.set_tokenizer(release.TOKENIZER_DIR)


# Own flag set: `python -m puma_jax.convert` hands this command its arguments.
FLAGS = flags.FlagValues()
flags.DEFINE_string(
  "src",
  None,
  "the PUMA snapshot (unet_N folders, or stable-diffusion-xl-base-1.0/ with them)",
  flag_values=FLAGS,
  required=True,
)
flags.DEFINE_string(
  "dst", None, "the release to write (a new or empty directory)", flag_values=FLAGS, required=True
)
flags.DEFINE_string(
  "clip", "", "HF CLIP-L folder (or a converted clip-vision one)", flag_values=FLAGS
)
flags.DEFINE_string(
  "vae",
  "",
  "SDXL VAE folder (or a converted vae one); default: a vae/ folder next to the decoders",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "llm",
  "",
  "HF or converted LLaMA folder with its tokenizer files: adds "
  "puma/ (assembled with the CLIP) and tokenizer/ instead of clip/",
  flag_values=FLAGS,
)
flags.DEFINE_string("name", NAME, "the release's name in release.json", flag_values=FLAGS)

PROG = "python -m puma_jax.convert puma-release"
EXPECTED = (
  ConversionError,
  checkpoints.CheckpointError,
  release.ReleaseError,
  ValueError,
  FileNotFoundError,
)


def _main(argv: list[str]) -> int:
  f = FLAGS
  t0 = time.time()
  out = convert_release(
    f.src, f.dst, clip=f.clip or None, vae=f.vae or None, llm=f.llm or None, name=f.name
  )
  m = release.load_manifest(out)
  print(
    f"release {out}: scales {', '.join(m['scales'])}, image_size {m['image_size']}, parts "
    f"{', '.join(sorted(m['parts']))} ({time.time() - t0:.1f}s)"
  )
  return 0


def main(argv: list[str] | None = None) -> int:
  """Runs the command on `argv` (its flags, without the program name; default: the command
  line after `puma-release`)."""
  argv = [PROG, *(sys.argv[2:] if argv is None else argv)]
  return cli.run(_main, argv, flag_values=FLAGS, doc=__doc__, expected=EXPECTED)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
