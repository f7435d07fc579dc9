"""Metric networks loaded sharded over 8 fake devices give the unsharded numbers."""

import jax
import numpy as np
from flax import nnx

from puma_jax import checkpoints, sharding
from puma_jax.evaluation import metrics
from puma_jax.models import clip_text, lpips
from tests.utils import rel_err


def numpy_random_module(build, seed: int):
  """A module with seeded NumPy weights (no jax.random: its per-shape compiles are slow on CPU)."""
  graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
  rs = np.random.RandomState(seed)

  def fill(path, v):
    if len(v.shape) >= 2:
      return (rs.randn(*v.shape) / np.sqrt(np.prod(v.shape[:-1]))).astype(np.float32)
    base = 1.0 if "scale" in str(path[-1]) else 0.0
    return np.asarray(base + 0.1 * rs.randn(*v.shape), np.float32)

  nnx.replace_by_pure_dict(params, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(params)))
  return nnx.merge(graphdef, params, rest)


def test_sharded_equals_unsharded(tmp_path):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  checkpoints.save_module(
    tmp_path / "lpips",
    "lpips-alex",
    lpips.LPIPSConfig(),
    numpy_random_module(lambda: lpips.LPIPS(rngs=nnx.Rngs(0)), 0),
  )
  checkpoints.save_module(
    tmp_path / "clip",
    "clip",
    clip_text.tiny(),
    numpy_random_module(lambda: clip_text.CLIPModel(clip_text.tiny(), rngs=nnx.Rngs(0)), 1),
  )
  rs = np.random.RandomState(0)
  a = rs.uniform(0, 1, (4, 64, 64, 3)).astype(np.float32)
  b = rs.uniform(0, 1, (4, 64, 64, 3)).astype(np.float32)

  plain = metrics.LPIPSMetric.load(tmp_path / "lpips")
  sharded = metrics.LPIPSMetric.load(tmp_path / "lpips", mesh=mesh)
  assert len(sharded.state["net"]["features_3"]["kernel"][...].sharding.device_set) == 8
  assert rel_err(sharded(a, b), plain(a, b)) < 1e-5

  plain = metrics.CLIPScorer.load(tmp_path / "clip", tokenizer=False)
  sharded = metrics.CLIPScorer.load(tmp_path / "clip", mesh=mesh, tokenizer=False)
  assert rel_err(sharded.clip_i(a, b), plain.clip_i(a, b)) < 1e-5
  ids = rs.randint(0, 120, (4, 16)).astype(np.int32)
  ids[:, 9] = clip_text.tiny().text_config.eos_token_id
  t_plain = plain._text(ids, np.ones_like(ids))
  t_sharded = sharded._text(ids, np.ones_like(ids))
  assert rel_err(t_sharded, t_plain) < 1e-5
