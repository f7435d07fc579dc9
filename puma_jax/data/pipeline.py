"""From a `data` config to an iterator of batches: read, shard, shuffle, parse, mix, transform,
count skips, batch.

    ds = pipeline.build(cfg.data, tokenize=tok.encode)
    it = iter(ds)
    batch = next(it)                 # dict of stacked arrays (ArrayEncoder) or list of Examples
    state = it.get_state()           # JSON-serializable; save it with the training checkpoint
    it.set_state(state)              # a fresh iterator continues exactly where it stopped
    it.metrics()                     # {"data/examples": ..., "data/skipped/<reason>": ...}

Order of operations, and why:
  * every source is sharded by record index (host h of N reads records h, h+N, ...) *before*
    shuffling, so hosts never overlap and together cover the data, whatever the seed;
  * each shard is shuffled with a fresh permutation per epoch and repeated, then parsed;
  * sources are mixed by weight (grain's deterministic weighted mix of infinite datasets);
  * bad records travel as `Skip` markers to the last stage, which runs in the main process:
    its counters are exact with any number of worker processes and are part of the state;
  * training rows of an encoder that can pack (`data.rows.MLLMEncoder`) are packed first
    fit, several examples per row (`data.pack`, `data.packing`), in the main process after the
    workers; evaluation splits stay one example per row.
"""

from __future__ import annotations

import collections
import zlib
from collections.abc import Callable

import grain
import grain.python as gp
import numpy as np
from absl import logging

from puma_jax.data import packing, parse, sources, synthetic, transforms
from puma_jax.data.schema import EXAMPLE_KINDS, Example, Skip


class DataError(RuntimeError):
  """The data cannot feed a run (e.g. every record of a source is bad)."""


def _family(scfg) -> str:
  return scfg.family


def parse_options(dcfg, scfg) -> parse.ParseOptions:
  cond = tuple(c for c in str(dcfg.conditional.cond_types).split(",") if c)
  return parse.ParseOptions(
    seed=int(dcfg.seed),
    i2t_fraction=float(dcfg.text.i2t_fraction),
    cond_types=cond,
    canny_low=float(dcfg.conditional.canny_low),
    canny_high=float(dcfg.conditional.canny_high),
    derive_short_side=max(
      int(dcfg.image.clip_size), int(dcfg.image.vae_size), int(dcfg.image.min_resolution)
    ),
    box_format=str(scfg.get("box_format", "normalized")),
    max_file_bytes=int(dcfg.max_file_bytes),
    max_text_chars=int(dcfg.text.max_chars),
  )


def image_options(dcfg) -> transforms.ImageOptions:
  i = dcfg.image
  return transforms.ImageOptions(
    int(i.clip_size), int(i.vae_size), int(i.min_resolution), bool(i.center_crop)
  )


def open_source(name: str, scfg, dcfg, split: str = "train"):
  """The random-access reader a source config names (errors name the config field)."""
  fmt = scfg.format
  fields = dict(scfg.get("fields", {}) or {})
  root = scfg.get("image_root", "")
  if fmt == "synthetic":
    s = dcfg.synthetic
    return synthetic.SyntheticSource(
      scfg.family,
      split,
      seed=int(dcfg.seed),
      image_size=int(s.image_size),
      num_train=int(s.num_train),
      num_eval=int(s.num_eval),
    )
  if fmt == "tfds":
    if not scfg.tfds_name:
      raise ValueError(f"data.sources.{name}.tfds_name is empty")
    return sources.TfdsSource(
      scfg.tfds_name, scfg.tfds_split, scfg.tfds_data_dir or None, fields, root
    )
  readers = {
    "webdataset": sources.WebDatasetSource,
    "parquet": sources.ParquetSource,
    "jsonl": sources.JsonlSource,
    "json": sources.JsonListSource,
    "arrayrecord": sources.ArrayRecordSource,
  }
  if fmt not in readers:
    raise ValueError(
      f"data.sources.{name}.format {fmt!r}; choose from {('synthetic', 'tfds', *readers)}"
    )
  if not scfg.paths:
    raise ValueError(f"data.sources.{name}.paths is empty: point it at the {fmt} files")
  return readers[fmt](scfg.paths, fields, root)


def _stable_seed(seed: int, name: str) -> int:
  return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def source_dataset(
  name: str,
  scfg,
  dcfg,
  split: str = "train",
  host_index: int = 0,
  host_count: int = 1,
  reader=None,
  decode=None,
) -> grain.MapDataset:
  """One source: sharded by host, shuffled per epoch, repeated, parsed (Example or Skip).
  `decode` replaces the parser (records that are already encoded: see `build`)."""
  if not 0 <= host_index < host_count:
    raise ValueError(f"host_index {host_index} outside 0..{host_count - 1}")
  reader = reader if reader is not None else open_source(name, scfg, dcfg, split)
  ds = grain.MapDataset.source(_NoneSafe(reader))
  if host_count > 1:
    ds = ds[host_index::host_count]
  if len(ds) == 0:
    raise ValueError(f"data source {name!r} has no records for host {host_index}/{host_count}")
  if dcfg.shuffle:
    ds = ds.shuffle(seed=_stable_seed(dcfg.seed, name))
  epochs = int(dcfg.num_epochs)
  ds = ds.repeat(None if epochs < 0 else epochs)
  return ds.map(decode or parse.Parser(_family(scfg), name, parse_options(dcfg, scfg)))


def active_sources(dcfg) -> dict:
  out = {name: s for name, s in dcfg.sources.items() if float(s.weight) > 0}
  if not out:
    raise ValueError("data.sources: no source with weight > 0")
  return out


def build(
  dcfg,
  *,
  split: str = "train",
  tokenize: Callable[[str], list] | None = None,
  encode: str | Callable | None = "arrays",
  host_index: int | None = None,
  host_count: int | None = None,
  readers: dict | None = None,
  decode: Callable[[str], Callable] | None = None,
) -> CountingBatchDataset:
  """The whole pipeline. `encode`: "arrays" (transforms.ArrayEncoder, fixed-shape batches), a
  callable Example -> dict of arrays (e.g. the MLLM sequence builder), or None (batches are
  lists of preprocessed Examples). Hosts default to jax.process_index() / process_count().
  With `data.pack` on the "train" split and an `encode` that has `packer()` (the MLLM
  encoder), examples are packed first fit into rows (`data.packing`, `data.pack_bins` open
  rows); other splits, and encoders that cannot pack, give one example per row.
  `readers` maps source names to ready random-access readers (anything with len and
  getitem), replacing what the config would open (tests, in-memory data).
  `decode(source name)` gives a map from a raw record to the finished row (a dict of arrays)
  or a `Skip`, replacing parsing, preprocessing and `encode`: for records that are already
  encoded examples (the decoder stage's latent cache, `training.latent_cache`); sharding,
  shuffling, mixing, skip counting and batching stay as they are."""
  if host_index is None or host_count is None:
    import jax

    host_index, host_count = jax.process_index(), jax.process_count()
  srcs = active_sources(dcfg)
  readers = readers or {}
  parts = [
    source_dataset(n, s, dcfg, split, host_index, host_count, readers.get(n), decode and decode(n))
    for n, s in srcs.items()
  ]
  weights = [float(s.weight) for s in srcs.values()]
  if len(parts) == 1:
    ds = parts[0]
  elif int(dcfg.num_epochs) < 0:
    ds = grain.MapDataset.mix(parts, weights)
  else:
    # A weighted mix of finite datasets stops at the first exhausted one; a finite pass (eval,
    # validation) wants every record once, so weights do not apply there. Interleaved, not
    # concatenated: an evaluation reads only its first batches, which must hold every source
    # (concatenated, they held only the alphabetically first one).
    ds = grain.MapDataset.source(Interleave(parts))
  img = image_options(dcfg)
  if decode is not None:
    encode = None  # the records are rows already
  else:
    ds = ds.map(transforms.Preprocess(img, tokenize))
  if encode == "arrays":
    encode = transforms.ArrayEncoder(
      img, int(dcfg.max_images), int(dcfg.text.max_len), int(dcfg.max_boxes)
    )
  packer = None
  if split == "train" and bool(dcfg.get("pack", False)) and hasattr(encode, "packer"):
    packer = encode.packer()
    encode = packer.encode
  if encode is not None:
    ds = ds.map(_SkipSafe(encode))
  it = ds.to_iter_dataset(
    gp.ReadOptions(num_threads=int(dcfg.num_threads), prefetch_buffer_size=int(dcfg.prefetch))
  )
  if int(dcfg.num_workers) > 0:
    from absl import flags

    if not flags.FLAGS.is_parsed():
      # grain's workers read absl flags; outside an absl app (tests, notebooks) they are not
      # parsed yet, and grain's documented remedy is to mark them parsed with defaults.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(gp.MultiprocessingOptions(num_workers=int(dcfg.num_workers)))
  if packer is not None:
    it = packing.FirstFitPackDataset(it, packer, int(dcfg.pack_bins))
  return CountingBatchDataset(
    it, int(dcfg.batch_size), bool(dcfg.drop_remainder), int(dcfg.max_consecutive_skips)
  )


class Interleave:
  """Random-access round robin over finite datasets: record 0 of each, then record 1 of each,
  ...; a dataset that runs out drops out of the rotation. Every record exactly once."""

  def __init__(self, parts):
    self.parts = list(parts)
    lens = [len(p) for p in self.parts]
    # index -> (part, record), built once: lengths are the sources' record counts (eval splits:
    # hundreds), so the table is small
    self._index = [(j, i) for i in range(max(lens, default=0)) for j, n in enumerate(lens) if i < n]

  def __len__(self):
    return len(self._index)

  def __getitem__(self, k):
    j, i = self._index[k]
    return self.parts[j][i]


class _NoneSafe:
  """grain treats a None element as filtered out and drops it uncounted: turn it into an
  error record so it is skipped *and* counted like any other bad record."""

  def __init__(self, reader):
    self.reader = reader

  def __len__(self):
    return len(self.reader)

  def __getitem__(self, i):
    rec = self.reader[i]
    return {"__error__": "empty_record", "key": str(i)} if rec is None else rec


class _SkipSafe:
  """Applies a user encoder to Examples only; its data errors become counted skips."""

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, ex):
    if isinstance(ex, Skip):
      return ex
    try:
      return self.fn(ex)
    except (ValueError, TypeError, KeyError, IndexError) as e:
      return Skip(f"encode:{type(e).__name__}", ex.source, ex.key, str(e)[:300])


def _kind_name(item) -> str:
  if isinstance(item, Example):
    return item.kind
  if isinstance(item, dict) and ("kind" in item or "kind_id" in item):
    # MLLM rows carry the kind per position (`kind_id`, -1 on padding): the first position's
    t = int(np.asarray(item["kind"] if "kind" in item else item["kind_id"]).flat[0])
    return EXAMPLE_KINDS[t] if 0 <= t < len(EXAMPLE_KINDS) else "other"
  return "other"


def stack(items: list):
  if isinstance(items[0], dict):
    return {k: np.stack([it[k] for it in items]) for k in items[0]}
  return list(items)


class CountingBatchDataset(grain.IterDataset):
  """Drops `Skip` markers (counting them by reason and source) and batches the rest."""

  def __init__(
    self,
    parent: grain.IterDataset,
    batch_size: int,
    drop_remainder: bool = True,
    max_consecutive_skips: int = 10_000,
  ):
    super().__init__(parent)
    self.batch_size, self.drop_remainder = batch_size, drop_remainder
    self.max_consecutive_skips = max_consecutive_skips

  def __iter__(self) -> CountingBatchIterator:
    return CountingBatchIterator(self._parent.__iter__(), self)

  def __str__(self):
    return f"CountingBatchDataset(batch_size={self.batch_size})"


class CountingBatchIterator(grain.DatasetIterator):
  def __init__(self, parent, ds: CountingBatchDataset):
    super().__init__(parent)
    self._ds = ds
    self.examples = 0
    self.rows = 0  # items that are packed rows
    self.real_positions = 0  # positions of rows holding an example
    self.positions = 0
    self.per_task = collections.Counter()  # example kind -> examples kept
    self.skipped = collections.Counter()  # reason -> count
    self.skipped_by_source = collections.Counter()  # source -> count
    self.recent = collections.deque(maxlen=32)  # last Skip markers, for debugging
    self._warned = set()

  def _take(self):
    streak = 0
    while True:
      item = next(self._parent)  # StopIteration ends the epoch
      if not isinstance(item, Skip):
        n = 1
        if isinstance(item, dict) and "segment_ids" in item:
          # sequence.pack numbers a row's examples 1..n, 0 = padding
          seg = np.asarray(item["segment_ids"])
          n = int(seg.max(initial=0))
          self.rows += 1
          self.real_positions += int(np.count_nonzero(seg))
          self.positions += seg.size
        self.examples += n
        if n > 1 and "kind_id" in item:
          # a packed row: each example's own kind (at its first position), not the row's first
          seg, kind = np.asarray(item["segment_ids"]), np.asarray(item["kind_id"])
          for k in range(1, n + 1):
            t = int(kind[np.argmax(seg == k)])
            self.per_task[EXAMPLE_KINDS[t] if 0 <= t < len(EXAMPLE_KINDS) else "other"] += 1
        else:
          self.per_task[_kind_name(item)] += n
        return item
      self.skipped[item.reason] += 1
      self.skipped_by_source[item.source] += 1
      self.recent.append(item)
      if item.reason not in self._warned:
        self._warned.add(item.reason)
        logging.warning(
          "data: skipping bad record %s/%s (%s) %s", item.source, item.key, item.reason, item.detail
        )
      streak += 1
      if streak >= self._ds.max_consecutive_skips:
        raise DataError(
          f"data: {streak} bad records in a row, the data or its config is broken. "
          f"Skips so far: {dict(self.skipped)}; last: {item}"
        )

  def __next__(self):
    if self._ds.batch_size <= 0:
      return self._take()
    items = []
    try:
      while len(items) < self._ds.batch_size:
        items.append(self._take())
    except StopIteration:
      if not items or self._ds.drop_remainder:
        raise
    return stack(items)

  def get_state(self) -> dict:
    return {
      "parent": self._parent.get_state(),
      "examples": self.examples,
      "rows": self.rows,
      "real_positions": self.real_positions,
      "positions": self.positions,
      "per_task": dict(self.per_task),
      "skipped": dict(self.skipped),
      "skipped_by_source": dict(self.skipped_by_source),
    }

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self.examples = int(state["examples"])
    self.rows = int(state.get("rows", 0))
    self.real_positions = int(state.get("real_positions", 0))
    self.positions = int(state.get("positions", 0))
    self.per_task = collections.Counter(state.get("per_task", {}))
    self.skipped = collections.Counter(state["skipped"])
    self.skipped_by_source = collections.Counter(state["skipped_by_source"])

  def metrics(self) -> dict[str, float]:
    """Counters for the training metrics: examples kept (in all and per example kind; metric
    names `data/task/<kind>`), skipped (in all and per reason); for sequence rows the fraction
    of positions holding an example (the rest is padding) and examples per row. Cumulative
    since the start of the run (restored with the state)."""
    out = {"data/examples": self.examples, "data/skipped": sum(self.skipped.values())}
    if self.rows:
      out["data/real_token_fraction"] = self.real_positions / max(self.positions, 1)
      out["data/examples_per_row"] = self.examples / self.rows
    out.update({f"data/task/{t}": n for t, n in sorted(self.per_task.items())})
    out.update({f"data/skipped/{r}": n for r, n in sorted(self.skipped.items())})
    return out


def encoded_source(name: str, scfg, dcfg, encode: Callable, split: str = "train"):
  """Source `name` in record order, one item per record: `encode`'s row, or the `Skip` the
  training pipeline would count for it (one pass, unshuffled, one host). What a cache of
  encoded examples is written from (`training.latent_cache`)."""
  cfg = dcfg.copy_and_resolve_references()
  cfg.num_epochs, cfg.shuffle = 1, False
  ds = source_dataset(name, scfg, cfg, split)
  return ds.map(transforms.Preprocess(image_options(cfg))).map(_SkipSafe(encode))


def iterate_examples(
  dcfg, split: str = "train", tokenize=None, host_index: int = 0, host_count: int = 1
):
  """One finite, unshuffled pass over every active source yielding Examples (for tools)."""
  cfg = dcfg.copy_and_resolve_references()
  cfg.num_epochs, cfg.shuffle, cfg.batch_size, cfg.num_workers = 1, False, 0, 0
  return iter(
    build(
      cfg, split=split, tokenize=tokenize, encode=None, host_index=host_index, host_count=host_count
    )
  )


__all__ = [
  "build",
  "source_dataset",
  "open_source",
  "iterate_examples",
  "Example",
  "CountingBatchDataset",
  "DataError",
]
