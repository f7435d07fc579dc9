"""Sharded, resumable eval runs: records split over hosts and over the local mesh's data axes.

  records (data.*)  ->  host h takes records h, h + H, h + 2H, ...  (H = process count)
                    ->  batches of `batch_size`; the metric networks see each batch sharded over
                        the local devices (`put`)
                    ->  each finished batch is appended to workdir/shards/hostH-of-N.jsonl (its
                        Inception features, if any, to a .npz written *before* the line, so a
                        line always has its features)
  process 0, once every host has written its done marker, gathers all shard files in record
  order and writes workdir/results.json and workdir/results.md.

Resume: a restarted run reads its shard file, skips the records already in it (a torn last
line is dropped), and scores only the rest. The config (minus fields that cannot change the
numbers: mesh, batch_size, max_items_this_run) is pinned in workdir/eval_config.json; resuming
with another one is an error rather than a silent mix. Hosts share the workdir (a shared file
system, as for checkpoints).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from puma_jax import fileio, sharding
from puma_jax.evaluation import evaluators as E
from puma_jax.evaluation import models, records as R

# Paper numbers (docs/DESIGN.md §13) beside the metric names that correspond to them.
PAPER = {
  "reconstruction": {
    "f0/psnr": 18.16,
    "f0/lpips": 0.2215,
    "f1/psnr": 13.26,
    "f1/lpips": 0.4325,
    "f2/psnr": 12.35,
    "f2/lpips": 0.4992,
    "f3/psnr": 11.04,
    "f3/lpips": 0.5971,
    "f4/psnr": 10.76,
    "f4/lpips": 0.6481,
  },
  "text_to_image": {"max/clip_i": 0.736, "max/clip_t": 0.317, "f4/lpips_d": 0.613},
  "editing": {"max/clip_i": 0.846, "max/clip_t": 0.270, "max/dino": 0.785},
  "understanding": {
    "choice/accuracy": "68.9 (MMBench)",
    "mme/total": "1490.3 (MME)",
    "short/accuracy": "60.6 (GQA) / 76.2 (VQAv2)",
  },
}
# Fields that change how a run is executed but not its numbers.
_EXECUTION_ONLY = (
  "mesh",
  "num_devices",
  "batch_size",
  "max_items_this_run",
  "process_index",
  "process_count",
)


class EvalError(RuntimeError):
  pass


def _fingerprint(cfg) -> dict:
  d = json.loads(cfg.to_json())
  for k in _EXECUTION_ONLY:
    d.pop(k, None)
  return d


def _host(cfg) -> tuple[int, int]:
  pi = jax.process_index() if cfg.process_index < 0 else int(cfg.process_index)
  pc = jax.process_count() if cfg.process_count < 0 else int(cfg.process_count)
  if not 0 <= pi < pc:
    raise EvalError(f"process_index={pi} is not in [0, process_count={pc})")
  return pi, pc


def make_put(mesh):
  """NHWC numpy batch -> (array sharded over the data axes, true batch size); padded with
  copies of the last row to a multiple of the data-parallel size."""
  dp = mesh.shape["data"] * mesh.shape["fsdp"]

  def put(x):
    x = np.asarray(x)
    n = x.shape[0]
    if n % dp:
      x = np.concatenate([x, np.repeat(x[-1:], dp - n % dp, 0)])
    return jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)), n

  return put


class ShardFile:
  """One host's finished batches: jsonl lines {"batch", "items"} (+ an .npz of features)."""

  def __init__(self, root: Path, pi: int, pc: int):
    self.root = root
    self.stem = f"host{pi:03d}-of-{pc:03d}"
    self.path = root / f"{self.stem}.jsonl"
    self.done_path = root / f"{self.stem}.done"

  def read(self) -> list[dict]:
    if not self.path.exists():
      return []
    lines, good = [], 0
    raw = self.path.read_bytes()
    chunks = raw.split(b"\n")
    for n, line in enumerate(chunks, 1):
      if not line.strip():
        good += len(line) + 1
        continue
      try:
        ln = json.loads(line)
      except (json.JSONDecodeError, UnicodeDecodeError):
        if n < len(chunks) - 1 and any(c.strip() for c in chunks[n:]):
          # Complete lines follow: not a torn tail but a damaged file; refuse to guess.
          raise EvalError(
            f"{self.path}:{n}: not JSON; remove the file (or the workdir) to "
            "score this host's records again"
          ) from None
        break  # a torn write from an interrupted run: everything after it is redone
      self._check_line(ln, n)
      lines.append(ln)
      good += len(line) + 1
    if good < len(raw):
      with open(self.path, "r+b") as f:
        f.truncate(good)
    for ln in lines:
      if ln.get("features"):
        path = self.root / ln["features"]
        try:
          with np.load(path, allow_pickle=False) as z:
            ln["feats"] = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError) as e:
          raise EvalError(
            f"{self.path}: batch {ln['batch']} names features file {path}, "
            f"which cannot be read ({type(e).__name__}: {e})"
          ) from None
    return lines

  def _check_line(self, ln, n: int) -> None:
    """A line must be {"batch": int, "items": [{"id", "idx", ...}], "features"?: str}."""
    where = f"{self.path}:{n}"
    if (
      not isinstance(ln, dict)
      or not isinstance(ln.get("batch"), int)
      or not isinstance(ln.get("items"), list)
    ):
      raise EvalError(
        f'{where}: not a shard line ({{"batch": int, "items": [...]}}); got {str(ln)[:80]}'
      )
    for it in ln["items"]:
      if not isinstance(it, dict) or "id" not in it or not isinstance(it.get("idx"), int):
        raise EvalError(
          f'{where}: an item is not an object with "id" and "idx"; got {str(it)[:80]}'
        )
    feats = ln.get("features")
    if feats is not None and (not isinstance(feats, str) or os.path.basename(feats) != feats):
      raise EvalError(f"{where}: features {feats!r} is not a file name in {self.root}")

  def append(self, batch: int, items: list[dict], feats: dict) -> None:
    line = {"batch": batch, "items": items}
    if feats:
      name = f"{self.stem}-batch{batch:06d}.npz"
      tmp = self.root / (name + ".tmp.npz")
      np.savez(tmp, **feats)
      os.replace(tmp, self.root / name)
      line["features"] = name
    with open(self.path, "a") as f:
      f.write(json.dumps(line) + "\n")
      f.flush()
      os.fsync(f.fileno())


def _gather(lines) -> tuple[list[dict], dict]:
  """Items of all batches in record order, and their features in the same order."""
  rows = []
  for ln in lines:
    feats = ln.get("feats", {})
    k = 0
    for it in ln["items"]:
      f = None
      if "values" in it and feats:
        f = {name: v[k] for name, v in feats.items()}
        k += 1
      rows.append((it["idx"], it, f))
  rows.sort(key=lambda r: r[0])
  items = [r[1] for r in rows]
  names = sorted({n for r in rows if r[2] for n in r[2]})
  feats = {n: np.stack([r[2][n] for r in rows if r[2]]) for n in names}
  return items, feats


def evaluate(cfg, workdir: str, log=print) -> dict | None:
  """Runs (or resumes) this host's share; process 0 returns the gathered results (others and
  runs stopped by `max_items_this_run` return None)."""
  protocol = cfg.protocol
  if protocol not in E.EVALUATORS:
    raise EvalError(f"protocol={protocol!r}; choose from {sorted(E.EVALUATORS)}")
  workdir = Path(workdir)
  shard_dir = workdir / "shards"
  shard_dir.mkdir(parents=True, exist_ok=True)
  pi, pc = _host(cfg)
  # One run per host share: two runs appending to one shard file would double every result.
  lock = fileio.WorkdirLock(
    shard_dir, f"eval run (host {pi} of {pc})", name=f"host{pi:03d}-of-{pc:03d}.lock"
  )
  try:
    lock.acquire()
  except fileio.LockedError as e:
    raise EvalError(str(e)) from None
  if lock.took_over:
    log(
      f"[eval {protocol}] taking over the lock of a run that died (pid "
      f"{lock.took_over.get('pid')} on {lock.took_over.get('host')})"
    )
  try:
    return _evaluate(cfg, workdir, shard_dir, pi, pc, log)
  finally:
    lock.release()


def _evaluate(cfg, workdir: Path, shard_dir: Path, pi: int, pc: int, log) -> dict | None:
  protocol = cfg.protocol
  pinned = workdir / "eval_config.json"
  fp = _fingerprint(cfg)
  if pinned.exists():
    if json.loads(pinned.read_text()) != fp:
      raise EvalError(
        f"{workdir} holds a run with another config ({pinned}); use a new "
        "--workdir or the same config to resume"
      )
  else:
    pinned.write_text(json.dumps(fp, indent=1, sort_keys=True))

  recs = R.load_records(protocol, cfg.data)
  if cfg.max_items > 0:
    recs = recs[: int(cfg.max_items)]
  for i, r in enumerate(recs):
    r["idx"] = i
  mine = recs[pi::pc]
  shard = ShardFile(shard_dir, pi, pc)
  done_lines = shard.read()
  finished = {it["id"] for ln in done_lines for it in ln["items"]}
  pending = [r for r in mine if str(r["id"]) not in finished]
  log(
    f"[eval {protocol}] host {pi}/{pc}: {len(mine)} records, {len(mine) - len(pending)} "
    f"already done, {len(pending)} to score"
  )

  devices = jax.local_devices()
  if cfg.num_devices > 0:
    if cfg.num_devices > len(devices):
      raise EvalError(f"num_devices={cfg.num_devices} but this host has {len(devices)}")
    devices = devices[: int(cfg.num_devices)]
  mesh = sharding.make_mesh(dict(cfg.mesh), devices=devices)
  nets = models.MetricNets(cfg.metrics, mesh)
  gen = models.build_generator(protocol, cfg.model, tuple(cfg.scales)) if pending else None
  ev = E.EVALUATORS[protocol](cfg, gen, nets, make_put(mesh))
  bs, budget = int(cfg.batch_size), int(cfg.max_items_this_run)
  batch_no = max((ln["batch"] for ln in done_lines), default=-1) + 1
  t0, scored = time.time(), 0
  for start in range(0, len(pending), bs):
    if budget > 0 and scored >= budget:
      log(f"[eval {protocol}] stopping after {scored} items (max_items_this_run); rerun to resume")
      return None
    batch = pending[start : start + bs]
    items, feats = ev.score(batch)
    idx = {str(r["id"]): r["idx"] for r in batch}
    for it in items:
      it["idx"] = idx[it["id"]]
    shard.append(batch_no, items, {k: np.asarray(v, np.float32) for k, v in feats.items()})
    batch_no += 1
    scored += len(batch)
  if pending:
    log(f"[eval {protocol}] host {pi}: scored {scored} records in {time.time() - t0:.1f}s")
  shard.done_path.write_text(json.dumps({"records": len(mine)}))

  if pc > 1 and cfg.process_count < 0:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("puma_jax_eval_done")
  if pi != 0:
    return None
  lines = []
  for h in range(pc):
    other = ShardFile(shard_dir, h, pc)
    if not other.done_path.exists():
      log(f"[eval {protocol}] host {h} has not finished; results are written once it has")
      return None
    lines += other.read()
  items, feats = _gather(lines)
  idx = [it["idx"] for it in items]
  if len(set(idx)) != len(idx):
    raise EvalError(
      f"shard files in {shard_dir} hold {len(idx) - len(set(idx))} duplicate "
      "result(s) (written by two runs at once?); remove them to score again"
    )
  if len(items) != len(recs):
    raise EvalError(f"shard files hold {len(items)} results for {len(recs)} records")
  if not any("values" in it for it in items):
    reasons = sorted({it["skip"] for it in items})
    raise EvalError(
      f"{protocol}: every record was skipped ({', '.join(reasons)}); first: "
      f"{items[0].get('detail', '')}"
    )
  results = ev.aggregate(items, feats)
  out = {
    "protocol": protocol,
    "metrics": results,
    "records": len(recs),
    "hosts": pc,
    "devices_per_host": len(devices),
    "model": cfg.model.kind,
    "random_weights": sorted(
      set(nets.random) | ({f"generator ({cfg.model.kind})"} if cfg.model.kind != "puma" else set())
    ),
    "config": fp,
  }
  (workdir / "results.json").write_text(json.dumps(out, indent=1, sort_keys=True))
  (workdir / "results.md").write_text(markdown(out))
  return out


def _fmt(v) -> str:
  return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown(out: dict) -> str:
  protocol, res = out["protocol"], out["metrics"]
  paper = PAPER.get(protocol, {})
  lines = [f"# {protocol}: {out['records']} records, model {out['model']}", ""]
  if out["random_weights"]:
    lines += [
      "Stand-ins built in-process (random weights or the toy generator): "
      f"{', '.join(out['random_weights'])} (the numbers exercise the pipeline; they say "
      "nothing about PUMA).",
      "",
    ]
  lines += ["| metric | ours | paper (PUMA) |", "|---|---|---|"]
  for k in sorted(res):
    lines.append(f"| {k} | {_fmt(res[k])} | {_fmt(paper[k]) if k in paper else ''} |")
  return "\n".join(lines) + "\n"
