"""The public reference implementations, with random weights: pytorch-fid's `InceptionV3` and
lpips's `LPIPS`, both built on torchvision's models (requirements-refs.txt pins all three).

They are imported from `.refs/` at the repository root, where .ci/run installs them apart from
site-packages (requirements-refs.txt says why), after tests/torchvision_shim.py has made
torchvision importable on the CPU torch. They are imported, never skipped: a test environment
without them is broken, not partial.

The parity tests compare our Flax models with these packages' own modules, and also with our
torch re-implementations (tests/torch_inception.py, tests/test_lpips.py), so that a misreading of
the architecture shared by ours and our re-implementation still shows.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import torch

from tests import torchvision_shim
from tests.utils import randomize_conv_net_

REFS = Path(__file__).resolve().parents[1] / ".refs"
INSTALL = "python -m pip install --no-deps --upgrade --target .refs -r requirements-refs.txt"

if REFS.is_dir() and str(REFS) not in sys.path:
  sys.path.insert(0, str(REFS))
torchvision_shim.install()
try:
  import lpips
  import torchvision
  from pytorch_fid import fid_score, inception as fid_inception
except ImportError as e:
  raise ImportError(
    f"{e}: the public LPIPS / pytorch-fid references are not installed; from the repository "
    f"root: {INSTALL}"
  ) from e

__all__ = ["fid_inception", "fid_score", "lpips", "torchvision"]


def pytorch_fid_inception(seed: int, monkeypatch, **kwargs):
  """`pytorch_fid.inception.InceptionV3(use_fid_inception=True, **kwargs)` in eval mode, with
  random weights instead of the downloaded FID file -> (network, the state dict it loaded).

  pytorch-fid builds the network (`fid_inception_v3`: torchvision's `Inception3`, 1008 classes,
  its blocks A, C, E_1, E_2 patched) and then loads `load_state_dict_from_url(FID_WEIGHTS_URL)`
  strictly. That loader is replaced by one that returns a randomized state dict of torchvision's
  own `inception_v3(num_classes=1008, aux_logits=False)`, the network pytorch-fid patches (the
  patches change forwards, not parameters), so the strict load checks the key set as well. That
  state dict has the layout of the FID weight file (`Mixed_5b.branch1x1.conv.weight`, `fc.*`,
  `num_batches_tracked`): it is what our converter reads.
  """
  loaded = []

  def load_random(url, **kw):
    del kw
    assert url == fid_inception.FID_WEIGHTS_URL  # the FID network, not torchvision's weights
    base = torchvision.models.inception_v3(
      weights=None, num_classes=1008, aux_logits=False, init_weights=False
    )
    loaded.append({k: v.clone() for k, v in randomize_conv_net_(base, seed).state_dict().items()})
    return loaded[-1]

  monkeypatch.setattr(fid_inception, "load_state_dict_from_url", load_random)
  net = fid_inception.InceptionV3(use_fid_inception=True, **kwargs).eval()
  assert len(loaded) == 1
  return net, loaded[0]


def lpips_alex(seed: int, monkeypatch):
  """`lpips.LPIPS(net='alex', version='0.1')` in eval mode -> (model, its AlexNet's state dict).

  The linear heads are the ones the package ships (`lpips/weights/v0.1/alex.pth`, loaded by
  lpips itself); the trunk is torchvision's `alexnet()` with random weights, handed to lpips in
  place of the ImageNet download (`lpips.pretrained_networks` calls `tv.alexnet(...)` and slices
  its `features`). The returned state dict has the layout of torchvision's weight file
  (`features.N.*`, `classifier.*`), which our converter reads.
  """
  trunk = randomize_conv_net_(torchvision.models.alexnet(weights=None), seed).eval()
  calls = []

  def alexnet(*args, **kw):
    calls.append((args, kw))
    return trunk

  monkeypatch.setattr(lpips.pretrained_networks.tv, "alexnet", alexnet)
  model = lpips.LPIPS(pretrained=True, net="alex", version="0.1", pnet_rand=True, verbose=False)
  model = model.eval()
  assert len(calls) == 1
  # The trunk's modules are lpips's slices (shared, not copied).
  taps = [getattr(model.net, f"slice{s}") for s in range(1, 6)]
  assert all(m is trunk.features[int(n)] for t in taps for n, m in t.named_children())
  assert sum(len(t) for t in taps) == 12  # features[0..11]: up to relu5, the last maxpool unused
  # lpips loads its heads with strict=False: make sure that they did load (not left random).
  shipped = torch.load(lpips_weights_file("alex"), map_location="cpu", weights_only=True)
  sd = model.state_dict()
  assert sorted(shipped) == [f"lin{k}.model.1.weight" for k in range(5)]
  for k, v in shipped.items():
    assert torch.equal(sd[k], v), k
  return model, trunk.state_dict()


def lpips_weights_file(net: str) -> Path:
  return Path(inspect.getfile(lpips.LPIPS)).parent / "weights" / "v0.1" / f"{net}.pth"
