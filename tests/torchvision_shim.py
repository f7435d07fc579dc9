"""Makes `import torchvision` work on the CPU-only torch of the test environment.

The registry's torchvision for torch 2.13 (0.28.0) is a CUDA build: its operator library
`torchvision/_C.so` links `libc10_cuda.so` / `libtorch_cuda.so`, which the CPU torch does not
ship, so it cannot load. torchvision tolerates that (`torchvision.extension._has_ops()` is then
False and every op registration is skipped) except for two fake-kernel registrations in
`torchvision/_meta_registrations.py` (`register_fake("torchvision::nms")`, `...::qnms`), which
need the operators to exist and fail the import with
`RuntimeError: operator torchvision::nms does not exist`. (Installed into site-packages, it would
break every `transformers` / `diffusers` model import too, which import torchvision whenever it
is installed: hence .refs/, requirements-refs.txt.)

`install()` defines those two operator schemas (as `_C.so` declares them), without kernels, only
when torchvision is found and its library does not load. Calling them still fails (with
torchvision's own "Couldn't load custom C++ ops"); the classification models that the parity
tests use (AlexNet, Inception-v3) are plain torch modules that never call them. It runs from
tests/public_refs.py, before that imports torchvision.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

# The schemas of the operators that torchvision registers fake kernels for unconditionally
# (torchvision 0.28.0: torchvision/_meta_registrations.py; signatures as in torchvision/_C.so).
SCHEMAS = (
  "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
  "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

_library = None  # the definitions live as long as this torch.library.Library object
load_error: str | None = None  # why torchvision's operator library did not load, when shimmed


def _has_op(torch, name: str) -> bool:
  try:
    getattr(torch.ops.torchvision, name)
  except (AttributeError, RuntimeError):
    return False
  return True


def install() -> str:
  """Returns what was done: "absent" (torchvision is not installed), "imported" (already
  imported: too late to change anything), "native" (its operator library loads: nothing to do),
  "shimmed" (schemas defined now) or "defined" (the operators exist already)."""
  global _library, load_error
  if "torchvision" in sys.modules:
    return "imported"
  spec = importlib.util.find_spec("torchvision")
  if spec is None or spec.origin is None:
    return "absent"
  import torch

  if all(_has_op(torch, s.split("(")[0]) for s in SCHEMAS):
    return "defined"
  # The file torchvision.extension loads, found the way torchvision finds it.
  finder = importlib.machinery.FileFinder(
    os.path.dirname(spec.origin),
    (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
  )
  lib = finder.find_spec("_C")
  if lib is not None:
    try:
      torch.ops.load_library(lib.origin)
      return "native"
    except OSError as e:
      load_error = f"{e}: {e.__cause__}" if e.__cause__ else str(e)
  else:
    load_error = f"no _C extension in {os.path.dirname(spec.origin)}"
  _library = torch.library.Library("torchvision", "FRAGMENT")
  for schema in SCHEMAS:
    if not _has_op(torch, schema.split("(")[0]):
      _library.define(schema)
  return "shimmed"
