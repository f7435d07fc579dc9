"""LLaMA decode and prefill speed, puma_jax vs HF transformers, same weights, same CPU, one run.

    python -m benchmarks.bench_llama [--new_tokens=128] [--batch=1] [--repeats=3] [--tiny]

A ~100M-parameter random LLaMA (GQA, 8 layers, width 768, vocab 32000) is built in
transformers, converted, and timed both ways in float32:
  decode tokens/s: (N - 1) new tokens / (time to generate N - time to generate 1), greedy, no
    early stop; ours is `generate_text` (jitted prefill + `lax.while_loop` decode with the KV
    cache), HF's is `generate` (its dynamic KV cache). Taking the difference removes prefill.
  prefill: one forward over a 512-token prompt (ours: `inference.text.prefill`, which also
    writes the KV cache; HF: the model's forward with `use_cache=True`).
Each figure is the best of `repeats` runs, both sides interleaved, after a warm-up (compile).
Ratios > 1 mean puma_jax is faster. The machine is shared, so ratios are the reliable part.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import flags

from puma_jax import cli


def best_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


FLAGS = flags.FLAGS
flags.DEFINE_integer("new_tokens", 128, "tokens generated per timed run")
flags.DEFINE_integer("prompt", 32, "prompt length")
flags.DEFINE_integer("batch", 1, "prompts per batch")
flags.DEFINE_integer("prefill", 512, "prompt length of the prefill timing")
flags.DEFINE_integer("repeats", 3, "timed runs (best reported)")
flags.DEFINE_bool(
  "tiny", False, "a 2-layer, width-64, 512-token LLaMA: the smoke test of the same code (seconds)"
)


def main(argv):
  args = FLAGS

  import torch
  import transformers

  from puma_jax import sharding
  from puma_jax.convert import import_module
  from puma_jax.inference import generate_text, text

  torch.manual_seed(0)
  size = (
    dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    if args.tiny
    else dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8)
  )
  vocab = size["vocab_size"]
  hf_cfg = transformers.LlamaConfig(
    **size,
    num_attention_heads=4 if args.tiny else 12,
    num_key_value_heads=2 if args.tiny else 4,
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
  )
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    model, cfg = import_module("llama", Path(d))
  n_params = sharding.count_params(model)

  rs = np.random.RandomState(0)
  prompts = rs.randint(3, vocab, (args.batch, args.prompt))
  n = args.new_tokens

  def ours_gen(k):
    return lambda: generate_text(model, prompts.tolist(), k, stop_tokens=())

  hf_ids = torch.tensor(prompts)

  def hf_gen(k):
    def run():
      with torch.no_grad():
        return hf.generate(
          input_ids=hf_ids,
          attention_mask=torch.ones_like(hf_ids),
          max_new_tokens=k,
          min_new_tokens=k,
          do_sample=False,
          eos_token_id=None,
          pad_token_id=0,
        )

    return run

  # Same tokens from both (greedy on the same weights): the timed work is the same work.
  same = np.array_equal(np.array(ours_gen(n)()), hf_gen(n)()[:, args.prompt :].numpy())
  for f in (ours_gen(1), hf_gen(1), hf_gen(n)):
    f()  # warm-up / compile
  t = {k: [] for k in ("ours1", "oursN", "hf1", "hfN", "ours_pre", "hf_pre")}

  long = rs.randint(3, vocab, (1, args.prefill))
  mask = np.ones_like(long, bool)
  slots = args.prefill + 128

  def ours_prefill():
    logits, cache = text.prefill(model, long, mask, slots)
    jax.block_until_ready((logits, cache))

  hf_long = torch.tensor(long)

  def hf_prefill():
    with torch.no_grad():
      hf(hf_long, use_cache=True)

  ours_prefill()
  hf_prefill()
  for _ in range(args.repeats):  # interleaved, so load changes hit both sides alike
    t["ours1"].append(best_time(ours_gen(1), 1))
    t["oursN"].append(best_time(ours_gen(n), 1))
    t["hf1"].append(best_time(hf_gen(1), 1))
    t["hfN"].append(best_time(hf_gen(n), 1))
    t["ours_pre"].append(best_time(ours_prefill, 1))
    t["hf_pre"].append(best_time(hf_prefill, 1))
  b = {k: min(v) for k, v in t.items()}
  ours_tps = args.batch * (n - 1) / (b["oursN"] - b["ours1"])
  hf_tps = args.batch * (n - 1) / (b["hfN"] - b["hf1"])
  result = {
    "params": n_params,
    "batch": args.batch,
    "prompt": args.prompt,
    "new_tokens": n,
    "same_tokens_as_hf": bool(same),
    "decode_tokens_per_s": {
      "puma_jax": round(ours_tps, 1),
      "hf": round(hf_tps, 1),
      "ratio": round(ours_tps / hf_tps, 2),
    },
    f"prefill_{args.prefill}_s": {
      "puma_jax": round(b["ours_pre"], 4),
      "hf": round(b["hf_pre"], 4),
      "ratio_hf_over_ours": round(b["hf_pre"] / b["ours_pre"], 2),
    },
    "generate_total_s": {"puma_jax": round(b["oursN"], 3), "hf": round(b["hfN"], 3)},
    "torch_threads": torch.get_num_threads(),
    "jax_backend": jax.default_backend(),
  }
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  sys.exit(cli.run(main, doc=__doc__))
