"""CLIP vision encoder configs (PUMA's frozen image encoder).

Variants (`--config=configs/clip.py:VARIANT`):
  tiny      toy width, 32x32 images with 2x2 patches: the same 16x16 patch grid as ViT-L/14@224,
            so the five scales have PUMA's token counts (256, 64, 16, 4, 1).
  vit_l14   openai/clip-vit-large-patch14 (303,179,776 parameters).

Run:
  python -m puma_jax.features --config=configs/clip.py:tiny
  python -m puma_jax.features --config=configs/clip.py:vit_l14 --config.checkpoint=CONVERTED_DIR \
      --image=photo.jpg
"""

import ml_collections

from puma_jax.models import clip


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  variants = {"tiny": clip.tiny, "vit_l14": clip.vit_l14}
  if arg not in variants:
    raise ValueError(f"configs/clip.py: unknown variant {arg!r}; choose from {sorted(variants)}")
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(variants[arg]().to_dict())  # CLIPVisionConfig fields
  c.checkpoint = ""  # converted clip-vision directory; empty: random weights (seeded)
  c.seed = 0  # initialization seed when no checkpoint is given
  c.dtype = "float32"  # compute dtype: float32 or bfloat16
  c.batch_size = 2  # images per forward pass in feature extraction
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # -1: the rest
  return c
