"""Frechet distance vs pytorch-fid's own `calculate_frechet_distance` and our copy of its
NumPy/SciPy formula; feature statistics; PSNR."""

import jax
import numpy as np
import pytest
import scipy.linalg

from puma_jax.evaluation import fid, metrics
from tests.public_refs import fid_score


def reference_fid(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """pytorch-fid's `calculate_frechet_distance` (scipy sqrtm, eps offset when singular)."""
  diff = mu1 - mu2
  covmean, _ = scipy.linalg.sqrtm(sigma1.dot(sigma2), disp=False)
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
    covmean = covmean.real
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def features(seed, n, d, shift=0.0):
  rs = np.random.RandomState(seed)
  mix = rs.randn(d, d) / np.sqrt(d)
  return np.maximum(rs.randn(n, d) @ mix + shift, 0).astype(np.float32)  # ReLU-like, as pool3


@pytest.mark.parametrize("n,d", [(500, 64), (300, 128)])
def test_frechet_distance_matches_scipy(n, d):
  fa, fb = features(0, n, d), features(1, n, d, shift=0.3)
  mu1, s1 = fa.mean(0, dtype=np.float64), np.cov(fa, rowvar=False)
  mu2, s2 = fb.mean(0, dtype=np.float64), np.cov(fb, rowvar=False)
  want = reference_fid(mu1, s1, mu2, s2)
  public = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
  assert abs(public - want) <= 1e-12 * abs(want)
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  assert abs(got - public) <= 1e-8 * abs(public) + 1e-10, (got, public)
  assert abs(fid.fid_from_features(fa, fb) - want) <= 1e-8 * abs(want)
  # Same distribution: zero up to round-off; symmetric.
  assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)
  assert abs(fid.frechet_distance(mu2, s2, mu1, s1) - got) <= 1e-8 * abs(got)


def test_rank_deficient_covariances():
  """Fewer samples than dimensions (singular covariances): still the scipy value."""
  fa, fb = features(2, 40, 64), features(3, 40, 64, shift=0.2)
  mu1, s1 = fa.mean(0, dtype=np.float64), np.cov(fa, rowvar=False)
  mu2, s2 = fb.mean(0, dtype=np.float64), np.cov(fb, rowvar=False)
  want = reference_fid(mu1, s1, mu2, s2)
  public = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
  assert abs(public - want) <= 1e-12 * abs(want)
  assert abs(fid.frechet_distance(mu1, s1, mu2, s2) - public) <= 1e-6 * abs(public)


def test_streaming_statistics(tmp_path):
  f = features(4, 257, 32)
  whole = fid.FeatureStats(32).add(f)
  parts = [fid.FeatureStats(32).add(c) for c in np.array_split(f, 5)]
  merged = parts[0]
  for p in parts[1:]:
    merged.merge(p)
  mu, cov = merged.mean_cov()
  np.testing.assert_allclose(mu, f.mean(0, dtype=np.float64), rtol=1e-12)
  np.testing.assert_allclose(cov, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)
  assert merged.n == whole.n == 257
  merged.save(tmp_path / "stats.npz")
  back = fid.FeatureStats.load(tmp_path / "stats.npz")
  assert back.n == 257
  np.testing.assert_array_equal(back.outer, merged.outer)
  with pytest.raises(ValueError, match=r"expected \(batch, 32\)"):
    whole.add(np.zeros((2, 31)))
  with pytest.raises(ValueError, match="at least 2"):
    fid.FeatureStats(32).add(f[:1]).mean_cov()
  with pytest.raises(ValueError, match="dimensions 32 and 8"):
    whole.merge(fid.FeatureStats(8))


def test_psnr_matches_numpy():
  rs = np.random.RandomState(0)
  a = rs.uniform(0, 1, (4, 16, 24, 3)).astype(np.float32)
  b = np.clip(a + 0.05 * rs.randn(*a.shape), 0, 1).astype(np.float32)
  mse = ((a.astype(np.float64) - b) ** 2).reshape(4, -1).mean(1)
  want = 10 * np.log10(1.0 / mse)
  np.testing.assert_allclose(metrics.psnr_checked(a, b), want, rtol=1e-5)
  np.testing.assert_allclose(jax.jit(metrics.psnr)(a, b), want, rtol=1e-5)
  # data_range 255 on uint8-scaled floats gives the same dB.
  np.testing.assert_allclose(
    metrics.psnr_checked(a * 255, b * 255, data_range=255.0), want, rtol=1e-4
  )
  assert np.isinf(np.asarray(metrics.psnr_checked(a, a))).all()
  with pytest.raises(metrics.MetricInputError, match="differ in shape"):
    metrics.psnr_checked(a, b[:, :8])
  with pytest.raises(metrics.MetricInputError, match="divided by 255"):
    metrics.psnr_checked(a * 255, b * 255)
  with pytest.raises(metrics.MetricInputError, match="empty batch"):
    metrics.psnr_checked(a[:0], b[:0])
