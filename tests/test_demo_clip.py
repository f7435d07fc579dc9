"""The demo's contrastively trained stand-in CLIP (puma_jax/tools/demo_clip.py)."""

import json

import numpy as np
import pytest
from flax import nnx

from puma_jax import checkpoints
from puma_jax.tools import demo_clip


def _params(module) -> dict:
  return {
    "/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(module, nnx.Param))
  }


def test_tokenize_and_its_errors():
  vocab = demo_clip.vocabulary(["a red circle", "a blue square"])
  assert sorted(vocab.values()) == list(range(3, 3 + 5))
  toks = demo_clip.tokenize(["a red circle"], vocab, 6)
  assert toks.tolist() == [[demo_clip.BOS, vocab["a"], vocab["red"], vocab["circle"], 2, 0]]
  with pytest.raises(ValueError, match="'green'"):
    demo_clip.tokenize(["a green circle"], vocab, 6)
  with pytest.raises(ValueError, match="at most 2 fit"):
    demo_clip.tokenize(["a red circle"], vocab, 4)


def test_trains_the_vision_tower_keeps_its_place_code_and_writes_a_clip(tmp_path):
  dst = tmp_path / "clip"
  rec = demo_clip.train(dst, steps=12, batch=16, warmup=0, log_every=1, say=lambda s: None)
  # the loss falls from about log(16) within a few steps (its first value is before any update)
  first, last = rec["losses"][0][1], rec["losses"][-1][1]
  assert first > 2.0 and last < first - 0.3, rec["losses"]
  assert 0.0 <= rec["retrieval_before"] <= 1.0 and 0.0 <= rec["retrieval_after"] <= 1.0
  assert json.loads((dst / demo_clip.RECORD).read_text())["steps"] == 12
  trained = checkpoints.load_module(dst, family="clip-vision")
  start = demo_clip.random_clip(0)
  assert trained.config == start.config
  a, b = _params(trained), _params(start)
  assert a.keys() == b.keys()
  pos = [k for k in a if "position_embedding" in k]
  assert pos and all(np.array_equal(a[k], b[k]) for k in pos)  # frozen
  moved = [k for k in a if k not in pos and not np.allclose(a[k], b[k])]
  assert len(moved) > len(a) // 2  # the rest trained
  # an existing destination is never overwritten; bad sizes name the field
  with pytest.raises(ValueError, match="already exists"):
    demo_clip.train(dst, steps=1, batch=16)
  with pytest.raises(ValueError, match="batch=1"):
    demo_clip.train(tmp_path / "other", steps=1, batch=1)


def test_cli_requires_out_and_rejects_stray_arguments(tmp_path, capsys):
  assert demo_clip.main([]) == 2
  assert demo_clip.main([f"--out={tmp_path / 'x'}", "extra"]) == 2
  assert "unexpected arguments" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()
