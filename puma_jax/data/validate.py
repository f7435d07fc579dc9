"""Report what a data config holds and what it would skip, before a run starts.

  python -m puma_jax.data.validate                                   # built-in synthetic set
  python -m puma_jax.data.validate --config=configs/pretrain.py      # a training config (.data)
  python -m puma_jax.data.validate --config=puma_jax/data/config.py:pretrain \
      --config.sources.pairs.paths='/data/cc3m/*.tar' --limit=1000 --json=report.json

For every source with weight > 0: records read, examples kept per kind (and per derived
condition), skips per reason with example keys, image short-side statistics. Exit status 1 when
a source yields no usable example or skips more than --max_skip_fraction of what it read; 2
when a source cannot be opened (its path matches no file, a file is truncated or unreadable).
"""

from __future__ import annotations

import collections
import json
import sys

import numpy as np
from absl import flags
from ml_collections import config_flags

from puma_jax import cli
from puma_jax.data import parse, pipeline, transforms
from puma_jax.data.schema import Skip


def _define_flags():
  """CLI flags, defined only when run as a program: importing this module (tests, the
  training entry point) must not add flags to the importer's absl namespace."""
  global _CONFIG, _LIMIT, _SPLIT, _JSON, _MAX_SKIP
  _CONFIG = config_flags.DEFINE_config_file(
    "config", "puma_jax/data/config.py:synthetic", "A data config, or a training config with .data"
  )
  _LIMIT = flags.DEFINE_integer("limit", 0, "Records read per source (0: all).")
  _SPLIT = flags.DEFINE_string("split", "train", "Split (synthetic / tfds sources).")
  _JSON = flags.DEFINE_string("json", "", "Also write the report here.")
  _MAX_SKIP = flags.DEFINE_float("max_skip_fraction", 0.5, "Fail above this skip fraction.")


def validate_source(name: str, scfg, dcfg, limit: int = 0, split: str = "train") -> dict:
  reader = pipeline.open_source(name, scfg, dcfg, split)
  parser = parse.Parser(scfg.family, name, pipeline.parse_options(dcfg, scfg))
  prep = transforms.Preprocess(pipeline.image_options(dcfg))
  kinds, conds, reasons = collections.Counter(), collections.Counter(), collections.Counter()
  examples = collections.defaultdict(list)
  shorts = []
  n = len(reader) if not limit else min(limit, len(reader))
  for i in range(n):
    ex = parser(reader[i])
    if not isinstance(ex, Skip):
      shorts.extend(min(im.shape[:2]) for im in ex.images)
      ex = prep(ex)
    if isinstance(ex, Skip):
      reasons[ex.reason] += 1
      if len(examples[ex.reason]) < 3:
        examples[ex.reason].append(f"{ex.key} {ex.detail}".strip()[:160])
      continue
    kinds[ex.kind] += 1
    if ex.cond_type:
      conds[ex.cond_type] += 1
  report = {
    "source": name,
    "format": scfg.format,
    "family": scfg.family,
    "weight": float(scfg.weight),
    "records": len(reader),
    "read": n,
    "kept": sum(kinds.values()),
    "kinds": dict(kinds),
    "skipped": dict(reasons),
    "skip_examples": dict(examples),
  }
  if conds:
    report["conditions"] = dict(conds)
  if getattr(reader, "broken_shards", None):
    report["broken_shards"] = reader.broken_shards
  if shorts:
    s = np.asarray(shorts)
    report["image_short_side"] = {
      "min": int(s.min()),
      "median": int(np.median(s)),
      "max": int(s.max()),
    }
  return report


def validate(dcfg, limit: int = 0, split: str = "train", max_skip_fraction: float = 0.5):
  """Returns (reports, problems); problems is a list of sentences, empty when all is well."""
  reports, problems = [], []
  for name, scfg in pipeline.active_sources(dcfg).items():
    try:
      r = validate_source(name, scfg, dcfg, limit, split)
    except (OSError, ValueError) as e:
      reports.append({"source": name, "error": str(e)})
      problems.append(f"{name}: cannot open: {e}")
      continue
    reports.append(r)
    if r["kept"] == 0:
      problems.append(f"{name}: no usable example in {r['read']} record(s)")
    elif r["read"] and 1 - r["kept"] / r["read"] > max_skip_fraction:
      problems.append(f"{name}: skips {1 - r['kept'] / r['read']:.0%} of its records")
  return reports, problems


def format_report(reports, problems) -> str:
  lines = []
  for r in reports:
    if "error" in r:
      lines.append(f"[{r['source']}] ERROR {r['error']}")
      continue
    lines.append(
      f"[{r['source']}] {r['format']}/{r['family']} weight {r['weight']:g}: "
      f"{r['records']} records, read {r['read']}, kept {r['kept']}"
    )
    lines.append(
      f"  kinds: {r['kinds']}" + (f"  conditions: {r['conditions']}" if "conditions" in r else "")
    )
    if "image_short_side" in r:
      lines.append(f"  image short side: {r['image_short_side']}")
    for reason, count in sorted(r["skipped"].items(), key=lambda kv: -kv[1]):
      lines.append(f"  would skip {count} x {reason}: e.g. {r['skip_examples'][reason][0]}")
    for shard, err in r.get("broken_shards", {}).items():
      lines.append(f"  broken shard {shard}: {err}")
  lines += [f"PROBLEM: {p}" for p in problems] or ["OK"]
  return "\n".join(lines)


def main(argv):
  cfg = _CONFIG.value
  dcfg = cfg.data if "data" in cfg else cfg
  reports, problems = validate(dcfg, _LIMIT.value, _SPLIT.value, _MAX_SKIP.value)
  print(format_report(reports, problems))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"sources": reports, "problems": problems}, f, indent=2)
  # A source that cannot be opened (missing, unreadable, truncated file) is bad input: 2.
  return 2 if any("error" in r for r in reports) else 1 if problems else 0


if __name__ == "__main__":
  _define_flags()
  sys.exit(cli.run(main, doc=__doc__, expected=(ValueError, OSError)))
