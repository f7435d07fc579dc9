"""FID Inception-v3 vs pytorch-fid's own `InceptionV3` and vs a torch re-implementation of it
(tests/torch_inception.py), random weights with random batch-norm statistics."""

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from puma_jax import sharding
from puma_jax.convert import ConversionError, convert, import_module
from puma_jax.evaluation import fid, metrics
from puma_jax.models import inception
from tests import public_refs, torch_inception
from tests.utils import rel_err


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  net = torch_inception.randomized(0)
  root = tmp_path_factory.mktemp("inception")
  sd = dict(net.state_dict())  # includes fc.* and bn num_batches_tracked, as the real file does
  assert any(k.endswith("num_batches_tracked") for k in sd) and "fc.weight" in sd
  torch.save(sd, root / "pt_inception-test.pth")
  return net, root / "pt_inception-test.pth"


@pytest.fixture(scope="module")
def public(tmp_path_factory):
  """pytorch-fid's `InceptionV3` (its FID network) with random weights, and the state dict it
  loaded saved as the weight file (`fc.*` and `num_batches_tracked` included)."""
  with pytest.MonkeyPatch.context() as mp:
    net, sd = public_refs.pytorch_fid_inception(7, mp, resize_input=False)
  assert "fc.weight" in sd and any(k.endswith("num_batches_tracked") for k in sd)
  path = tmp_path_factory.mktemp("pytorch_fid") / "pt_inception-random.pth"
  torch.save(sd, path)
  return net, path


def nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def test_param_count_matches_torch():
  ours = sharding.count_params(nnx.eval_shape(lambda: inception.FIDInceptionV3(rngs=nnx.Rngs(0))))
  net = torch_inception.FIDInception()
  params = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("fc."))
  stats = sum(
    b.numel() for n, b in net.named_buffers() if n.endswith(("running_mean", "running_var"))
  )
  # Batch-norm running statistics are parameters of ours (checkpoint tensors), buffers in torch.
  assert ours == params + stats == 21_820_000


def test_resize_matches_torch_interpolate():
  """pytorch-fid's resize: bilinear, align_corners=False, no antialiasing (up and down)."""
  x = np.random.RandomState(0).uniform(0, 1, (1, 37, 50, 3)).astype(np.float32)
  for size in ((80, 80), (20, 20), (299, 299)):
    ours = jax.image.resize(x, (1,) + size + (3,), "bilinear", antialias=False)
    ref = F.interpolate(nchw(x), size=size, mode="bilinear", align_corners=False)
    assert rel_err(ours, ref.permute(0, 2, 3, 1).numpy()) < 1e-5, size


def test_feature_path_parity(public):
  """[0, 1] images -> bilinear resize -> [-1, 1] -> pool3 at the smallest size the network
  accepts (75) so that it stays fast (the 299 twins are slow), vs pytorch-fid's own network and
  input scaling (`normalize_input`; its resize, to 299 only, replaced by the same `F.interpolate`
  call at 75) and vs our torch re-implementation (tests/torch_inception.py), same weights."""
  net, path = public
  model, _ = import_module("inception", path, config=inception.InceptionConfig(image_size=75))
  mine = torch_inception.FIDInception().eval()
  mine.load_state_dict(torch.load(path, weights_only=True))
  x = np.random.RandomState(1).uniform(0, 1, (2, 100, 90, 3)).astype(np.float32)
  with torch.no_grad():
    xt = F.interpolate(nchw(x), size=(75, 75), mode="bilinear", align_corners=False)
    out = net(xt)
    ref_mine = mine(2 * xt - 1).numpy()
  assert len(out) == 1 and out[0].shape == (2, 2048, 1, 1)
  ref = out[0].flatten(1).numpy()
  ours = fid.InceptionFeatures(model)(x)
  assert ours.shape == (2, 2048)
  assert rel_err(ours, ref) < 1e-4
  assert rel_err(ours, ref_mine) < 1e-4
  assert rel_err(ref_mine, ref) < 1e-5


@pytest.mark.slow
def test_pytorch_fid_299(public, tmp_path, monkeypatch):
  """pytorch-fid's whole forward (bilinear resize to 299, [-1, 1], network) vs ours."""
  net, path = public
  monkeypatch.setattr(net, "resize_input", True)
  feats = fid.InceptionFeatures.load(convert("inception", path, tmp_path / "inc"))
  x = np.random.RandomState(4).uniform(0, 1, (1, 128, 128, 3)).astype(np.float32)
  with torch.no_grad():
    ref = net(nchw(x))[0].flatten(1).numpy()
  assert rel_err(feats(x), ref) < 1e-4


@pytest.mark.slow
def test_feature_path_299(source, tmp_path):
  """Our torch re-implementation's whole path at 299 (its own random weights) vs ours."""
  net, path = source
  feats = fid.InceptionFeatures.load(convert("inception", path, tmp_path / "inc"))
  x = np.random.RandomState(2).uniform(0, 1, (1, 128, 128, 3)).astype(np.float32)
  with torch.no_grad():
    xt = F.interpolate(nchw(x), size=(299, 299), mode="bilinear", align_corners=False)
    ref = net(2 * xt - 1).numpy()
  assert rel_err(feats(x), ref) < 1e-4


def test_conversion_and_input_errors(source, tmp_path):
  net, _ = source
  sd = dict(net.state_dict())
  del sd["Mixed_6b.branch7x7_2.bn.running_var"]
  torch.save(sd, tmp_path / "broken.pth")
  with pytest.raises(ConversionError, match=r"Mixed_6b\.branch7x7_2\.bn\.running_var"):
    import_module("inception", tmp_path / "broken.pth")
  with pytest.raises(metrics.MissingWeightsError, match=r"'inception'.*missing_dir"):
    fid.InceptionFeatures.load(tmp_path / "missing_dir")
  with pytest.raises(ValueError, match="image_size=64"):
    inception.InceptionConfig(image_size=64)
  model = nnx.eval_shape(lambda: inception.FIDInceptionV3(rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="at least 75x75"):
    model(np.zeros((1, 64, 64, 3), np.float32))
  with pytest.raises(metrics.MetricInputError, match="values span"):
    fid.InceptionFeatures(model)(np.full((1, 80, 80, 3), -1.0, np.float32))
