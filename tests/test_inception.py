"""FID Inception-v3 vs a torch re-implementation of pytorch-fid's network (random weights)."""

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
from tests import torch_inception
from tests.utils import rel_err


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  net = torch_inception.randomized(0)
  root = tmp_path_factory.mktemp("inception")
  sd = dict(net.state_dict())  # includes fc.* and bn num_batches_tracked, as the real file does
  assert any(k.endswith("num_batches_tracked") for k in sd) and "fc.weight" in sd
  torch.save(sd, root / "pt_inception-test.pth")
  return net, root / "pt_inception-test.pth"


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


def test_feature_path_parity(source):
  """[0, 1] images -> bilinear resize -> [-1, 1] -> pool3, as pytorch-fid computes them, at the
  smallest target size the network accepts (75) so that it stays fast; the 299 twin is slow."""
  net, path = source
  model, _ = import_module("inception", path, config=inception.InceptionConfig(image_size=75))
  feats = fid.InceptionFeatures(model)
  x = np.random.RandomState(1).uniform(0, 1, (2, 100, 90, 3)).astype(np.float32)
  with torch.no_grad():
    xt = F.interpolate(nchw(x), size=(75, 75), mode="bilinear", align_corners=False)
    ref = net(2 * xt - 1).numpy()
  ours = feats(x)
  assert ours.shape == (2, 2048)
  assert rel_err(ours, ref) < 1e-4


@pytest.mark.slow
def test_feature_path_299(source, tmp_path):
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
