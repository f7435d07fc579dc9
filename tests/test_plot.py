"""python -m puma_jax.tools.plot: curves from metrics.jsonl."""

import json

from puma_jax.tools import plot


def write_metrics(d, stage="mllm", n=6):
  d.mkdir(parents=True)
  lines = []
  for s in range(1, n + 1):
    rec = {"step": 10 * s, "loss": 10.0 / s, "grad_norm": 1.0}
    if stage == "mllm":
      rec.update(text_ce=5.0 / s, image_mse=3.0 / s, router_ce=1.0 / s, mse_f0=2.0 / s)
      rec.update(mse_f4=4.0 / s)
    lines.append(json.dumps(rec))
  if stage == "mllm":
    lines.append(json.dumps({"step": 10 * n, "eval/image_mse": 1.5, "eval/text_ce/chat": 2.0}))
  lines.append('{"step": 70, "loss": 1.')  # torn tail of a killed run
  (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_series_panels_and_torn_lines(tmp_path):
  write_metrics(tmp_path / "w")
  s = plot.read_metrics(tmp_path / "w" / "metrics.jsonl")
  assert s["loss"][0] == [10, 20, 30, 40, 50, 60]
  assert s["eval/image_mse"] == ([60], [1.5])
  assert plot._match("mse_f4", ("mse_f*",)) and not plot._match("eval/text_ce/chat", ("eval/*",))


def test_plots_every_stage_and_an_overview(tmp_path):
  write_metrics(tmp_path / "demo" / "pretrain")
  write_metrics(tmp_path / "demo" / "decoder_f0", stage="decoder")
  (tmp_path / "demo" / "parts").mkdir()  # not a training workdir: ignored
  out = plot.plot(tmp_path / "demo")
  names = sorted(p.name for p in out)
  assert names == ["decoder_f0.png", "overview.png", "pretrain.png"]
  for p in out:
    assert p.parent == tmp_path / "demo" / "plots"
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000


def test_single_workdir(tmp_path):
  write_metrics(tmp_path / "w")
  assert plot.main([f"--workdir={tmp_path / 'w'}", f"--out={tmp_path / 'o'}"]) == 0
  assert [p.name for p in (tmp_path / "o").iterdir()] == ["w.png"]


def test_workdir_without_metrics_is_a_clear_error(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  assert plot.main([f"--workdir={tmp_path / 'empty'}"]) == 2
  err = capsys.readouterr().err
  assert "no metrics.jsonl" in err and str(tmp_path / "empty") in err
  assert plot.main([f"--workdir={tmp_path / 'missing'}"]) == 2
  assert "not a directory" in capsys.readouterr().err
