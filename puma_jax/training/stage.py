"""What a training stage supplies to the loop (`loop.train_and_evaluate`).

A stage is a class `Stage(config, workdir)` registered in `training.registry.STAGES`; one
module per stage holds its model setup and its step (`mllm.py`, `decoder.py`, `vae.py`). The
loop owns everything shared: mesh, sharded init and restore (`init.py`), the jitted step,
checkpoints, logging. The members below are all the loop and `init` use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import ml_collections
import optax
from flax import nnx

from puma_jax.training.steps import TrainState

# step(state, frozen, rest, global batch) -> (new state, metrics): pure, jitted by the loop.
StepFn = Callable[[TrainState, Any, Any, dict], tuple[TrainState, dict]]


class DataIterator(Protocol):
  """Host batches (dicts of NumPy arrays, `data.batch_size` rows) with a checkpointable state."""

  def __iter__(self) -> Iterator[dict]: ...

  def __next__(self) -> dict: ...

  def get_state(self) -> dict:
    """The iterator's position (saved with every checkpoint)."""

  def set_state(self, state: dict) -> None:
    """Continue from a position `get_state` returned (resume)."""

  def metrics(self) -> dict[str, float]:
    """Counters logged with the training metrics (records read, skipped, ...)."""


class Stage(Protocol):
  """One training stage."""

  config: ml_collections.ConfigDict
  """The run's config (fields documented in configs/)."""

  workdir: Path | None
  """Constructor argument: where the stage writes its own outputs (e.g. sample images);
  None when nothing is written (memory planning, step tests)."""

  progress_keys: tuple[str, ...]
  """Summary keys printed on the progress line next to the loss."""

  frozen: nnx.filterlib.Filter
  """The parameters that get no gradient and no optimizer state (CLIP, VAE)."""

  loads_pretrained: bool
  """True when `load_pretrained` reads weights from disk (init then runs on the host)."""

  dtype: Any
  """The compute dtype, `precision.resolve(config.precision)`; parameters stay float32."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: Path | None = None): ...

  def build(self, rngs: nnx.Rngs) -> nnx.Module:
    """The whole model (trainable and frozen parts), randomly initialized."""

  def load_pretrained(self, model: nnx.Module) -> None:
    """Copies the converted weights named in `config.init` into `model` (a fresh run)."""

  def meta(self) -> dict:
    """JSON description of the model, saved with checkpoints; resuming requires it equal."""

  def optimizer(self, params) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """(tx, {lr group: schedule}) for the trainable parameters `params` (a pure dict)."""

  def train_data(self) -> DataIterator:
    """This host's training batches."""

  # Optional: `check_frozen(frozen)`, called with the run's frozen parameters (fresh or
  # restored) before the first step; raises when they do not fit the stage's inputs (the
  # decoder's latent cache, made with other weights).

  def device_arrays(self, host_batch: dict) -> dict:
    """The host batch's arrays the step reads (host-only fields dropped)."""

  def train_step(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation) -> StepFn:
    """The pure train step (see `StepFn`); its metrics hold `loss`, `grad_norm`, `finite`."""

  def summarize(self, summed: dict, n_steps: int) -> dict[str, float]:
    """Readable scalars from the step metrics summed over `n_steps` steps (has "loss")."""

  def flops_per_token(self) -> float | None:
    """Training FLOPs per real token (`perf.flops_per_token`), or None where the stage's work is
    not counted in tokens (the decoder reports images/s)."""

  def throughput(self, global_batch: int, steps_per_s: float) -> dict[str, float]:
    """Stage-specific throughput scalars (e.g. images/s). Real tokens/s, TFLOP/s and MFU come
    from the loop (`perf.ThroughputWindow`) when `flops_per_token()` is not None and the
    stage's steps report `real_tokens`."""

  def evaluate(
    self, graphdef: nnx.GraphDef, state: TrainState, frozen, rest, mesh
  ) -> dict[str, float]:
    """Held-out scalars at `train.eval_every` steps (logged with an "eval/" prefix)."""
