"""PUMA decoder training (PUMA paper, appendix 7.1): one SDXL-based decoder per feature scale.

Variants (`--config=configs/decoder.py:VARIANT`):
  tiny, tiny_f0 .. tiny_f4  (default tiny = tiny_f2) toy CLIP / VAE / UNet on the synthetic set
                            at 32 px; a few minutes on a 2-core CPU. Random CLIP and VAE (no
                            pretrained weights on this machine).
  demo_f0 .. demo_f4        the tiny decoders of the tiny-PUMA demo (puma_jax/tools/train_demo.py),
                            tuned for speed: about 2 minutes each on a 2-core CPU. Frozen CLIP
                            and VAE from --config.init.clip (the demo's shared random CLIP) and
                            --config.init.vae (configs/vae.py:demo, whose scaling factor this
                            config takes: configs/vae.py `demo_vae_config`).
  f0 .. f4                  the paper: SDXL UNet (from a converted sdxl-unet dir), CLIP-L, SDXL
                            VAE; AdamW, lr 8e-5, linear decay, clip 1.0, batch 1024, steps
                            40k / 30k / 20k / 15k / 10k, noise offset 0.1, 10% blank features.

Run:
  python -m puma_jax.main --config=configs/decoder.py --workdir=/tmp/puma_decoder
  python -m puma_jax.main --config=configs/decoder.py:demo_f0 --workdir=W/decoder_f0 \
      --config.init.clip=W/parts/clip --config.init.vae=W/parts/vae
  python -m puma_jax.main --config=configs/decoder.py:f0 --workdir=/ckpt/decoder_f0 \
      --config.init.clip=/ckpt/clip_l14 --config.init.vae=/ckpt/sdxl_vae \
      --config.init.decoder=/ckpt/sdxl_unet \
      --config.data.sources.images.paths=/data/laion/{00000..09999}.tar
"""

import importlib.util
from pathlib import Path

import ml_collections

from puma_jax import config_lib
from puma_jax.data import config as data_config
from puma_jax.diffusion import schedulers as S
from puma_jax.models import clip, pooling, puma_decoder, vae

PAPER_STEPS = {"f0": 40_000, "f1": 30_000, "f2": 20_000, "f3": 15_000, "f4": 10_000}


def _demo_vae_config():
  """configs/vae.py's demo VAE (config files are loaded by path, as main.py loads them)."""
  spec = importlib.util.spec_from_file_location("_vae_config", Path(__file__).with_name("vae.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.demo_vae_config()


def get_config(arg: str = "tiny"):
  demo = arg.startswith("demo_")
  tiny = arg.startswith("tiny") or demo  # the demo's decoders are the tiny ones
  scale = arg.split("_", 1)[1] if "_" in arg else ("f2" if tiny else arg)
  if scale not in PAPER_STEPS or (demo and arg != f"demo_{scale}"):
    raise ValueError(
      f"configs/decoder.py: unknown variant {arg!r}; use f0..f4, tiny_f0..f4 or demo_f0..f4"
    )
  tokens = pooling.SCALE_TOKENS[pooling.scale_index(scale)]
  c = ml_collections.ConfigDict()
  c.stage = "decoder"  # training stage (puma_jax/training/registry.py)
  c.scale = scale  # the feature scale this decoder reads (f0 = 256 tokens ... f4 = 1)
  c.seed = 0  # initialization and the per-step noise / dropout keys
  config_lib.precision_block(c, "float32" if tiny else "auto")  # precision, loss_scale, attention
  c.remat = not tiny  # rematerialize the UNet's transformer blocks

  c.model = ml_collections.ConfigDict()
  clip_cfg = clip.tiny() if tiny else clip.vit_l14()
  c.model.clip = clip_cfg.to_dict()  # frozen CLIP encoder
  vae_cfg = _demo_vae_config() if demo else (vae.tiny_config() if tiny else vae.sdxl_vae_config())
  c.model.vae = vae_cfg.to_dict()  # frozen VAE
  if tiny:
    dec = puma_decoder.tiny_config(tokens, sample_size=16)
    dec = dec.replace(mapping_dim=clip_cfg.hidden_size)
    if demo:  # (ours) the queries' place: see _demo_schedule
      dec = dec.replace(unet=dec.unet.replace(position_code="sincos2d"))
  else:
    dec = puma_decoder.puma_decoder_config(tokens)
  c.model.decoder = dec.to_dict()  # PumaDecoderConfig (UNet + mapping)
  c.model.scheduler = ml_collections.ConfigDict(
    {k: v for k, v in vars(S.SchedulerConfig()).items() if k != "trained_betas"}
  )  # SDXL's

  c.init = ml_collections.ConfigDict()
  c.init.clip = ""  # converted clip-vision dir (CLIP-L)
  c.init.vae = ""  # converted vae dir (SDXL VAE)
  c.init.decoder = ""  # converted sdxl-unet dir (paper's init) or a puma-decoder dir

  c.noise_offset = 0.1  # PUMA paper, appendix 7.1.2
  c.min_snr_gamma = 0.0  # Min-SNR-gamma loss weights (training/losses.min_snr_weights); 0: the
  # paper's plain MSE (docs/DESIGN.md §5)
  c.cfg_drop_prob = 0.1  # app. 7.1.2, docs/DESIGN.md §5: features replaced by the blank image's

  c.data = data_config.get_config("tiny" if tiny else "decoder")
  if tiny:
    for name in list(c.data.sources.keys()):
      c.data.sources[name].weight = 1.0 if name == "pairs" else 0.0
    c.data.image.vae_size = 32  # = unet.sample_size x VAE downsampling (16 x 2)
  c.data.batch_size = 8 if tiny else 1024 // 256  # per host (paper: 1024 in total)
  c.data.latent_cache = ""  # a latent cache directory (python -m puma_jax.data.prepare
  # --decoder_config=THIS CONFIG --dst=DIR): train on its VAE moments and CLIP features instead
  # of encoding the images at every step; its fingerprint must match (docs/DESIGN.md §5)

  c.optim = config_lib.optim(
    {"default": 1e-3 if tiny else 8e-5},  # PUMA paper, appendix 7.1.2 (tiny: ours)
    total_steps=200 if tiny else PAPER_STEPS[scale],
    warmup_steps=10 if tiny else 0,  # (ours for tiny) the paper states no warm-up
    decay="linear",  # PUMA paper, appendix 7.1.2
    weight_decay=1e-2,  # (ours) PyTorch AdamW's default (docs/DESIGN.md §5)
    grad_clip=1.0,
  )  # PUMA paper, appendix 7.1.2
  # eval_every: steps between sample images (0: never)
  c.train = config_lib.train(
    c.optim,
    grad_accum_steps=1,
    log_every=10 if tiny else 50,
    checkpoint_every=50 if tiny else 1000,
    eval_every=100 if tiny else 2000,
    eval_batches=1,
  )
  c.train.sample_images = 4  # held-out images reconstructed at each evaluation
  c.train.sample_steps = 10 if tiny else 50  # sampler steps for those
  c.train.sample_scheduler = "ddpm"  # their sampler (docs/DESIGN.md §4: the paper's DDPM)
  c.train.sample_guidance = 2.0  # their classifier-free guidance (docs/DESIGN.md §4)
  if demo:
    _demo_schedule(c)

  c.num_devices = 0  # 0: every device; N: only the first N (single-process debugging, tests)
  c.mesh = config_lib.mesh(tiny)
  c.distributed = config_lib.distributed()
  return c


# The demo decoders' schedule (ours). They learn where to draw only with a place on both sides
# of their cross-attention: the demo CLIP's 2-D sin-cos position code (tools/train_demo.py
# write_clip) and the UNet's (unet.position_code = "sincos2d", set above). Measured on demo_f0,
# 24 held-out single-shape scenes (docs/DESIGN.md §5): with either alone the shape's cell was
# right in 12-21% after 3000 steps (chance 11%); with both, 3000-step runs gave 96% in one run
# and 33% in a rerun differing only in the float rounding of the code (the transition is near
# there), a 4000-step run 100% at its step 3000 and 100% at 4000 (colour 88%, PSNR 26.8 dB).
# In the full demo (2 idle cores, 2026-12-02) demo_f0 reconstructed held-out scenes at 27.4 dB,
# colour 92%, cell 100%. demo_f1 learns the place only well past the budget: after 1000 steps
# it had not (cell 4%, colour 21%), nor with both codes after 2400 (cell 21%, colour 29%); so it
# gets the short run of f2..f4, and the demo its 30 minutes (32:25 with f1 at 1000 steps).
DEMO_STEPS = {"f0": 4000, "f1": 200, "f2": 200, "f3": 200, "f4": 200}


def _demo_schedule(c: ml_collections.ConfigDict) -> None:
  """configs/decoder.py:demo_fK: the tiny decoder trained for speed (fields as above)."""
  c.optim.lr_groups.default = 2e-3  # (ours) the tiny UNet tolerates it and converges sooner
  c.optim.total_steps = DEMO_STEPS[c.scale]  # f0 has the most detail to learn
  c.optim.warmup_steps = 20
  # (ours) Min-SNR-5 weighting: a decoder trained from scratch in minutes otherwise learns the
  # scenes' look before it follows its features (demo_f0 at 400 steps, same run otherwise:
  # held-out sample PSNR 15.0 dB with it, 13.5 dB without; docs/DESIGN.md §5)
  c.min_snr_gamma = 5.0
  # (ours) v-prediction on a zero-terminal-SNR schedule (Lin et al. 2023), the sampler starting
  # at t = T ("trailing"): at SNR 0 the decoder must predict the image from its features alone,
  # where an epsilon decoder predicts its input. demo_f0 at 400 steps, Min-SNR-5 both, same run
  # otherwise: held-out sample PSNR 19.5 dB against 14.9 dB with SDXL's epsilon schedule
  # (docs/DESIGN.md §5). The schedule travels with the decoder into releases (§4).
  c.model.scheduler.prediction_type = "v_prediction"
  c.model.scheduler.rescale_betas_zero_snr = True
  c.model.scheduler.timestep_spacing = "trailing"
  c.train.log_every = 25
  c.train.checkpoint_every = 1000  # the last step only (the loop always saves it)
  c.train.eval_every = c.optim.get_ref("total_steps") * 1  # one evaluation, at the end (a derived
  # reference: setting eval_every must not set total_steps)
  c.train.sample_images = 8
  # DDPM, guidance 2.0 (docs/DESIGN.md §4) at 25 steps: on a 400-step f0 decoder 25 and 50 steps
  # gave the same held-out PSNR (11.4 dB), DDIM (eta 0) 2-3 dB less, guidance 1.0 0.4 dB less
  c.train.sample_steps = 25
