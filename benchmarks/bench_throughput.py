"""Issue 14's ratios side by side, one run on whatever device jax has:

  python -m benchmarks.bench_throughput [--tiny] [--repeats=3] \
      [--only=pack,attention,decode,sample,latent_cache]

  pack       real tokens/s of MLLM training steps (forward + backward + SGD update) on the tiny
             PumaModel, packed rows vs one example per row, the pretraining-like synthetic mix
             at --seq_len (default 2048, the paper's). Real tokens = positions of examples.
  attention  causal self-attention forward + backward with segment ids, XLA vs the fused kernel
             `layers.attention` picks on this device (cuDNN on Ampere+, splash on TPU; none on
             CPU, where the line says so).
  decode     greedy decode tokens/s at batch 1/16/64 with the KV cache copied per token (the
             old scheme, `llama.CACHE_UPDATE = "copy"`) vs updated in place.
  sample     one 50-step CFG sample (DDPM, tiny PUMA decoder + VAE), float32 vs bfloat16.
  latent_cache
             one decoder-stage train step, its host batch included, reading images (VAE encode
             and CLIP forward in the step) vs the latent cache (`data.latent_cache`): the demo
             f0 decoder (configs/decoder.py:demo_f0, random frozen parts) at batch 8; --tiny: a
             tiny f3 decoder at batch 4.

Every figure is the median of `repeats` timed runs after a compile run, the two sides
alternating, so that load on a shared machine hits both alike. `--tiny`: small sizes, about
two minutes in all on 2 CPU cores (a smoke test of the benchmark, not a measurement).
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from puma_jax import cli


def alternate(fns: dict, repeats: int) -> dict:
  """Median seconds per call of each fn (each called once first to compile), interleaved."""
  for f in fns.values():
    jax.block_until_ready(f())
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def line(name, a_name, a, b_name, b, unit):
  """One side-by-side row; the ratio is the right side's speedup over the left (rates: b / a,
  times: a / b), so > 1 always means the right side is faster."""
  rate = unit.endswith("/s")
  ratio = (b / a if rate else a / b) if a and b else float("nan")
  print(
    f"{name:<34} {a_name} {a:12.1f} {unit}   {b_name} {b:12.1f} {unit}   speedup {ratio:6.2f}x",
    flush=True,
  )


# ----------------------------------------------------------------------------------------------


def bench_pack(args):
  from puma_jax.data import config as data_config
  from puma_jax.data import pipeline
  from puma_jax.data.rows import MLLMEncoder
  from puma_jax.models import clip as clip_lib, puma
  from puma_jax.tokenizer import ByteTokenizer
  from puma_jax.training import losses, mllm

  tok = ByteTokenizer()
  model = puma.PumaModel(puma.tiny(), rngs=nnx.Rngs(0))
  graphdef, frozen, params, rest = nnx.split(model, mllm.MLLMStage.frozen, nnx.Param, ...)
  objective = mllm.objective(
    graphdef, frozen, rest, {"text_weight": 0.02, "image_weight": 1.0, "router_weight": 0.1}
  )

  @jax.jit
  def step(p, batch):
    def loss(p):
      b = dict(batch, images=clip_lib.normalize_uint8(batch["images"]))
      b["_normalizers"] = losses.mllm_normalizers(b)
      return objective(p, b)[0]

    g = jax.grad(loss)(p)
    return jax.tree.map(lambda a, b: a - 1e-4 * b, p, g)

  def batches(pack):
    c = data_config.get_config("tiny")
    for name in ("edit", "conditional"):  # the pretraining mix has no two-image tasks
      c.sources[name].weight = 0.0
    c.batch_size, c.num_threads, c.pack = args.rows, 1, pack
    enc = MLLMEncoder(tok.encode, tok.special, args.seq_len, 2, 32)
    it = iter(pipeline.build(c, encode=enc, host_index=0, host_count=1))
    out = []
    for _ in range(args.repeats + 1):
      b = next(it)
      b.pop("num_images")
      out.append({k: jnp.asarray(v) for k, v in b.items()})
    return out

  data = {"unpacked": batches(False), "packed": batches(True)}
  real = {k: [int((b["segment_ids"] > 0).sum()) for b in v] for k, v in data.items()}
  cursor = {"unpacked": 0, "packed": 0}

  def run(kind):
    def f():
      b = data[kind][cursor[kind] % len(data[kind])]
      cursor[kind] += 1
      return step(params, b)

    return f

  t = alternate({k: run(k) for k in data}, args.repeats)
  tps = {k: statistics.mean(real[k]) / t[k] for k in data}
  fr = {k: statistics.mean(real[k]) / (args.rows * args.seq_len) for k in data}
  print(
    f"  real-token fraction: unpacked {fr['unpacked']:.2f}, packed {fr['packed']:.2f} "
    f"(seq_len {args.seq_len}, {args.rows} rows)"
  )
  line("pack: real tokens/s", "unpacked", tps["unpacked"], "packed", tps["packed"], "tok/s")


def bench_attention(args):
  from puma_jax.models import layers

  dev = jax.devices()[0]
  b, t, h, kvh, d = (2, 256, 4, 2, 64) if args.tiny else (4, 2048, 32, 8, 128)
  dtype = jnp.bfloat16 if dev.platform != "cpu" else jnp.float32
  r = np.random.RandomState(0)
  q = jnp.asarray(r.randn(b, t, h, d), dtype)
  k = jnp.asarray(r.randn(b, t, kvh, d), dtype)
  v = jnp.asarray(r.randn(b, t, kvh, d), dtype)
  seg = jnp.asarray(np.repeat(np.arange(1, 5), t // 4)[None].repeat(b, 0), jnp.int32)
  fused = layers.choose_attention(q, k)
  if fused == "xla":
    print(
      f"{'attention: fwd+bwd step':<34} no fused kernel on {dev.platform} "
      f"({dev.device_kind}); XLA only"
    )
    return

  def make(impl):
    def loss(q, k, v):
      with layers.attention_impl(impl):
        o = layers.attention(q, k, v, is_causal=True, segment_ids=seg)
      return jnp.sum(o.astype(jnp.float32) ** 2)

    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return lambda: g(q, k, v)

  t_ = alternate({"xla": make("xla"), fused: make(fused)}, args.repeats)
  line(f"attention: fwd+bwd ms ({fused})", "xla", t_["xla"] * 1e3, fused, t_[fused] * 1e3, "ms")


def bench_decode(args):
  from puma_jax.models import llama

  cfg = (
    llama.tiny(vocab_size=512, max_position_embeddings=512)
    if args.tiny
    else llama.LlamaConfig(
      vocab_size=32000,
      hidden_size=768,
      intermediate_size=2048,
      num_hidden_layers=8,
      num_attention_heads=12,
      num_key_value_heads=4,
      max_position_embeddings=2048,
    )
  )
  model = llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  prompt, new = (8, 16) if args.tiny else (32, 128)

  def make(mode, batch):
    # A fresh jit per mode: CACHE_UPDATE is read while tracing.
    @jax.jit
    def gen(state, tokens):
      m = nnx.merge(graphdef, state)
      cache = m.init_cache(batch, prompt + new)
      logits, cache = m(tokens, cache=cache)

      def body(_, carry):
        prev, cache = carry
        logits, cache = m(prev[:, None], cache=cache)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

      last, _ = jax.lax.fori_loop(
        0, new, body, (jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache)
      )
      return last

    tokens = jnp.asarray(
      np.random.RandomState(batch).randint(3, cfg.vocab_size, (batch, prompt)), jnp.int32
    )
    old = llama.CACHE_UPDATE
    llama.CACHE_UPDATE = mode
    try:
      jax.block_until_ready(gen(state, tokens))  # traced with this mode
    finally:
      llama.CACHE_UPDATE = old
    return lambda: gen(state, tokens)

  for batch in (1, 16, 64):
    t = alternate({"copy": make("copy", batch), "inplace": make("inplace", batch)}, args.repeats)
    line(
      f"decode: tokens/s at batch {batch}",
      "copy",
      batch * new / t["copy"],
      "in-place",
      batch * new / t["inplace"],
      "tok/s",
    )


def bench_sample(args):
  from puma_jax.diffusion import sampler as SM
  from puma_jax.models import puma_decoder, vae

  steps = 10 if args.tiny else 50
  dcfg = puma_decoder.tiny_config(num_tokens=16)
  runs = {}
  for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
    dec = puma_decoder.PumaDecoder(dcfg, dtype=dtype, rngs=nnx.Rngs(0))
    v = vae.AutoencoderKL(vae.tiny_config(), dtype=dtype, rngs=nnx.Rngs(1))
    smp = SM.DecoderSampler(dec, v, SM.SamplerSettings(num_steps=steps))
    f = jnp.asarray(np.random.RandomState(0).randn(1, 16, dcfg.mapping_dim), jnp.float32)
    runs[name] = lambda smp=smp, f=f: smp(f, f * 0, SM.sample_keys(0, 1))
  t = alternate(runs, args.repeats)
  line(
    f"sample: {steps}-step CFG ms",
    "float32",
    t["float32"] * 1e3,
    "bfloat16",
    t["bfloat16"] * 1e3,
    "ms",
  )


def bench_latent_cache(args):
  import tempfile

  from puma_jax import sharding
  from puma_jax.tools.train_demo import load_config
  from puma_jax.training import data as data_lib, decoder, init as init_lib, latent_cache, registry

  if args.tiny:
    config = load_config("configs/decoder.py:tiny_f3")
    u = config.model.decoder.unet
    u.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
    u.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
    u.block_out_channels, u.transformer_layers_per_block = (16, 32), (1, 1)
    u.attention_head_dim = (2, 2)
    config.data.batch_size, config.data.synthetic.num_train = 4, 8
  else:
    config = load_config("configs/decoder.py:demo_f0")
    config.data.batch_size, config.data.synthetic.num_train = 8, 64
  config.data.num_threads = 1
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  with tempfile.TemporaryDirectory() as tmp:
    latent_cache.write(
      decoder.DecoderStage(config), f"{tmp}/cache", batch_size=int(config.data.batch_size)
    )
    runs = {}
    for name, cache in (("images", ""), ("cache", f"{tmp}/cache")):
      c = config.copy_and_resolve_references()
      c.data.latent_cache = cache
      stage = registry.make(c)
      data = stage.train_data()
      with sharding.use_mesh(mesh):
        got = init_lib.restore_or_init(stage, None, mesh)
      stage.check_frozen(got.frozen)
      step = jax.jit(stage.train_step(got.abstract.graphdef, got.abstract.tx))
      held = {"state": got.state}

      def run(stage=stage, data=data, step=step, got=got, held=held):
        batch = data_lib.global_batch(stage.device_arrays(next(data)), mesh)
        with sharding.use_mesh(mesh):
          held["state"], m = step(held["state"], got.frozen, got.rest, batch)
        return m["loss"]

      runs[name] = run
    t = alternate(runs, args.repeats)
  line(
    f"decoder step ms ({config.scale}, batch {config.data.batch_size})",
    "images",
    t["images"] * 1e3,
    "cache",
    t["cache"] * 1e3,
    "ms",
  )


BENCHES = {
  "pack": bench_pack,
  "attention": bench_attention,
  "decode": bench_decode,
  "sample": bench_sample,
  "latent_cache": bench_latent_cache,
}


FLAGS = flags.FLAGS
flags.DEFINE_bool("tiny", False, "small sizes: a smoke test in seconds")
flags.DEFINE_integer("repeats", 5, "timed runs per side (median reported)")
flags.DEFINE_integer("seq_len", 2048, "positions per row of the packing benchmark")
flags.DEFINE_integer("rows", 4, "rows per batch of the packing benchmark")
flags.DEFINE_list("only", list(BENCHES), f"benchmarks to run, of {sorted(BENCHES)}")


class _Args:
  def __init__(self):
    for k in ("tiny", "repeats", "seq_len", "rows", "only"):
      setattr(self, k, FLAGS[k].value)


def main(argv):
  args = _Args()
  if args.tiny:
    args.repeats, args.seq_len, args.rows = min(args.repeats, 2), min(args.seq_len, 1024), 2
  bad = [n for n in args.only if n not in BENCHES]
  if bad:
    raise ValueError(f"--only: unknown benchmark(s) {bad}; choose from {sorted(BENCHES)}")
  dev = jax.devices()[0]
  print(
    f"device: {dev.platform} {dev.device_kind}; median of {args.repeats} alternating runs; "
    "speedup = right side over left (> 1: right is faster)"
  )
  for name in args.only:
    BENCHES[name](args)


if __name__ == "__main__":
  sys.exit(cli.run(main, doc=__doc__))
