"""Sharded, resumable eval runs: 8 devices == 1 device, 2 hosts == 1 host, interrupted == whole,
and bad input (missing / unreadable / mixed-size images, empty data, absent metric weights)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from puma_jax.evaluation import config as eval_config
from puma_jax.evaluation import evaluators, metrics, records, runner


def cfg_for(protocol, **over):
  c = eval_config.base(protocol, "toy")
  c.scales = ("f0", "f4")
  c.image_size = 32
  c.batch_size = 3
  c.data.synthetic.num_items = 5
  c.data.synthetic.size = 32
  c.model.toy_size = 32
  for k, v in over.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def quiet(*a, **k):
  pass


def run(tmp_path, name, cfg):
  return runner.evaluate(cfg, str(tmp_path / name), log=quiet)


def close(a, b, tol=1e-5):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k] == pytest.approx(b[k], rel=tol, abs=1e-6), k


@pytest.fixture(scope="module")
def recon_ref(tmp_path_factory):
  """The uninterrupted single-host run on all 8 devices (the reference for the tests below)."""
  return run(tmp_path_factory.mktemp("ref"), "w", cfg_for("reconstruction"))


def test_put_shards_and_pads():
  mesh = runner.sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  put = runner.make_put(mesh)
  x, n = put(np.arange(5 * 2, dtype=np.float32).reshape(5, 2))
  assert n == 5 and x.shape == (8, 2) and len(x.sharding.device_set) == len(jax.devices())
  np.testing.assert_array_equal(np.asarray(x)[5:], np.asarray(x)[4:5].repeat(3, 0))


def test_reconstruction_results_files(recon_ref, tmp_path):
  m = recon_ref["metrics"]
  assert m["items/scored"] == 5 and m["items/skipped"] == 0
  assert set(m) >= {"f0/psnr", "f0/lpips", "f4/psnr", "f4/lpips"}
  # The toy keeps a 16x16 grid at f0 and one colour at f4: f0 must be the closer copy.
  assert m["f0/psnr"] > m["f4/psnr"] and m["f0/lpips"] < m["f4/lpips"]
  assert recon_ref["devices_per_host"] == len(jax.devices()) == 8
  assert "lpips" in recon_ref["random_weights"]


def test_one_device_equals_eight(recon_ref, tmp_path):
  one = run(tmp_path, "one", cfg_for("reconstruction", num_devices=1))
  assert one["devices_per_host"] == 1
  close(one["metrics"], recon_ref["metrics"])


def test_two_hosts_equal_one(recon_ref, tmp_path):
  for pi in (1, 0):  # host 0 gathers, so it runs last
    out = run(tmp_path, "w", cfg_for("reconstruction", process_index=pi, process_count=2))
  assert out["hosts"] == 2
  shards = sorted(p.name for p in (tmp_path / "w" / "shards").glob("*.jsonl"))
  assert shards == ["host000-of-002.jsonl", "host001-of-002.jsonl"]
  close(out["metrics"], recon_ref["metrics"])


def test_host0_waits_for_other_hosts(tmp_path):
  assert run(tmp_path, "w", cfg_for("understanding", process_index=0, process_count=2)) is None
  assert not (tmp_path / "w" / "results.json").exists()
  run(tmp_path, "w", cfg_for("understanding", process_index=1, process_count=2))
  out = run(tmp_path, "w", cfg_for("understanding", process_index=0, process_count=2))
  assert out["metrics"]["items/scored"] == 20


def test_interrupted_run_resumes(recon_ref, tmp_path, monkeypatch):
  assert run(tmp_path, "w", cfg_for("reconstruction", max_items_this_run=3)) is None
  lines = (tmp_path / "w" / "shards" / "host000-of-001.jsonl").read_text().splitlines()
  assert len(lines) == 1 and len(json.loads(lines[0])["items"]) == 3
  # A torn write at the end (the process died mid-line) is dropped and redone.
  with open(tmp_path / "w" / "shards" / "host000-of-001.jsonl", "a") as f:
    f.write('{"batch": 1, "items": [{"id"')
  calls = []
  orig = evaluators.ReconstructionEvaluator.score
  monkeypatch.setattr(
    evaluators.ReconstructionEvaluator,
    "score",
    lambda self, recs: calls.append(len(recs)) or orig(self, recs),
  )
  out = run(tmp_path, "w", cfg_for("reconstruction"))
  assert calls == [2]  # only the two unfinished records were scored
  close(out["metrics"], recon_ref["metrics"])
  # A finished run reruns without scoring anything.
  again = run(tmp_path, "w", cfg_for("reconstruction"))
  assert calls == [2] and again["metrics"] == out["metrics"]


def test_resume_with_other_config_is_an_error(tmp_path):
  run(tmp_path, "w", cfg_for("understanding"))
  with pytest.raises(runner.EvalError, match="another config"):
    run(tmp_path, "w", cfg_for("understanding", seed=3))


def _t2i_checks(tmp_path, fid):
  out = run(tmp_path, "w", cfg_for("text_to_image", **{"metrics.fid": fid}))
  m = out["metrics"]
  items = [
    it
    for ln in (tmp_path / "w" / "shards" / "host000-of-001.jsonl").read_text().splitlines()
    for it in json.loads(ln)["items"]
  ]
  for name in ("clip_i", "clip_t"):
    want = np.mean([max(it["values"][f"f0/{name}"], it["values"][f"f4/{name}"]) for it in items])
    assert m[f"max/{name}"] == pytest.approx(want, rel=1e-6)
    assert m[f"max/{name}"] >= max(m[f"f0/{name}"], m[f"f4/{name}"]) - 1e-9
  assert m["f0/lpips_d"] > 0
  md = (tmp_path / "w" / "results.md").read_text()
  assert "| max/clip_i |" in md and "0.7360" in md
  return m


def test_text_to_image_max(tmp_path):
  assert "f0/fid" not in _t2i_checks(tmp_path, fid=False)


@pytest.mark.slow
def test_text_to_image_fid(tmp_path):
  """~2 min on 2 CPU cores: compiling the (random-weight) FID Inception."""
  m = _t2i_checks(tmp_path, fid=True)
  assert m["f0/fid"] > 0 and m["f4/fid"] > 0
  # FID recomputed from the per-host feature files equals the reported one.
  lines = runner.ShardFile(tmp_path / "w" / "shards", 0, 1).read()
  items, feats = runner._gather(lines)
  assert feats["real"].shape == (5, 2048)
  from puma_jax.evaluation import fid

  assert m["f4/fid"] == pytest.approx(
    fid.fid_from_features(feats["real"], feats["gen/f4"]), rel=1e-9
  )


def test_shard_features_gather_in_record_order(tmp_path):
  """Fast twin of the FID resume path: features written per batch (skips carry none) come
  back aligned with their items in record order, whatever order the batches finished in."""
  sf = runner.ShardFile(tmp_path, 0, 1)
  sf.append(
    0,
    [{"id": "c", "idx": 2, "values": {"v": 2.0}}, {"id": "b", "idx": 1, "skip": "x"}],
    {"f": np.full((1, 3), 2.0, np.float32)},
  )
  sf.append(
    1,
    [{"id": "a", "idx": 0, "values": {"v": 0.0}}, {"id": "d", "idx": 3, "values": {"v": 3.0}}],
    {"f": np.array([[0.0] * 3, [3.0] * 3], np.float32)},
  )
  items, feats = runner._gather(runner.ShardFile(tmp_path, 0, 1).read())
  assert [it["id"] for it in items] == ["a", "b", "c", "d"]
  np.testing.assert_array_equal(feats["f"][:, 0], [0.0, 2.0, 3.0])


def test_editing_and_understanding_run(tmp_path):
  m = run(tmp_path, "e", cfg_for("editing"))["metrics"]
  assert {"f0/clip_i", "f0/clip_t", "f0/dino", "max/dino"} <= set(m)
  u = run(tmp_path, "u", cfg_for("understanding"))["metrics"]
  assert u["items/scored"] == 20  # 5 scenes x (short, choice, yes, no)
  assert {"short/accuracy", "choice/accuracy", "mme/total", "mme/color/acc_plus"} <= set(u)


# -- bad input ----------------------------------------------------------------------------------


def write_jsonl(path: Path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_bad_images_are_counted_skips(tmp_path):
  rs = np.random.RandomState(0)
  Image.fromarray(rs.randint(0, 255, (32, 32, 3), np.uint8)).save(tmp_path / "ok.png")
  Image.fromarray(rs.randint(0, 255, (40, 32, 3), np.uint8)).save(tmp_path / "tall.png")
  (tmp_path / "broken.png").write_bytes(b"not a png")
  rows = [
    {"id": "ok", "image": "ok.png"},
    {"id": "gone", "image": "missing.png"},
    {"id": "bad", "image": "broken.png"},
    {"id": "tall", "image": "tall.png"},
  ]
  path = write_jsonl(tmp_path / "r.jsonl", [dict(r, caption="a red circle") for r in rows])
  c = cfg_for(
    "text_to_image",
    **{
      "data.source": "jsonl",
      "data.path": path,
      "data.mixed_sizes": "skip",
      "metrics.fid": False,
      "metrics.lpips_d": False,
    },
  )
  m = run(tmp_path, "w", c)["metrics"]
  assert m["items/scored"] == 1 and m["items/skipped"] == 3
  assert m["skipped/missing_image"] == 1 and m["skipped/unreadable_image"] == 1
  assert m["skipped/mixed_sizes"] == 1
  # "resize" (the default) scores the odd-sized image instead.
  c.data.mixed_sizes = "resize"
  m = run(tmp_path, "w2", c)["metrics"]
  assert m["items/scored"] == 2 and "skipped/mixed_sizes" not in m


def test_every_record_skipped_is_an_error(tmp_path):
  path = write_jsonl(tmp_path / "r.jsonl", [{"image": "nope.png"}])
  c = cfg_for("reconstruction", **{"data.source": "jsonl", "data.path": path})
  with pytest.raises(runner.EvalError, match="every record was skipped.*missing_image"):
    run(tmp_path, "w", c)


def test_empty_and_malformed_datasets(tmp_path):
  empty = write_jsonl(tmp_path / "e.jsonl", [])
  with pytest.raises(records.EvalDataError, match="dataset is empty"):
    run(tmp_path, "w", cfg_for("reconstruction", **{"data.source": "jsonl", "data.path": empty}))
  bad = write_jsonl(tmp_path / "b.jsonl", [{"id": 1, "caption": "x"}])
  with pytest.raises(records.EvalDataError, match=r"b.jsonl:1: text_to_image record lacks .*image"):
    run(tmp_path, "w2", cfg_for("text_to_image", **{"data.source": "jsonl", "data.path": bad}))
  with pytest.raises(records.EvalDataError, match="does not exist"):
    run(
      tmp_path,
      "w3",
      cfg_for(
        "reconstruction", **{"data.source": "jsonl", "data.path": str(tmp_path / "no.jsonl")}
      ),
    )
  with pytest.raises(records.EvalDataError, match="kind='essay'"):
    evaluators.understanding_prompt({"id": 1, "question": "q", "kind": "essay"})


def test_absent_metric_weights(tmp_path):
  with pytest.raises(
    metrics.MissingWeightsError, match="LPIPS needs converted 'lpips-alex'.*no directory given"
  ):
    run(tmp_path, "w", cfg_for("reconstruction", **{"metrics.random_tiny": False}))
  with pytest.raises(metrics.MissingWeightsError, match="does not exist"):
    run(tmp_path, "w2", cfg_for("editing", **{"metrics.clip": str(tmp_path / "nope")}))


def test_cli(tmp_path):
  root = Path(__file__).resolve().parents[1]
  cmd = [
    sys.executable,
    "-m",
    "puma_jax.eval",
    "--config=configs/eval/understanding.py:toy",
    f"--workdir={tmp_path / 'w'}",
    "--config.data.synthetic.num_items=2",
  ]
  p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "stand-ins built in-process" in p.stdout and "| mme/total |" in p.stdout
  assert json.loads((tmp_path / "w" / "results.json").read_text())["records"] == 8
  p = subprocess.run(
    cmd[:4]
    + [
      f"--workdir={tmp_path / 'x'}",
      "--config.data.source=jsonl",
      f"--config.data.path={write_jsonl(tmp_path / 'e.jsonl', [])}",
    ],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 2 and "dataset is empty" in p.stderr


@pytest.mark.slow
def test_tiny_models_real_path(tmp_path):
  """~1-2 min: random-weight tiny CLIP + PUMA decoder + VAE reconstructing through the sampler
  (the fast twin is the toy generator above). Two single-record batches == one batch of two:
  sampling keys follow the record, not its batch position."""
  c = cfg_for("reconstruction", scales=("f3",), **{"data.synthetic.num_items": 2})
  c.model.kind = "tiny"
  whole = run(tmp_path, "a", c)["metrics"]
  c.batch_size = 1
  split = run(tmp_path, "b", c)["metrics"]
  close(split, whole, tol=1e-4)
  assert whole["items/scored"] == 2 and np.isfinite(whole["f3/psnr"])
