"""VAE training (the latent space the decoders denoise in; docs/DESIGN.md §5).

PUMA uses the pretrained SDXL VAE, frozen (PUMA paper, appendix 7.1); this stage trains one
where none is available: the tiny demo on the built-in synthetic set.

Variants (`--config=configs/vae.py:VARIANT`):
  tiny  (default) the toy VAE (`vae.tiny_config()`: 2x downsampling, 4 latent channels) on the
        synthetic set at 32 px; a few minutes on a 2-core CPU.
  demo  the demo's VAE (`demo_vae_config`: the tiny layout at 16/32 channels) for the tiny-PUMA
        demo (puma_jax/tools/train_demo.py), 1800 steps of 16 images; its latent scaling factor
        is the one configs/decoder.py:demo_f* trains with.

Run:
  python -m puma_jax.main --config=configs/vae.py:demo --workdir=/tmp/puma_vae
Then its VAE as a module dir for the decoders' --config.init.vae:
  python -c "from puma_jax import export; export.save_module_dir('/tmp/puma_vae', '/tmp/vae')"
"""

import ml_collections

from puma_jax import config_lib
from puma_jax.data import config as data_config
from puma_jax.models import vae

# 1 / the std of the demo VAE's latent means on held-out synthetic images (`eval/latent_std`
# 2.39 at the end of a configs/vae.py:demo run), so that the decoders' scaled latents are about
# unit-scale, as SDXL's 0.13025 makes its latents (docs/DESIGN.md §5).
DEMO_SCALING_FACTOR = 0.42
# (ours) optimizer steps of the demo VAE. The VAE learns the backgrounds and the shapes' places
# first and their hues last: on 27 held-out single-shape scenes its reconstructions showed the
# shape's colour (synthetic_checks.check_single) in 33% after 600 steps (held-out PSNR 26.7 dB;
# green and cyan came back gray, red brown), 81% after 1200 (31.8 dB), 96% after 1800 (34.2 dB).
# Every decoder draws through this VAE, so its colour is their ceiling (docs/DESIGN.md §5).
DEMO_STEPS = 1800


def demo_vae_config() -> vae.VAEConfig:
  """The demo's VAE: `vae.tiny_config()`'s layout (2x downsampling, 4 latent channels) at twice
  its width, 16/32 channels (8/16 plateaued at 24.4 dB held-out PSNR in the demo's 600 steps,
  16/32 reached 26.3), with the demo's latent scaling factor."""
  return vae.tiny_config().replace(block_out_channels=(16, 32), scaling_factor=DEMO_SCALING_FACTOR)


def get_config(arg: str = "tiny"):
  if arg not in ("tiny", "demo"):
    raise ValueError(f"configs/vae.py: unknown variant {arg!r}; use tiny or demo")
  demo = arg == "demo"
  c = ml_collections.ConfigDict()
  c.stage = "vae"  # training stage (puma_jax/training/registry.py)
  c.seed = 0  # initialization and the per-step latent draws
  config_lib.precision_block(c, "float32")  # precision, loss_scale, attention
  c.model = ml_collections.ConfigDict()
  c.model.vae = (demo_vae_config() if demo else vae.tiny_config()).to_dict()  # VAEConfig

  c.loss = ml_collections.ConfigDict()
  c.loss.recon = "mse"  # pixel reconstruction loss: mse | l1 (why mse: training/vae.py)
  c.loss.kl_weight = 1e-6  # KL to N(0, 1) per latent element, relative to the mean pixel
  # loss (ours; the order of the SD VAE's); 1e-4 blurred the demo's reconstructions

  c.data = data_config.get_config("tiny")
  for name in list(c.data.sources.keys()):
    # Every family renders the same kind of scene; one source keeps the reader cheap.
    c.data.sources[name].weight = 1.0 if name == "pairs" else 0.0
  c.data.image.vae_size = 32  # the VAE's input side (the decoders' image size)
  c.data.batch_size = 16 if demo else 8  # images per step per host

  c.optim = config_lib.optim(
    {"default": 3e-3 if demo else 1e-3},  # (ours) Adam on a tiny conv net
    total_steps=DEMO_STEPS if demo else 300,
    warmup_steps=20,  # (ours)
    decay="cosine",  # (ours)
    weight_decay=0.0,  # (ours) nothing to regularize on a 3-level-deep autoencoder
    grad_clip=1.0,  # (ours)
  )
  c.train = config_lib.train(
    c.optim,
    grad_accum_steps=1,
    log_every=50,
    checkpoint_every=200,
    eval_every=c.optim.get_ref("total_steps") * 1,  # at the end (derived: see configs/decoder.py)
    eval_batches=4,  # held-out batches per evaluation (x data.batch_size images)
  )
  c.train.sample_images = 8  # held-out images in each evaluation's PNG grid

  c.num_devices = 0  # 0: every device; N: only the first N (single-process debugging, tests)
  c.mesh = config_lib.mesh(True)
  c.distributed = config_lib.distributed()
  return c
