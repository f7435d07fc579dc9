"""AlexNet trunk and LPIPS vs the `lpips` package's own `LPIPS` (its shipped heads, a random
torchvision AlexNet) and vs a PyTorch re-implementation of the lpips forward (random weights)."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn
import torch.nn.functional as F

from puma_jax import checkpoints, sharding
from puma_jax.convert import ConversionError, convert, import_module
from puma_jax.convert.__main__ import main as convert_main
from puma_jax.convert.core import write_safetensors
from puma_jax.evaluation import metrics
from puma_jax.models import alexnet, lpips as lpips_model
from tests import public_refs
from tests.utils import rel_err

WIDTHS = (64, 192, 384, 256, 256)
TAPS = (1, 4, 7, 9, 11)  # indices of relu1..relu5 in torchvision's `features`


def torch_features() -> nn.Sequential:
  """torchvision's `alexnet().features`, written out (torchvision is not a dependency)."""
  return nn.Sequential(
    nn.Conv2d(3, 64, 11, stride=4, padding=2),
    nn.ReLU(),
    nn.MaxPool2d(3, 2),
    nn.Conv2d(64, 192, 5, padding=2),
    nn.ReLU(),
    nn.MaxPool2d(3, 2),
    nn.Conv2d(192, 384, 3, padding=1),
    nn.ReLU(),
    nn.Conv2d(384, 256, 3, padding=1),
    nn.ReLU(),
    nn.Conv2d(256, 256, 3, padding=1),
    nn.ReLU(),
    nn.MaxPool2d(3, 2),
  )


def torch_lpips(features, lin_weights, x0, x1, per_layer=False):
  """The lpips v0.1 forward: scaling layer, unit-normalized taps, squared diff, 1x1 lin, mean."""
  shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
  scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

  def taps(x):
    x = (x - shift) / scale
    out = []
    for i, layer in enumerate(features):
      x = layer(x)
      if i in TAPS:
        out.append(x)
    return out

  def norm(f):
    return f / (torch.sqrt(torch.sum(f**2, dim=1, keepdim=True)) + 1e-10)

  res = [
    F.conv2d((norm(f0) - norm(f1)) ** 2, w).mean([2, 3], keepdim=True)
    for f0, f1, w in zip(taps(x0), taps(x1), lin_weights)
  ]
  if per_layer:
    return torch.cat([r.flatten(1) for r in res], 1)
  return sum(res).flatten()


def nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """Random torchvision-layout AlexNet + lpips head files, and the torch modules."""
  torch.manual_seed(0)
  feats = torch_features().eval()
  g = torch.Generator().manual_seed(1)
  lins = [torch.rand(1, w, 1, 1, generator=g) * 0.2 for w in WIDTHS]
  root = tmp_path_factory.mktemp("lpips_src")
  sd = {f"features.{k}": v for k, v in feats.state_dict().items()}
  # A (shrunken) classifier, as in torchvision's file: it must be skipped, not rejected.
  sd.update({"classifier.1.weight": torch.randn(8, 4), "classifier.1.bias": torch.randn(8)})
  torch.save(sd, root / "alexnet-owt.pth")
  torch.save({f"lin{k}.model.1.weight": w for k, w in enumerate(lins)}, root / "alex.pth")
  return root, feats, lins


@pytest.fixture(scope="module")
def public(tmp_path_factory):
  """lpips's `LPIPS(net='alex')` (random torchvision AlexNet, the package's heads), and its
  weights as the converter's sources: `src/` (torchvision's AlexNet file, lpips's `alex.pth`)
  and `lpips_alex.pth` (the module's own state dict)."""
  with pytest.MonkeyPatch.context() as mp:
    model, trunk = public_refs.lpips_alex(5, mp)
  root = tmp_path_factory.mktemp("lpips_public")
  (root / "src").mkdir()
  torch.save(trunk, root / "src" / "alexnet-owt.pth")
  shutil.copy(public_refs.lpips_weights_file("alex"), root / "src" / "alex.pth")
  torch.save(model.state_dict(), root / "lpips_alex.pth")
  return model, trunk, root


def test_real_size_param_count():
  real = nnx.eval_shape(lambda: alexnet.AlexNetFeatures(rngs=nnx.Rngs(0)))
  assert sharding.count_params(real) == 2_469_696
  assert sharding.count_params(real) == sum(p.numel() for p in torch_features().parameters())
  lp = nnx.eval_shape(lambda: lpips_model.LPIPS(rngs=nnx.Rngs(0)))
  assert sharding.count_params(lp) == 2_469_696 + sum(WIDTHS)


def test_alexnet_features_parity(weights, tmp_path):
  root, feats, _ = weights
  out = convert("alexnet", root / "alexnet-owt.pth", tmp_path / "alex")
  model = checkpoints.load_module(out, family="alexnet")
  x = np.random.RandomState(0).randn(2, 67, 71, 3).astype(np.float32)
  with torch.no_grad():
    xt = nchw(x)
    ref_taps = []
    for i, layer in enumerate(feats):
      xt = layer(xt)
      if i in TAPS:
        ref_taps.append(xt.permute(0, 2, 3, 1).numpy())
    ref = xt.permute(0, 2, 3, 1).numpy()
  ours = jax.jit(lambda x: model(x))(x)
  assert ours.shape == ref.shape
  assert rel_err(ours, ref) < 1e-4
  for a, b in zip(model.taps(jnp.asarray(x)), ref_taps):
    assert rel_err(a, b) < 1e-4


def test_lpips_parity(weights, tmp_path):
  root, feats, lins = weights
  out = convert("lpips-alex", root, tmp_path / "lpips")
  scorer = metrics.LPIPSMetric.load(out)
  rs = np.random.RandomState(0)
  a = rs.uniform(0, 1, (3, 64, 80, 3)).astype(np.float32)
  b = np.clip(a + 0.2 * rs.randn(*a.shape), 0, 1).astype(np.float32)
  with torch.no_grad():
    ref = torch_lpips(feats, lins, nchw(2 * a - 1), nchw(2 * b - 1)).numpy()
    ref_layers = torch_lpips(feats, lins, nchw(2 * a - 1), nchw(2 * b - 1), per_layer=True)
  ours = scorer(a, b)
  assert ours.shape == (3,)
  assert rel_err(ours, ref) < 1e-4, (ours, ref)
  graphdef, state = nnx.split(scorer.model)
  per = jax.jit(lambda s, x, y: nnx.merge(graphdef, s)(x, y, per_layer=True))(
    state, 2 * a - 1, 2 * b - 1
  )
  assert rel_err(per, ref_layers.numpy()) < 1e-4
  # Identical images are at distance 0; the distance is symmetric.
  np.testing.assert_allclose(scorer(a, a), 0.0, atol=1e-7)
  assert rel_err(scorer(b, a), ours) < 1e-5
  # LPIPS_d is LPIPS between the two generations.
  np.testing.assert_array_equal(scorer.diversity(a, b), ours)


def test_scaling_constants_are_lpips(public):
  model, _, _ = public
  np.testing.assert_array_equal(
    model.scaling_layer.shift.flatten().numpy(), np.float32(lpips_model.SHIFT)
  )
  np.testing.assert_array_equal(
    model.scaling_layer.scale.flatten().numpy(), np.float32(lpips_model.SCALE)
  )


def test_lpips_matches_lpips_package(public, tmp_path):
  """Distances and per-layer terms of lpips's own forward ([0, 1] inputs: `normalize=True`), from
  both source layouts; our torch re-implementation agrees with lpips on lpips's weights."""
  model, trunk, root = public
  rs = np.random.RandomState(6)
  a = rs.uniform(0, 1, (3, 64, 80, 3)).astype(np.float32)
  b = np.clip(a + 0.2 * rs.randn(*a.shape), 0, 1).astype(np.float32)
  with torch.no_grad():
    ref, ref_layers = model(nchw(a), nchw(b), retPerLayer=True, normalize=True)
  assert ref.shape == (3, 1, 1, 1) and len(ref_layers) == 5
  ref = ref.flatten().numpy()
  ref_layers = torch.cat([r.flatten(1) for r in ref_layers], 1).numpy()
  two_files = metrics.LPIPSMetric.load(convert("lpips-alex", root / "src", tmp_path / "two"))
  assert rel_err(two_files(a, b), ref) < 1e-4
  graphdef, state = nnx.split(two_files.model)
  per = jax.jit(lambda s, x, y: nnx.merge(graphdef, s)(x, y, per_layer=True))(
    state, 2 * a - 1, 2 * b - 1
  )
  assert rel_err(per, ref_layers) < 1e-4
  # lpips's state dict (each head as linK and lins.K) converts to the same parameters.
  one_file, _ = import_module("lpips-alex", root / "lpips_alex.pth")
  pa, pb = checkpoints.param_arrays(one_file), checkpoints.param_arrays(two_files.model)
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k])
  feats = torch_features().eval()
  feats.load_state_dict({k[len("features.") :]: v for k, v in trunk.items() if "features" in k})
  # The shipped file holds CUDA tensors: lpips (and our reader) load it with map_location="cpu".
  shipped = torch.load(root / "src" / "alex.pth", map_location="cpu", weights_only=True)
  lins = [shipped[f"lin{k}.model.1.weight"] for k in range(5)]
  with torch.no_grad():
    mine = torch_lpips(feats, lins, nchw(2 * a - 1), nchw(2 * b - 1), per_layer=True).numpy()
  assert rel_err(mine, ref_layers) < 1e-5


def test_lpips_head_copies_are_checked(public, tmp_path):
  """lpips's second name of a head (`lins.K`) must equal `linK` and come with it."""
  model, _, _ = public
  sd = dict(model.state_dict())
  sd["lins.2.model.1.weight"] = sd["lins.2.model.1.weight"] + 1
  torch.save(sd, tmp_path / "differs.pth")
  with pytest.raises(ConversionError, match=r"'lins\.2\.model\.1\.weight' differs from 'lin2\."):
    import_module("lpips-alex", tmp_path / "differs.pth")
  sd = dict(model.state_dict())
  del sd["lin3.model.1.weight"]
  torch.save(sd, tmp_path / "orphan.pth")
  with pytest.raises(ConversionError, match=r"'lin3\.model\.1\.weight', which the file does not"):
    import_module("lpips-alex", tmp_path / "orphan.pth")


def test_lpips_module_state_dict_layout(weights, tmp_path):
  """The layout of a saved `lpips.LPIPS(net='alex').state_dict()` (net.sliceS.N.*,
  scaling_layer.*; lpips's own file, with the lins.K copies, in the test above) converts to the
  same model as the two-file layout."""
  root, feats, lins = weights
  slice_of = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
  sd = {
    "scaling_layer.shift": torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1),
    "scaling_layer.scale": torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1),
  }
  for k, v in feats.state_dict().items():
    n = int(k.split(".")[0])
    sd[f"net.slice{slice_of[n]}.{k}"] = v
  sd.update({f"lin{k}.model.1.weight": w for k, w in enumerate(lins)})
  write_safetensors({k: v.numpy() for k, v in sd.items()}, tmp_path / "lpips_alex.safetensors")
  a_model, _ = import_module("lpips-alex", tmp_path / "lpips_alex.safetensors")
  b_model, _ = import_module("lpips-alex", root)
  pa, pb = checkpoints.param_arrays(a_model), checkpoints.param_arrays(b_model)
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k])


def test_conversion_is_strict(weights, tmp_path):
  root, feats, lins = weights
  src = tmp_path / "partial"
  src.mkdir()
  sd = {f"features.{k}": v for k, v in feats.state_dict().items()}
  torch.save(sd, src / "alexnet.pth")
  torch.save({f"lin{k}.model.1.weight": w for k, w in enumerate(lins[:4])}, src / "alex.pth")
  with pytest.raises(ConversionError, match=r"lin4\.model\.1\.weight"):
    import_module("lpips-alex", src)
  torch.save(
    {f"lin{k}.model.1.weight": w for k, w in enumerate(lins)} | {"lin5.extra": lins[0]},
    src / "alex.pth",
  )
  with pytest.raises(ConversionError, match=r"lin5\.extra"):
    import_module("lpips-alex", src)
  # The same tensor in two files of the source directory.
  torch.save({f"lin{k}.model.1.weight": w for k, w in enumerate(lins)}, src / "alex.pth")
  torch.save({"lin0.model.1.weight": lins[0]}, src / "copy.pth")
  with pytest.raises(ConversionError, match=r"lin0\.model\.1\.weight.*both"):
    import_module("lpips-alex", src)
  # A wrong width names the tensor and both shapes.
  bad = dict(sd)
  bad["features.3.weight"] = torch.zeros(192, 32, 5, 5)
  torch.save(bad, tmp_path / "bad_alex.pth")
  with pytest.raises(ConversionError, match=r"features\.3\.weight.*\(192, 32, 5, 5\)"):
    import_module("alexnet", tmp_path / "bad_alex.pth")


def test_cli(weights, tmp_path, capsys):
  root, _, _ = weights
  assert convert_main(["lpips-alex", f"--src={root}", f"--dst={tmp_path / 'out'}"]) == 0
  assert checkpoints.load_info(tmp_path / "out")["family"] == "lpips-alex"
  assert (
    convert_main(["lpips-alex", f"--src={tmp_path / 'nope'}", f"--dst={tmp_path / 'out2'}"]) == 2
  )
  assert "does not exist" in capsys.readouterr().err


def test_bad_input(weights, tmp_path):
  root, _, _ = weights
  with pytest.raises(metrics.MissingWeightsError, match=r"lpips-alex.*absent_dir"):
    metrics.LPIPSMetric.load(tmp_path / "absent_dir")
  # Inputs are checked before any computation: an abstract model suffices.
  scorer = metrics.LPIPSMetric(nnx.eval_shape(lambda: lpips_model.LPIPS(rngs=nnx.Rngs(0))))
  x = np.full((2, 64, 64, 3), 0.5, np.float32)
  with pytest.raises(metrics.MetricInputError, match=r"differ in shape"):
    scorer(x, x[:, :32])
  with pytest.raises(metrics.MetricInputError, match=r"\(x \+ 1\) / 2"):
    scorer(x * 2 - 1.5, x)
  with pytest.raises(metrics.MetricInputError, match=r"divided by 255"):
    scorer(x, x * 200)
  with pytest.raises(metrics.MetricInputError, match=r"dtype uint8"):
    scorer((x * 255).astype(np.uint8), x)
  with pytest.raises(metrics.MetricInputError, match=r"NCHW"):
    scorer(x.transpose(0, 3, 1, 2), x.transpose(0, 3, 1, 2))
  with pytest.raises(metrics.MetricInputError, match=r"NaN"):
    scorer(np.where(x > 0, np.nan, x).astype(np.float32), x)
  with pytest.raises(ValueError, match="at least 31x31"):
    scorer.model.net.taps(jnp.zeros((1, 30, 40, 3)))
  with pytest.raises(metrics.MetricInputError, match=r"images\[1\] is \(32, 32, 3\)"):
    metrics.stack_images([x[0], x[1, :32, :32]])
