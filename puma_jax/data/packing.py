"""First-fit packing of variable-length examples into fixed rows: a grain stage.

grain 0.2.18 ships `grain.experimental.FirstFitPackIterDataset`, but it does not fit our rows:
it packs each feature into its own buffer and numbers segments per feature, so the image slots
would need a second pass to re-base `image_index` onto the row's image list, and it cannot carry
the pipeline's `Skip` markers, which must reach the counting stage in order. This stage decides
only *which* examples share a row (first fit over `num_bins` open rows, grain's algorithm); the
row itself is built by the packer (for MLLM rows, `sequence.pack` through
`data.rows.RowPacker`), so there is one row layout in the package.

A packer has `capacity` (a tuple of budgets, e.g. (positions, image slots)), `size(item)` (the
item's use of each budget) and `row(items)` (the packed row).

Checkpointing follows grain's packers: the state is the parent's state before the first example
of the current group of rows plus how many outputs of the group were already emitted; restoring
re-reads the group (deterministic) and drops those outputs, so a restored iterator continues
exactly mid-epoch.
"""

from __future__ import annotations

import grain

from puma_jax.data.schema import Skip


# Skips collected while rows are open before the group is emitted anyway (partly filled rows).
MAX_SKIPS_PER_GROUP = 16


class FirstFitPackDataset(grain.IterDataset):
  def __init__(self, parent: grain.IterDataset, packer, num_bins: int):
    super().__init__(parent)
    if num_bins < 1:
      raise ValueError(f"data.pack_bins={num_bins} must be >= 1")
    self.packer, self.num_bins = packer, num_bins

  def __iter__(self) -> FirstFitPackIterator:
    return FirstFitPackIterator(self._parent.__iter__(), self.packer, self.num_bins)

  def __str__(self):
    return f"FirstFitPackDataset(num_bins={self.num_bins})"


class FirstFitPackIterator(grain.DatasetIterator):
  def __init__(self, parent, packer, num_bins: int):
    super().__init__(parent)
    self.packer, self.num_bins = packer, num_bins
    self._reset(self._parent.get_state())

  def _reset(self, group_start):
    self._group_start = group_start  # parent state before the current group's first item
    self._out = None  # outputs of the current group (Skips first, then rows)
    self._emitted = 0
    self._pending = None  # the item that did not fit: the next group's first
    self._next_start = None

  def _fill(self) -> None:
    cap = tuple(self.packer.capacity)
    bins, used, skips = [], [], []
    item, self._pending = self._pending, None
    while True:
      if item is None:
        before = self._parent.get_state()
        try:
          item = next(self._parent)
        except StopIteration:
          if not bins and not skips:
            raise
          self._next_start = None
          break
      if isinstance(item, Skip):
        skips.append(item)
        item = None
        if not bins or len(skips) >= MAX_SKIPS_PER_GROUP:
          # Bad records leave now, not once rows fill: a source of nothing but bad records
          # must reach the counting stage's consecutive-skip limit instead of stalling here.
          self._next_start = self._parent.get_state()
          break
        continue
      size = tuple(self.packer.size(item))
      if any(s > c for s, c in zip(size, cap)):
        # The encoder checks this first; a packer that lets one through must not stall here.
        skips.append(
          Skip(
            "pack:too_large",
            getattr(item, "source", ""),
            getattr(item, "key", ""),
            f"size {size} > row capacity {cap}",
          )
        )
        item = None
        if not bins or len(skips) >= MAX_SKIPS_PER_GROUP:
          self._next_start = self._parent.get_state()
          break
        continue
      for b, u in enumerate(used):
        if all(x + s <= c for x, s, c in zip(u, size, cap)):
          bins[b].append(item)
          used[b] = tuple(x + s for x, s in zip(u, size))
          break
      else:
        if len(bins) == self.num_bins:
          self._pending, self._next_start = item, before
          break
        bins.append([item])
        used.append(size)
      item = None
    self._out = skips + [self.packer.row(b) for b in bins]
    self._emitted = 0

  def __next__(self):
    if self._out is None:
      self._fill()
    out = self._out[self._emitted]
    self._emitted += 1
    if self._emitted == len(self._out):
      pending, start = self._pending, self._next_start
      if start is None:  # the parent is exhausted: the next call ends the epoch
        self._reset(self._parent.get_state())
      else:
        self._reset(start)
        self._pending, self._next_start = pending, None
    return out

  def get_state(self) -> dict:
    return {"parent": self._group_start, "emitted": self._emitted}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._reset(state["parent"])
    emitted = int(state["emitted"])
    if emitted:
      self._fill()
      for _ in range(emitted):
        next(self)
