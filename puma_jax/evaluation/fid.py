"""FID: pool3 features of the FID Inception-v3 and the Frechet distance of their Gaussians.

features   `inception_features(model, images)`: NHWC images in [0, 1], any size, resized to
           299x299 with bilinear interpolation (no antialiasing, half-pixel centers: torch's
           `F.interpolate(mode='bilinear', align_corners=False)`, as pytorch-fid does), mapped
           to [-1, 1], -> (B, 2048) float32.
statistics `FeatureStats`: streaming count / sum / sum of outer products in float64, mergeable
           across shards and hosts and savable (an interrupted run resumes from its partial
           sums); `mean_cov()` gives (mu, sigma) with `np.cov`'s unbiased normalization.
distance   `frechet_distance(mu1, s1, mu2, s2)` = |mu1 - mu2|^2 + tr(s1 + s2 - 2 sqrt(s1 s2)).
           The trace of the matrix square root is computed from eigenvalues of the symmetric
           PSD matrix sqrt(s1) s2 sqrt(s1), which has the same spectrum as s1 s2: no complex
           round-off and no `sqrtm` iteration. It matches the scipy.linalg.sqrtm formula of
           pytorch-fid (tests/test_fid.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from puma_jax.evaluation.metrics import check_images, load_weights

FID_SIZE = 299


def inception_features(model, images: jax.Array) -> jax.Array:
  b, h, w, c = images.shape
  size = model.config.image_size
  x = images.astype(jnp.float32)
  if (h, w) != (size, size):
    x = jax.image.resize(x, (b, size, size, c), "bilinear", antialias=False)
  return model(2.0 * x - 1.0)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = (
    np.atleast_2d(np.asarray(sigma1, np.float64)),
    np.atleast_2d(np.asarray(sigma2, np.float64)),
  )
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
    raise ValueError(
      f"frechet_distance: shapes mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 "
      f"{mu2.shape}, sigma2 {s2.shape} do not describe two Gaussians of one "
      "dimension"
    )
  r1 = _psd_sqrt(s1)
  m = r1 @ s2 @ r1
  tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


class FeatureStats:
  """Streaming first and second moments of feature vectors (float64)."""

  def __init__(self, dim: int):
    self.dim = dim
    self.n = 0
    self.sum = np.zeros(dim, np.float64)
    self.outer = np.zeros((dim, dim), np.float64)

  def add(self, feats) -> FeatureStats:
    f = np.asarray(feats, np.float64)
    if f.ndim != 2 or f.shape[1] != self.dim:
      raise ValueError(f"FeatureStats.add: expected (batch, {self.dim}) features; got {f.shape}")
    self.n += f.shape[0]
    self.sum += f.sum(0)
    self.outer += f.T @ f
    return self

  def merge(self, other: FeatureStats) -> FeatureStats:
    if other.dim != self.dim:
      raise ValueError(f"FeatureStats.merge: dimensions {self.dim} and {other.dim} differ")
    self.n += other.n
    self.sum += other.sum
    self.outer += other.outer
    return self

  def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
    if self.n < 2:
      raise ValueError(f"FID needs at least 2 feature vectors per side; have {self.n}")
    mu = self.sum / self.n
    cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
    return mu, cov

  def save(self, path: str | os.PathLike) -> None:
    tmp = Path(str(path) + ".tmp.npz")
    np.savez(tmp, n=self.n, sum=self.sum, outer=self.outer)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str | os.PathLike) -> FeatureStats:
    with np.load(path) as z:
      out = cls(int(z["sum"].shape[0]))
      out.n, out.sum, out.outer = int(z["n"]), z["sum"].copy(), z["outer"].copy()
    return out


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
  return frechet_distance(*a.mean_cov(), *b.mean_cov())


def fid_from_features(feats_a, feats_b) -> float:
  fa, fb = np.asarray(feats_a), np.asarray(feats_b)
  a = FeatureStats(fa.shape[-1]).add(fa)
  b = FeatureStats(fb.shape[-1]).add(fb)
  return fid_from_stats(a, b)


class InceptionFeatures:
  """`InceptionFeatures.load(dir)(images)` -> pool3 features (B, 2048) of [0, 1] images."""

  family = "inception"

  def __init__(self, model):
    from flax import nnx

    self.model = model
    graphdef, self.state = nnx.split(model)
    self._fn = jax.jit(lambda state, x: inception_features(nnx.merge(graphdef, state), x))

  @classmethod
  def load(cls, path, mesh=None):
    return cls(load_weights(path, cls.family, "FID", mesh=mesh))

  def __call__(self, images) -> jax.Array:
    check_images(images)
    return self._fn(self.state, jnp.asarray(images))
