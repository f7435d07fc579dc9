"""Image decoding, cropping, resizing and the conditions derived from images (numpy + PIL).

Canny is implemented here (Gaussian blur, Sobel, non-maximum suppression, hysteresis) so the
project needs no OpenCV; hysteresis uses `scipy.ndimage.label` for the connected components.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from puma_jax.data.schema import BadRecord

_DECODE_ERRORS = (
  OSError,
  ValueError,
  SyntaxError,
  EOFError,
  TypeError,
  IndexError,
  Image.DecompressionBombError,
)


def decode_image(data: bytes) -> np.ndarray:
  """Encoded bytes -> uint8 HWC RGB. Truncated or corrupt data raises BadRecord('decode_error').

  `load()` is forced here: PIL's `open` only reads the header, so truncation would otherwise
  surface later, inside a transform, as a confusing error.
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise BadRecord("wrong_type:image", f"image bytes are {type(data).__name__}")
  if len(data) == 0:
    raise BadRecord("decode_error", "empty image bytes")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(bytes(data))) as img:
        img.load()
        return pil_to_rgb(img)
  except Image.DecompressionBombWarning as e:
    raise BadRecord("image_too_large", str(e)) from None
  except _DECODE_ERRORS as e:
    raise BadRecord("decode_error", f"{type(e).__name__}: {e}") from None


def to_8bit(img: Image.Image) -> Image.Image:
  """High-bit-depth single-channel images (16-bit PNG "I;16*" / "I", float "F") -> 8-bit "L",
  scaled over their value range. PIL's own `convert` clips them to 0..255 instead, so a 16-bit
  photograph becomes nearly all white: only values 0 and 255 would survive.

  "I" is taken as 16-bit (what PIL decodes 16-bit grayscale PNG and TIFF into); "F" as [0, 1]
  when its values lie there, else as 0..255. Other modes are returned unchanged.
  """
  if img.mode.startswith("I;16") or img.mode == "I":
    a = np.asarray(img).astype(np.float64)
    return Image.fromarray(np.round(np.clip(a, 0, 65535) / 257.0).astype(np.uint8), "L")
  if img.mode == "F":
    a = np.nan_to_num(np.asarray(img, np.float64))
    scale = 255.0 if a.size and a.min() >= 0.0 and a.max() <= 1.0 else 1.0
    return Image.fromarray(np.round(np.clip(a * scale, 0, 255)).astype(np.uint8), "L")
  return img


def pil_to_rgb(img: Image.Image) -> np.ndarray:
  img = to_8bit(img)
  if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
    # Composite on white: transparent pixels otherwise come out as arbitrary stored colours.
    img = img.convert("RGBA")
    bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
    img = Image.alpha_composite(bg, img)
  arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
  if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
    raise BadRecord("empty_image", f"decoded shape {arr.shape}")
  return arr


def as_rgb_array(value) -> np.ndarray:
  """Accept an already-decoded array (HW, HW1, HW3, HW4; uint8) and return uint8 HW3."""
  arr = np.asarray(value)
  if arr.dtype != np.uint8:
    raise BadRecord("wrong_type:image", f"array image dtype {arr.dtype}, expected uint8")
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
    raise BadRecord("wrong_type:image", f"array image shape {arr.shape}")
  if arr.shape[-1] == 1:
    arr = np.repeat(arr, 3, axis=-1)
  return np.ascontiguousarray(arr[..., :3])


def encode_png(img: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Geometry


def center_crop_box(h: int, w: int) -> tuple[int, int, int, int]:
  """The largest centred square: (top, left, size, size)."""
  s = min(h, w)
  return (h - s) // 2, (w - s) // 2, s, s


def center_crop(img: np.ndarray) -> np.ndarray:
  top, left, s, _ = center_crop_box(*img.shape[:2])
  return img[top : top + s, left : left + s]


def crop_boxes(boxes: np.ndarray, h: int, w: int, crop: tuple[int, int, int, int]):
  """Re-express normalized boxes of an (h, w) image in the frame of `crop`.

  Returns (boxes, keep): boxes clipped to the crop; `keep` marks those that still have area.
  """
  top, left, ch, cw = crop
  px = boxes * np.array([w, h, w, h], np.float32)
  px = px - np.array([left, top, left, top], np.float32)
  px = np.clip(px, 0, np.array([cw, ch, cw, ch], np.float32))
  out = px / np.array([cw, ch, cw, ch], np.float32)
  keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
  return out.astype(np.float32), keep


def resize(img: np.ndarray, size: int | tuple[int, int], resample=Image.BILINEAR) -> np.ndarray:
  """PIL resize of a uint8 image to (size, size) or (h, w).

  Bilinear on uint8 through PIL is exactly the resize inside `models.clip.preprocess_pil`, so
  normalizing this output reproduces the public PUMA encoder transform bit for bit.
  """
  h, w = (size, size) if isinstance(size, int) else size
  if img.shape[:2] == (h, w):
    return img
  squeeze = img.ndim == 2
  pil = Image.fromarray(img)
  out = np.asarray(pil.resize((w, h), resample), dtype=np.uint8)
  return out if squeeze or out.ndim == 3 else out[..., None]


# ---------------------------------------------------------------------------------------------
# Conditions for conditional generation


def grayscale(img: np.ndarray) -> np.ndarray:
  """ITU-R 601 luma (PIL's "L"), replicated to 3 channels: the colorization condition."""
  luma = np.asarray(Image.fromarray(img).convert("L"))
  return np.repeat(luma[..., None], 3, axis=-1)


def inpaint_mask(
  h: int,
  w: int,
  rng: np.random.Generator,
  min_frac: float = 0.1,
  max_frac: float = 0.5,
  max_rects: int = 3,
) -> np.ndarray:
  """1-`max_rects` random rectangles covering roughly [min_frac, max_frac] of the image."""
  mask = np.zeros((h, w), np.uint8)
  target = rng.uniform(min_frac, max_frac)
  n = int(rng.integers(1, max_rects + 1))
  for _ in range(n):
    area = target * h * w / n  # rectangles may overlap, so the union is at most `target`
    aspect = np.exp(rng.uniform(-0.7, 0.7))
    rh = int(np.clip(np.sqrt(area / aspect), 1, h))
    rw = int(np.clip(np.sqrt(area * aspect), 1, w))
    top = int(rng.integers(0, h - rh + 1))
    left = int(rng.integers(0, w - rw + 1))
    mask[top : top + rh, left : left + rw] = 1
  return mask


def apply_mask(img: np.ndarray, mask: np.ndarray, fill: int = 0) -> np.ndarray:
  out = img.copy()
  out[mask.astype(bool)] = fill
  return out


def _gaussian_kernel(sigma: float) -> np.ndarray:
  radius = max(1, int(round(3 * sigma)))
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  return (k / k.sum()).astype(np.float32)


def _convolve_separable(x: np.ndarray, k: np.ndarray) -> np.ndarray:
  """Separable convolution over the first two axes (any trailing channel axes)."""
  r = len(k) // 2
  rest = [(0, 0)] * (x.ndim - 2)
  p = np.pad(x, [(r, r), (0, 0), *rest], mode="reflect")
  x = sum(k[i] * p[i : i + x.shape[0]] for i in range(len(k)))
  p = np.pad(x, [(0, 0), (r, r), *rest], mode="reflect")
  return sum(k[i] * p[:, i : i + x.shape[1]] for i in range(len(k)))


def canny(
  img: np.ndarray, low: float = 100.0, high: float = 200.0, sigma: float = 1.0
) -> np.ndarray:
  """Canny edges of a uint8 image (HW or HWC) -> uint8 (H, W), 255 on edges, 0 elsewhere.

  Thresholds apply to the L2 Sobel gradient magnitude (0..255 pixel scale) after a Gaussian blur;
  for colour images each pixel uses its strongest channel. Same scale as OpenCV's thresholds
  with `L2gradient=True`, which ControlNet-style canny conditions use with 100 / 200.
  """
  from scipy import ndimage

  if low > high:
    raise ValueError(f"canny: low threshold {low} > high threshold {high}")
  x = img.astype(np.float32)
  x = x[..., None] if x.ndim == 2 else x
  if sigma > 0:
    x = _convolve_separable(x, _gaussian_kernel(sigma))
  p = np.pad(x, [(1, 1), (1, 1), (0, 0)], mode="reflect")
  # Sobel: gx = [1 2 1]^T (x) [-1 0 1], gy its transpose.
  gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
  gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
  # Colour images: per pixel, the channel with the strongest gradient (as OpenCV's Canny does
  # for 3-channel input), so edges between colours of equal luma are still found.
  best = np.argmax(gx * gx + gy * gy, axis=-1)[..., None]
  gx = np.take_along_axis(gx, best, -1)[..., 0]
  gy = np.take_along_axis(gy, best, -1)[..., 0]
  mag = np.hypot(gx, gy)
  h, w = mag.shape
  # Non-maximum suppression, evaluated only at pixels above the low threshold (the only ones
  # that can become edges; usually a small fraction). The gradient direction is quantized to
  # 0 / 45 / 90 / 135 degrees by comparing |gx| and |gy| (tan 22.5 = 0.4142), and a pixel is kept
  # only if it is a local maximum along it, which thins edges to one pixel.
  ys, xs = np.nonzero(mag >= low)
  m = mag[ys, xs]
  ax, ay = np.abs(gx[ys, xs]), np.abs(gy[ys, xs])
  t = np.tan(np.deg2rad(22.5))
  horizontal = ay <= t * ax  # gradient along x: compare left/right
  vertical = ax < t * ay  # gradient along y: compare up/down
  same_sign = gx[ys, xs] * gy[ys, xs] > 0  # 45 degrees (y grows downwards): down-right
  dy = np.where(horizontal, 0, 1)
  dx = np.where(horizontal, 1, np.where(vertical, 0, np.where(same_sign, 1, -1)))
  mp = np.pad(mag, 1, mode="constant")
  n1 = mp[1 + ys + dy, 1 + xs + dx]
  n2 = mp[1 + ys - dy, 1 + xs - dx]
  # >= on one side, > on the other: a plateau two pixels wide keeps exactly one of them.
  keep_px = (m >= n1) & (m > n2) & (m > 0)
  weak = np.zeros((h, w), bool)
  weak[ys[keep_px], xs[keep_px]] = True
  strong = weak & (mag >= high)
  # Hysteresis: keep weak pixels 8-connected to a strong one.
  labels, n = ndimage.label(weak, structure=np.ones((3, 3), bool))
  if n == 0:
    return np.zeros((h, w), np.uint8)
  keep = np.zeros(n + 1, bool)
  keep[np.unique(labels[strong])] = True
  keep[0] = False
  return (keep[labels] * 255).astype(np.uint8)


def canny_condition(
  img: np.ndarray, low: float = 100.0, high: float = 200.0, sigma: float = 1.0
) -> np.ndarray:
  edges = canny(img, low, high, sigma)
  return np.repeat(edges[..., None], 3, axis=-1)
