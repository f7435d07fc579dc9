"""Canny, crops, resizes, decoding errors, transforms on single examples."""

import io

import numpy as np
import pytest
from PIL import Image

from puma_jax.data import imaging, parse, transforms
from puma_jax.data.schema import BadRecord, Example, Skip
from puma_jax.models import clip


def square_image(n=64, lo=16, hi=48, fg=255, bg=0):
  img = np.full((n, n, 3), bg, np.uint8)
  img[lo:hi, lo:hi] = fg
  return img


def test_canny_square_edges_where_expected():
  img = square_image()
  e = imaging.canny(img)
  assert e.dtype == np.uint8 and set(np.unique(e)) <= {0, 255}
  on = e > 0
  yy, xx = np.mgrid[:64, :64]
  # Distance (Chebyshev) of each pixel to the square's boundary between pixels 15|16 and 47|48.
  inside = (yy >= 16) & (yy < 48) & (xx >= 16) & (xx < 48)
  dist_out = np.maximum(np.maximum(16 - yy, yy - 47), np.maximum(16 - xx, xx - 47))
  dist_in = np.minimum(np.minimum(yy - 15, 48 - yy), np.minimum(xx - 15, 48 - xx))
  dist = np.where(inside, dist_in, dist_out)
  assert on.sum() > 0 and np.all(dist[on] <= 1), "every edge pixel lies on the boundary"
  # Each side is found along its whole straight part, as one thin (1 px) line.
  for r in range(20, 44):
    assert on[r, 14:18].sum() == 1 and on[r, 46:50].sum() == 1
    assert on[14:18, r].sum() == 1 and on[46:50, r].sum() == 1
  assert not on[20:44, 20:44].any() and not on[:12].any() and not on[52:].any()


def test_canny_thresholds_and_flat_images():
  assert not imaging.canny(np.full((32, 32, 3), 77, np.uint8)).any()
  faint = square_image(fg=40, bg=30)  # step of 10: gradient far below the low threshold
  assert not imaging.canny(faint).any()
  assert imaging.canny(faint, low=5, high=10).any()
  # Hysteresis: a weak edge survives only when connected to a strong one.
  img = np.zeros((64, 64), np.uint8)
  img[:, 32:] = 255  # strong vertical edge
  img[10:20, 5:15] = 60  # isolated faint blob
  e = imaging.canny(img, low=100, high=400)
  assert e[:, 30:34].any() and not e[:, :20].any()
  # Equal luma, different colour: found through the strongest channel (OpenCV's colour rule).
  iso = square_image(fg=0, bg=0)
  iso[:] = (76, 76, 76)
  iso[16:48, 16:48] = (255, 0, 0)  # luma of pure red is 76 as well
  assert not imaging.canny(imaging.grayscale(iso)).any()
  assert imaging.canny(iso)[20:44, 14:18].any()
  with pytest.raises(ValueError, match="low threshold"):
    imaging.canny(img, low=10, high=5)


def test_clip_resize_matches_preprocess_pil():
  img = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
  view = imaging.resize(img, 224)
  mine = (view.astype(np.float32) / 255 - np.asarray(clip.CLIP_MEAN, np.float32)) / np.asarray(
    clip.CLIP_STD, np.float32
  )
  np.testing.assert_array_equal(mine[None], clip.preprocess_pil([img]))


def test_decode_truncated_and_garbage():
  img = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  for fmt in ("PNG", "JPEG"):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    data = buf.getvalue()
    assert imaging.decode_image(data).shape == (64, 64, 3)
    with pytest.raises(BadRecord, match="decode_error"):
      imaging.decode_image(data[: len(data) // 2])
  for junk in (b"", b"\x89PNG\r\n\x1a\nxxxx", b"hello world"):
    with pytest.raises(BadRecord, match="decode_error"):
      imaging.decode_image(junk)
  with pytest.raises(BadRecord, match="wrong_type:image"):
    imaging.decode_image("not bytes")


def test_decode_modes_to_rgb():
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[..., 0] = 255  # red, fully transparent: composited on white
  buf = io.BytesIO()
  Image.fromarray(rgba).save(buf, format="PNG")
  np.testing.assert_array_equal(imaging.decode_image(buf.getvalue()), 255)
  buf = io.BytesIO()
  Image.fromarray(np.full((8, 8), 9, np.uint8)).save(buf, format="PNG")
  np.testing.assert_array_equal(imaging.decode_image(buf.getvalue()), 9)


def test_center_crop_reframes_boxes():
  # 100 wide x 50 high: the crop keeps x in [25, 75).
  boxes = np.array([[0.3, 0.2, 0.5, 0.8], [0.0, 0.0, 0.2, 1.0], [0.7, 0.0, 1.0, 1.0]], np.float32)
  out, keep = imaging.crop_boxes(boxes, 50, 100, imaging.center_crop_box(50, 100))
  np.testing.assert_allclose(out[0], [0.1, 0.2, 0.5, 0.8], atol=1e-6)
  assert keep.tolist() == [True, False, True]
  np.testing.assert_allclose(out[2], [0.9, 0.0, 1.0, 1.0], atol=1e-6)


def test_preprocess_views_boxes_and_filter():
  img = np.random.default_rng(2).integers(0, 256, (50, 100, 3), dtype=np.uint8)
  ex = Example(
    "grounding",
    key="k",
    images=(img,),
    text="a b",
    boxes=np.array([[0.0, 0.0, 0.2, 1.0], [0.3, 0.2, 0.5, 0.8]], np.float32),
    phrases=((0, 1), (2, 3)),
  ).validate()
  pre = transforms.Preprocess(
    transforms.ImageOptions(clip_size=32, vae_size=16), tokenize=lambda s: list(s.encode())
  )
  out = pre(ex)
  assert out.images[0].shape == (32, 32, 3) and out.vae_images[0].shape == (16, 16, 3)
  np.testing.assert_array_equal(out.images[0], imaging.resize(img[:, 25:75], 32))
  assert out.phrases == ((2, 3),) and out.boxes.shape == (1, 4)
  assert out.token_ids == {"text": [97, 32, 98]}
  small = transforms.Preprocess(transforms.ImageOptions(clip_size=32, min_resolution=64))(ex)
  assert isinstance(small, Skip) and small.reason == "too_small"
  only_left = Example(
    "grounding",
    key="k",
    images=(img,),
    text="a",
    boxes=np.array([[0.0, 0.0, 0.2, 1.0]], np.float32),
    phrases=((0, 1),),
  )
  assert pre(only_left).reason == "boxes_cropped_out"


@pytest.mark.parametrize("cond", ["canny", "inpaint", "colorize"])
def test_conditional_pairs(cond):
  img = square_image(n=48, lo=12, hi=36)
  img[..., 1] = 0  # magenta square: grayscale differs from the colour image
  p = parse.Parser("conditional", "s", parse.ParseOptions(cond_types=(cond,)))
  ex = p({"key": "a", "image": img, "caption": "square"})
  assert ex.kind == "conditional" and ex.cond_type == cond
  condition, target = ex.images
  np.testing.assert_array_equal(target, img)
  if cond == "canny":
    np.testing.assert_array_equal(condition[..., 0], imaging.canny(img))
  elif cond == "colorize":
    assert np.all(condition[..., 0] == condition[..., 2]) and not np.array_equal(condition, img)
  else:
    assert 0 < ex.mask.mean() < 1
    np.testing.assert_array_equal(condition[ex.mask == 0], img[ex.mask == 0])
    assert np.all(condition[ex.mask == 1] == 0)
    again = p({"key": "a", "image": img, "caption": "square"})
    np.testing.assert_array_equal(again.mask, ex.mask)  # deterministic per key
  out = transforms.Preprocess(transforms.ImageOptions(clip_size=24))(ex)
  assert out.images[0].shape == (24, 24, 3)
  if cond == "inpaint":
    assert out.mask.shape == (24, 24)


def test_quantize_boxes():
  q = transforms.quantize_boxes(np.array([[0.0, 0.5, 0.999, 1.0]]), 224)
  assert q.tolist() == [[0, 112, 223, 223]]
