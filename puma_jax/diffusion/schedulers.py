"""DDPM, DDIM, Euler-discrete and DPM-Solver++ (2M) schedulers as pure JAX functions on arrays.

A scheduler object (`DDPM`, `DDIM`, `EulerDiscrete`, `DPMSolverMultistep`) is a frozen, hashable
dataclass holding only its static `SchedulerConfig`, so it can be closed over or passed as a
static argument to `jit`.
`set_timesteps(n)` returns a `Schedule` (a pytree of arrays, built once on the host in numpy);
`step(schedule, i, model_output, sample, noise)` is pure: the step index `i` may be a traced
integer (a `lax.fori_loop` counter) and the stochastic part of a step is an explicit `noise`
input, so nothing is mutated between steps and the whole loop can be jitted. A multistep
scheduler (`multistep = True`) also takes the previous step's `pred_original_sample` as
`prev_x0`: that is all the history DPM-Solver++ (2M) needs.

Numerics follow diffusers (0.42) step by step, including its quirks (DDIM's previous timestep is
always `t - num_train_timesteps // n`, whatever the spacing; DDPM adds its tiny clamped variance
at every `t > 0`), so each step equals diffusers' `step` on the same inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """diffusers' scheduler fields (names as in `scheduler_config.json`). Defaults: SDXL base."""

  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"
  trained_betas: tuple[float, ...] | None = None
  prediction_type: str = "epsilon"
  timestep_spacing: str = "leading"
  steps_offset: int = 1
  clip_sample: bool = False
  clip_sample_range: float = 1.0
  set_alpha_to_one: bool = False  # DDIM: alpha_prod at the step after t = 0
  variance_type: str = "fixed_small"  # DDPM
  interpolation_type: str = "linear"  # Euler: sigma interpolation
  rescale_betas_zero_snr: bool = False

  def __post_init__(self):
    for field, value, allowed in (
      ("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
      ("timestep_spacing", self.timestep_spacing, SPACINGS),
      ("prediction_type", self.prediction_type, PREDICTION_TYPES),
      ("variance_type", self.variance_type, VARIANCE_TYPES),
      ("interpolation_type", self.interpolation_type, ("linear",)),
    ):
      if value not in allowed:
        raise ValueError(
          f"SchedulerConfig: unsupported {field}={value!r}; supported: {list(allowed)}"
        )
    if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
      raise ValueError(
        f"SchedulerConfig: trained_betas has {len(self.trained_betas)} entries, "
        f"num_train_timesteps={self.num_train_timesteps}"
      )
    if self.num_train_timesteps < 2:
      raise ValueError("SchedulerConfig: num_train_timesteps must be >= 2")


# Keys of diffusers scheduler configs that do not affect these schedulers (other scheduler
# classes' options, or bookkeeping).
# DPM-Solver's `lower_order_final` and `euler_at_final` only choose the order of the last step,
# which is first order anyway for a second-order solver ending at sigma 0 (final_sigmas_type
# "zero"); `flow_shift` and `time_shift_type` only act with flow sigmas / dynamic shifting.
_IGNORED_KEYS = {
  "skip_prk_steps",
  "sample_max_value",
  "dynamic_thresholding_ratio",
  "sigma_min",
  "sigma_max",
  "clip_sample_range",
  "lower_order_final",
  "euler_at_final",
  "flow_shift",
  "time_shift_type",
}
# Keys that change the computation in ways not implemented: the accepted value of each.
_REQUIRED = {
  "thresholding": False,
  "use_karras_sigmas": False,
  "timestep_type": "discrete",
  "final_sigmas_type": "zero",
  "use_exponential_sigmas": False,
  "use_beta_sigmas": False,
  "use_lu_lambdas": False,
  "use_flow_sigmas": False,
  "use_dynamic_shifting": False,
  "algorithm_type": "dpmsolver++",
  "solver_order": 2,
  "solver_type": "midpoint",
  "lambda_min_clipped": -float("inf"),
}


def from_diffusers_config(d: dict[str, Any]) -> SchedulerConfig:
  """A `SchedulerConfig` from a diffusers `scheduler_config.json` dict (any of DDPM, DDIM, Euler,
  DPMSolverMultistep, e.g. SDXL's, which names EulerDiscreteScheduler). Unsupported values raise
  naming the key."""
  fields = {f.name for f in dataclasses.fields(SchedulerConfig)}
  kw = {}
  for k, v in d.items():
    if k.startswith("_") or (k in _IGNORED_KEYS and k not in fields):
      continue
    if k in _REQUIRED:
      if v is not None and v != _REQUIRED[k]:
        raise ValueError(f"scheduler config: {k}={v!r} is not supported (only {_REQUIRED[k]!r})")
      continue
    if k not in fields:
      raise ValueError(f"scheduler config: unknown key {k!r}")
    if k == "trained_betas" and v is not None:
      v = tuple(float(b) for b in v)
    if v is not None:
      kw[k] = v
  return SchedulerConfig(**kw)


def to_dict(cfg: SchedulerConfig) -> dict[str, Any]:
  """`cfg` as a JSON-able dict of its fields (diffusers' names; `from_diffusers_config` reads it
  back): what a decoder dir records as the schedule it was trained with."""
  d = dataclasses.asdict(cfg)
  if d["trained_betas"] is not None:
    d["trained_betas"] = list(d["trained_betas"])
  return d


# The fields that define the noise levels and the meaning of the model's output: a decoder must
# be sampled with the values it was trained with. The others (timestep spacing, offset,
# clipping, DDPM's variance, ...) only choose how a sampler walks those levels.
TRAINED_FIELDS = (
  "num_train_timesteps",
  "beta_start",
  "beta_end",
  "beta_schedule",
  "trained_betas",
  "prediction_type",
  "rescale_betas_zero_snr",
)


def trained_mismatch(trained: SchedulerConfig, given: SchedulerConfig) -> list[str]:
  """The `TRAINED_FIELDS` where `given` differs from `trained`, as "field: trained -> given"."""
  return [
    f"{k}: {getattr(trained, k)!r} -> {getattr(given, k)!r}"
    for k in TRAINED_FIELDS
    if getattr(trained, k) != getattr(given, k)
  ]


# ----------------------------------------------------------------------------------------------
# Noise schedule (host-side numpy, float32 like diffusers' torch tensors)


def _alpha_bar_cosine(t):
  return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2


def betas(cfg: SchedulerConfig) -> np.ndarray:
  n = cfg.num_train_timesteps
  if cfg.trained_betas is not None:
    b = np.asarray(cfg.trained_betas, np.float32)
  elif cfg.beta_schedule == "linear":
    b = np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float64).astype(np.float32)
  elif cfg.beta_schedule == "scaled_linear":
    b = (
      np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=np.float64).astype(np.float32)
      ** 2
    )
  else:  # squaredcos_cap_v2
    i = np.arange(n, dtype=np.float64)
    b = np.minimum(1 - _alpha_bar_cosine((i + 1) / n) / _alpha_bar_cosine(i / n), 0.999)
    b = b.astype(np.float32)
  if cfg.rescale_betas_zero_snr:
    b = _rescale_zero_terminal_snr(b)
  return b


def _rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
  """Lin et al. 2023, Algorithm 1: shift/scale sqrt(alpha_bar) so the last step has SNR 0."""
  ab_sqrt = np.sqrt(np.cumprod(1.0 - b, dtype=np.float32))
  a0, at = ab_sqrt[0].copy(), ab_sqrt[-1].copy()
  ab_sqrt = (ab_sqrt - at) * (a0 / (a0 - at))
  ab = ab_sqrt**2
  alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
  return (1 - alphas).astype(np.float32)


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
  """Cumulative product of (1 - beta), accumulated in float32 as diffusers does."""
  return np.cumprod(1.0 - betas(cfg), dtype=np.float32)


def _sigma_alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
  """`alphas_cumprod` for the sigma-parameterized samplers (Euler, DPM-Solver): as diffusers, a
  zero-terminal-SNR schedule's last entry becomes 2^-24, as its sigma would be infinite."""
  ac = alphas_cumprod(cfg)
  if cfg.rescale_betas_zero_snr:
    ac = ac.copy()
    ac[-1] = 2.0**-24
  return ac


def inference_timesteps(
  cfg: SchedulerConfig, num_steps: int, *, round_linspace: bool = True
) -> np.ndarray:
  """The n timesteps of a sampling run, descending, per `timestep_spacing` (int64; with
  `round_linspace=False`, as Euler does, "linspace" gives unrounded float32 timesteps)."""
  T = cfg.num_train_timesteps
  if not 1 <= num_steps <= T:
    raise ValueError(f"num_inference_steps={num_steps} must be in [1, {T}] (num_train_timesteps)")
  if cfg.timestep_spacing == "linspace":
    if not round_linspace:
      return np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1].copy()
    return np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
  if cfg.timestep_spacing == "leading":
    ratio = T // num_steps
    return (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + cfg.steps_offset
  ratio = T / num_steps
  return np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1


def _bcast(x, like):
  """A per-batch (B,) or scalar coefficient broadcast against a (B, ...) sample."""
  x = jnp.asarray(x, jnp.float32)
  return x.reshape(x.shape + (1,) * (like.ndim - x.ndim)) if x.ndim else x


# ----------------------------------------------------------------------------------------------
# Training-time forward process (shared by all three; the noise tables are the same)


def add_noise(
  cfg: SchedulerConfig, x0: jax.Array, noise: jax.Array, timesteps: jax.Array
) -> jax.Array:
  """q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise, timesteps (B,) ints (diffusers'
  `add_noise`)."""
  ac = jnp.asarray(alphas_cumprod(cfg))[timesteps]
  return _bcast(ac**0.5, x0) * x0 + _bcast((1 - ac) ** 0.5, x0) * noise


def velocity(
  cfg: SchedulerConfig, x0: jax.Array, noise: jax.Array, timesteps: jax.Array
) -> jax.Array:
  """The v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) x0 (diffusers' `get_velocity`)."""
  ac = jnp.asarray(alphas_cumprod(cfg))[timesteps]
  return _bcast(ac**0.5, x0) * noise - _bcast((1 - ac) ** 0.5, x0) * x0


def offset_noise(key: jax.Array, shape, noise_offset: float = 0.0, dtype=jnp.float32):
  """N(0, 1) noise plus `noise_offset` x a per-sample, per-channel constant (NHWC: the offset is
  drawn with shape (B, 1, 1, C)), the "offset noise" of SDXL-style training (PUMA: 0.1)."""
  k1, k2 = jax.random.split(key)
  noise = jax.random.normal(k1, shape, dtype)
  if noise_offset:
    off_shape = (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)
    noise = noise + noise_offset * jax.random.normal(k2, off_shape, dtype)
  return noise


class TrainingSample(NamedTuple):
  noisy: jax.Array
  timesteps: jax.Array
  noise: jax.Array
  target: jax.Array  # what the model should predict, per prediction_type


def q_sample(
  cfg: SchedulerConfig,
  key: jax.Array,
  x0: jax.Array,
  *,
  noise_offset: float = 0.0,
  timesteps: jax.Array | None = None,
) -> TrainingSample:
  """One training draw: uniform timesteps in [0, T) (unless given), offset noise, the noisy
  latents and the regression target for `cfg.prediction_type`."""
  kt, kn = jax.random.split(key)
  if timesteps is None:
    timesteps = jax.random.randint(kt, (x0.shape[0],), 0, cfg.num_train_timesteps)
  noise = offset_noise(kn, x0.shape, noise_offset, x0.dtype)
  noisy = add_noise(cfg, x0, noise, timesteps)
  if cfg.prediction_type == "epsilon":
    target = noise
  elif cfg.prediction_type == "v_prediction":
    target = velocity(cfg, x0, noise, timesteps)
  else:
    target = x0
  return TrainingSample(noisy.astype(x0.dtype), timesteps, noise, target.astype(x0.dtype))


# ----------------------------------------------------------------------------------------------
# Sampling


class StepOutput(NamedTuple):
  prev_sample: jax.Array
  pred_original_sample: jax.Array


class Schedule(NamedTuple):
  """Per-step arrays of one sampling run; `timesteps[i]` is what the model is given at step i."""

  timesteps: jax.Array
  alpha_prod: jax.Array  # DDPM/DDIM: alphas_cumprod[t_i]
  alpha_prod_prev: jax.Array  # DDPM/DDIM: at the previous timestep (or the final value)
  sigmas: jax.Array  # Euler: (n + 1,) sigmas, last 0; DDPM/DDIM: unused zeros

  @property
  def num_steps(self) -> int:
    return self.timesteps.shape[0]


def _pred_x0_eps(cfg, model_output, sample, a_t):
  """(predicted x0, predicted epsilon) from a model output, per prediction type."""
  b_t = 1 - a_t
  if cfg.prediction_type == "epsilon":
    x0 = (sample - b_t**0.5 * model_output) / a_t**0.5
    eps = model_output
  elif cfg.prediction_type == "v_prediction":
    x0 = a_t**0.5 * sample - b_t**0.5 * model_output
    eps = a_t**0.5 * model_output + b_t**0.5 * sample
  else:
    x0 = model_output
    eps = (sample - a_t**0.5 * x0) / b_t**0.5
  if cfg.clip_sample:
    x0 = jnp.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
  return x0, eps


@dataclasses.dataclass(frozen=True)
class _Base:
  config: SchedulerConfig = SchedulerConfig()

  stochastic = False  # whether `step` consumes its `noise` argument
  multistep = False  # whether `step` takes the previous step's x0 prediction as `prev_x0`

  def init_noise_sigma(self, schedule: Schedule) -> jax.Array:
    del schedule
    return jnp.float32(1.0)

  def scale_model_input(self, schedule: Schedule, i, sample: jax.Array) -> jax.Array:
    del schedule, i
    return sample

  def add_noise(self, x0, noise, timesteps):
    return add_noise(self.config, x0, noise, timesteps)


@dataclasses.dataclass(frozen=True)
class DDPM(_Base):
  """Ancestral DDPM sampling (diffusers `DDPMScheduler`); PUMA's decoder sampler."""

  stochastic = True

  def set_timesteps(self, num_steps: int) -> Schedule:
    ts = inference_timesteps(self.config, num_steps)
    ac = alphas_cumprod(self.config)
    # diffusers' previous timestep is the next entry of the schedule; after the last one, 1.
    prev = np.concatenate([ts[1:], [-1]])
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], np.float32(1.0)).astype(np.float32)
    return Schedule(
      jnp.asarray(ts, jnp.int32),
      jnp.asarray(ac[ts]),
      jnp.asarray(a_prev),
      jnp.zeros((num_steps + 1,), jnp.float32),
    )

  def step(self, schedule: Schedule, i, model_output, sample, noise=None) -> StepOutput:
    """x_{t-1} = mean + std * noise; `noise` ~ N(0, 1) shaped like `sample` (None: no noise)."""
    a_t, a_prev = schedule.alpha_prod[i], schedule.alpha_prod_prev[i]
    b_t, b_prev = 1 - a_t, 1 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1 - cur_alpha
    x0, _ = _pred_x0_eps(self.config, model_output, sample, a_t)
    mean = (a_prev**0.5 * cur_beta) / b_t * x0 + cur_alpha**0.5 * b_prev / b_t * sample
    if noise is None:
      return StepOutput(mean, x0)
    var = jnp.maximum(b_prev / b_t * cur_beta, 1e-20)
    vt = self.config.variance_type
    std = (
      cur_beta**0.5
      if vt == "fixed_large"
      else (jnp.exp(0.5 * jnp.log(var)) if vt == "fixed_small_log" else var**0.5)
    )
    std = jnp.where(schedule.timesteps[i] > 0, std, 0.0)
    return StepOutput(mean + std * noise.astype(mean.dtype), x0)


@dataclasses.dataclass(frozen=True)
class DDIM(_Base):
  """DDIM (diffusers `DDIMScheduler`); eta = 0 is deterministic."""

  eta: float = 0.0

  @property
  def stochastic(self) -> bool:  # type: ignore[override]
    return self.eta > 0

  def set_timesteps(self, num_steps: int) -> Schedule:
    cfg = self.config
    ts = inference_timesteps(cfg, num_steps)
    ac = alphas_cumprod(cfg)
    final = np.float32(1.0) if cfg.set_alpha_to_one else ac[0]
    prev = ts - cfg.num_train_timesteps // num_steps
    a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final).astype(np.float32)
    return Schedule(
      jnp.asarray(ts, jnp.int32),
      jnp.asarray(ac[ts]),
      jnp.asarray(a_prev),
      jnp.zeros((num_steps + 1,), jnp.float32),
    )

  def step(self, schedule: Schedule, i, model_output, sample, noise=None) -> StepOutput:
    a_t, a_prev = schedule.alpha_prod[i], schedule.alpha_prod_prev[i]
    x0, eps = _pred_x0_eps(self.config, model_output, sample, a_t)
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = self.eta * var**0.5
    prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    if self.eta > 0:
      if noise is None:
        raise ValueError("DDIM with eta > 0 needs `noise` (variance noise shaped like sample)")
      prev = prev + std * noise.astype(prev.dtype)
    return StepOutput(prev, x0)


@dataclasses.dataclass(frozen=True)
class EulerDiscrete(_Base):
  """Euler method on the sigma (VE) parameterization (diffusers `EulerDiscreteScheduler`,
  s_churn = 0, linear sigma interpolation); SDXL's default scheduler."""

  def set_timesteps(self, num_steps: int) -> Schedule:
    ts = inference_timesteps(self.config, num_steps, round_linspace=False).astype(np.float32)
    ac = _sigma_alphas_cumprod(self.config)
    train_sigmas = ((1 - ac) / ac) ** 0.5
    sigmas = np.interp(ts, np.arange(len(train_sigmas)), train_sigmas)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    z = jnp.zeros((num_steps,), jnp.float32)
    return Schedule(jnp.asarray(ts), z, z, jnp.asarray(sigmas))

  def init_noise_sigma(self, schedule: Schedule) -> jax.Array:
    m = jnp.max(schedule.sigmas)
    if self.config.timestep_spacing in ("linspace", "trailing"):
      return m
    return (m**2 + 1) ** 0.5

  def scale_model_input(self, schedule: Schedule, i, sample):
    return sample / ((schedule.sigmas[i] ** 2 + 1) ** 0.5)

  def step(self, schedule: Schedule, i, model_output, sample, noise=None) -> StepOutput:
    del noise
    sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
    p = self.config.prediction_type
    if p == "epsilon":
      x0 = sample - sigma * model_output
    elif p == "v_prediction":
      x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    else:
      x0 = model_output
    derivative = (sample - x0) / sigma
    return StepOutput(sample + derivative * (sigma_next - sigma), x0)


def dpm_timesteps(cfg: SchedulerConfig, num_steps: int) -> np.ndarray:
  """DPMSolverMultistepScheduler's n timesteps: "trailing" as the others, but "leading" and
  "linspace" space n + 1 points over [0, T) and drop the last one (t = 0), so e.g. SDXL's
  leading 20 steps run 941, 894, ..., 48 where DDPM's would run 951, ..., 1."""
  T = cfg.num_train_timesteps
  if not 1 <= num_steps <= T:
    raise ValueError(f"num_inference_steps={num_steps} must be in [1, {T}] (num_train_timesteps)")
  if cfg.timestep_spacing == "linspace":
    return np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
  if cfg.timestep_spacing == "leading":
    ratio = T // (num_steps + 1)
    ts = (np.arange(num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
    return ts + cfg.steps_offset
  return inference_timesteps(cfg, num_steps)


def _alpha_sigma(sigma):
  """VP (alpha_t, sigma_t) of a VE sigma: alpha_t = 1 / sqrt(sigma^2 + 1)."""
  alpha = 1 / ((sigma**2 + 1) ** 0.5)
  return alpha, sigma * alpha


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistep(_Base):
  """DPM-Solver++ (2M), midpoint form (diffusers `DPMSolverMultistepScheduler` with
  algorithm_type "dpmsolver++", solver_order 2, final sigma 0), deterministic. The first step
  has no history and the last one lands on sigma = 0, so both are first order (DDIM-like);
  every other step extrapolates from the current and previous data predictions (`prev_x0`).
  `clip_sample` does not apply (diffusers has no such option for this scheduler)."""

  multistep = True

  def set_timesteps(self, num_steps: int) -> Schedule:
    ts = dpm_timesteps(self.config, num_steps)
    ac = _sigma_alphas_cumprod(self.config)
    train_sigmas = ((1 - ac) / ac) ** 0.5
    sigmas = np.interp(ts, np.arange(len(train_sigmas)), train_sigmas)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    z = jnp.zeros((num_steps,), jnp.float32)
    return Schedule(jnp.asarray(ts, jnp.int32), z, z, jnp.asarray(sigmas))

  def _data_prediction(self, model_output, sample, sigma):
    p = self.config.prediction_type
    if p == "sample":
      return model_output
    alpha_t, sigma_t = _alpha_sigma(sigma)
    if p == "epsilon":
      return (sample - sigma_t * model_output) / alpha_t
    return alpha_t * sample - sigma_t * model_output  # v_prediction

  def step(
    self, schedule: Schedule, i, model_output, sample, noise=None, prev_x0=None
  ) -> StepOutput:
    """One step from sigmas[i] to sigmas[i + 1]; `prev_x0` is the previous step's
    `pred_original_sample` (ignored at the first and last steps; None: first order)."""
    del noise
    n = schedule.num_steps
    sigmas = schedule.sigmas
    alpha_t, sigma_t = _alpha_sigma(sigmas[i + 1])
    alpha_s0, sigma_s0 = _alpha_sigma(sigmas[i])
    alpha_s1, sigma_s1 = _alpha_sigma(sigmas[jnp.maximum(i - 1, 0)])
    # At the last step sigma_t = 0: lambda_t = +inf, exp(-h) = 0, and the update returns x0.
    lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)
    lambda_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0)
    lambda_s1 = jnp.log(alpha_s1) - jnp.log(sigma_s1)
    x0 = self._data_prediction(model_output, sample, sigmas[i])
    h = lambda_t - lambda_s0
    phi = alpha_t * (jnp.exp(-h) - 1.0)
    first = (sigma_t / sigma_s0) * sample - phi * x0
    if prev_x0 is None:
      return StepOutput(first, x0)
    second_order = (i > 0) & (i < n - 1)
    # r0 is 0 or nan where the second-order branch is not taken; keep that branch finite.
    r0 = jnp.where(second_order, (lambda_s0 - lambda_s1) / h, 1.0)
    d1 = (1.0 / r0) * (x0 - prev_x0)
    second = first - 0.5 * phi * d1
    return StepOutput(jnp.where(second_order, second, first), x0)


SCHEDULERS = {"ddpm": DDPM, "ddim": DDIM, "euler": EulerDiscrete, "dpmpp": DPMSolverMultistep}


def make(name: str, config: SchedulerConfig | None = None, **kw):
  if name not in SCHEDULERS:
    raise ValueError(f"unknown scheduler {name!r}; known: {sorted(SCHEDULERS)}")
  return SCHEDULERS[name](config or SchedulerConfig(), **kw)
