"""Decode-loop demo: a small random MoE decoder stack run as a jitted lax.scan.

  python -m jax_moe.demo [--shape tiny|gemma4|qwen3|mixtral|deepseek_v3] [--layers 4]
                         [--tokens 8] [--steps 64] [--chunk 16] [--dtype auto]
                         [--implementation auto] [--check] [--no-reference]

Each layer is h = h + moe_block(rms_norm(h)) (random weights of the named shape).
One step embeds T current tokens, runs every layer, and picks each sequence's next
token greedily from tied-embedding logits: a real decode loop's feedback, which
also keeps it stable (a sub-ulp difference only matters if it flips an argmax).
Steps run in chunks, each one jitted lax.scan, with a progress line per chunk.
Prints steps/s and per-layer time, then compares with the same loop run with
implementation="reference": generated tokens, and the max abs/rel error of the
final hidden state. --check exits non-zero unless the tokens match and the error
is within a bound from the dtype.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe import moe as moe_lib
from jax_moe.moe import MoEConfig, example_params, moe_block
from jax_moe.shapes import SHAPES

# --check bound on the norm-relative error of the final hidden state. With the same
# tokens, the two loops differ only within the last step's layers, where each path
# agrees with the reference to about the dtype's rounding (tests/helpers.tol) per
# layer; the bound allows a few layers of that.
_CHECK_BOUND = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
_VOCAB = 512  # tied embedding rows: the next-token choice that closes the loop


def rms_norm(x, weight, eps=1e-6):
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * weight).astype(x.dtype)


def build_layers(key, shape, num_layers: int, dtype):
  """[(norm_weight [H] f32, MoEParams)] per layer, created on the default device."""
  make = jax.jit(lambda k: (1.0 + 0.1 * jax.random.normal(k, (shape.hidden,), jnp.float32),
                            example_params(jax.random.fold_in(k, 1), shape, dtype)))
  return [make(k) for k in jax.random.split(key, num_layers)]


def decode_step(x, layers, config):
  h = x
  for norm_w, params in layers:
    h = h + moe_block(rms_norm(h, norm_w), params, config)
  return h


def make_chunk(config: MoEConfig, num_steps: int):
  """Jitted (tokens [T], emb [V, H], layers) -> (tokens [T], last hidden [T, H],
  generated [num_steps, T]) for num_steps greedy decode steps."""
  def run(tokens, emb, layers):
    def body(carry, _):
      tok, _ = carry
      h = decode_step(emb[tok], layers, config)
      logits = jnp.dot(rms_norm(h, 1.0), emb.T, preferred_element_type=jnp.float32)
      nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      return (nxt, h), nxt
    h0 = jnp.zeros((tokens.shape[0], emb.shape[1]), emb.dtype)
    (tok, h), generated = jax.lax.scan(body, (tokens, h0), None, length=num_steps)
    return tok, h, generated

  return jax.jit(run)


def run_loop(config, tokens, emb, layers, steps: int, chunk: int, label: str, verbose: bool):
  """Compiles and warms up, then runs `steps` steps in chunks. Returns (last hidden
  [T, H], generated tokens [steps, T], run seconds, compile seconds)."""
  sizes = [chunk] * (steps // chunk) + ([steps % chunk] if steps % chunk else [])
  t0 = time.perf_counter()
  compiled = {n: make_chunk(config, n).lower(tokens, emb, layers).compile() for n in set(sizes)}
  compile_s = time.perf_counter() - t0
  for fn in compiled.values():  # first executions pay one-time setup: keep it out of the rate
    jax.block_until_ready(fn(tokens, emb, layers))
  done, total, gens = 0, 0.0, []
  for n in sizes:
    t0 = time.perf_counter()
    tokens, h, gen = compiled[n](tokens, emb, layers)
    h.block_until_ready()
    dt = time.perf_counter() - t0
    total += dt
    done += n
    gens.append(gen)
    if verbose:
      print(f"  [{label}] steps {done:>{len(str(steps))}}/{steps}  "
            f"{dt * 1e3:8.2f} ms/chunk  {n / dt:9.1f} steps/s", flush=True)
  return h, np.concatenate([np.asarray(g) for g in gens]), total, compile_s


def _weight_bytes(shape, layers: int, itemsize: int) -> int:
  per = shape.num_experts * (3 * shape.hidden * shape.intermediate + shape.hidden)
  per += shape.num_shared_experts * 3 * shape.hidden * shape.shared_intermediate
  return layers * per * itemsize


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m jax_moe.demo", description=__doc__.split("\n")[0])
  ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--tokens", type=int, default=8, help="batch T: tokens decoded per step")
  ap.add_argument("--steps", type=int, default=64)
  ap.add_argument("--chunk", type=int, default=16, help="steps per jitted scan (progress line)")
  ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                  help="auto: bfloat16 on GPU, float32 on CPU")
  ap.add_argument("--implementation", default="auto", choices=list(moe_lib.IMPLEMENTATIONS))
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--check", action="store_true",
                  help="exit 1 if the final state's error vs the reference loop is over the "
                       "dtype's bound")
  ap.add_argument("--no-reference", action="store_true", help="skip the reference loop")
  args = ap.parse_args(argv)
  if min(args.layers, args.tokens, args.steps, args.chunk) < 1:
    ap.error("--layers, --tokens, --steps and --chunk must be >= 1")
  if args.check and args.no_reference:
    ap.error("--check needs the reference loop")

  dev = jax.devices()[0]
  dtype_name = args.dtype
  if dtype_name == "auto":
    dtype_name = "float32" if dev.platform == "cpu" else "bfloat16"
  dtype = jnp.dtype(dtype_name)
  shape = SHAPES[args.shape]
  config = MoEConfig.from_shape(shape, implementation=args.implementation)
  T, L = args.tokens, args.layers

  wbytes = _weight_bytes(shape, L, dtype.itemsize)
  limit = (dev.memory_stats() or {}).get("bytes_limit") if hasattr(dev, "memory_stats") else None
  if limit and wbytes > 0.85 * limit:
    fit = max(0, int(0.85 * limit // _weight_bytes(shape, 1, dtype.itemsize)))
    print(f"{L} layers of {args.shape} in {dtype_name} need {wbytes / 2**30:.1f} GiB of weights; "
          f"the device has {limit / 2**30:.1f} GiB. Try --layers {fit}.", file=sys.stderr)
    return 2

  impl, method = moe_lib.resolve(config, T, shape.hidden, shape.intermediate)
  routing = shape.scoring + (f", {shape.num_groups} groups/top {shape.top_groups}"
                             if shape.num_groups > 1 else "")
  shared = f", {shape.num_shared_experts} shared" if shape.num_shared_experts else ""
  print(f"jax_moe demo on {dev.platform}:{getattr(dev, 'device_kind', '?')}")
  print(f"  shape {shape.name}: H={shape.hidden} I={shape.intermediate} E={shape.num_experts} "
        f"k={shape.top_k} ({routing}{shared}), {shape.activation}")
  print(f"  {L} layers, {T} tokens/step, {args.steps} steps in chunks of {args.chunk}, "
        f"{dtype_name}, weights {wbytes / 2**20:.1f} MiB")
  print(f"  implementation {args.implementation} -> {impl}" + (f" ({method})" if method else ""),
        flush=True)

  key = jax.random.PRNGKey(args.seed)
  layers = build_layers(jax.random.fold_in(key, 0), shape, L, dtype)
  emb = jax.random.normal(jax.random.fold_in(key, 1), (_VOCAB, shape.hidden), dtype)
  tokens = jax.random.randint(jax.random.fold_in(key, 2), (T,), 0, _VOCAB, jnp.int32)
  jax.block_until_ready((layers, emb, tokens))

  h, gen, secs, csecs = run_loop(config, tokens, emb, layers, args.steps, args.chunk, "moe",
                                 True)
  print(f"  compile {csecs:.2f} s")
  print(f"  {args.steps / secs:.1f} steps/s, {secs / args.steps * 1e3:.3f} ms/step, "
        f"{secs / args.steps / L * 1e6:.1f} us/layer (moe_block + norm + residual, T={T})")
  if args.no_reference:
    return 0

  ref_cfg = config.replace(implementation="reference")
  hr, gen_r, rsecs, _ = run_loop(ref_cfg, tokens, emb, layers, args.steps, args.chunk,
                                 "reference", False)
  print(f"  reference loop: {args.steps / rsecs:.1f} steps/s")
  same = gen == gen_r
  first_diff = int(np.argmin(same.all(axis=1))) if not same.all() else None
  print(f"  generated tokens equal to the reference loop's: {int(same.sum())}/{same.size}"
        + (f" (first difference at step {first_diff + 1})" if first_diff is not None else ""))
  a = np.asarray(h.astype(jnp.float32), np.float64)
  r = np.asarray(hr.astype(jnp.float32), np.float64)
  max_abs = float(np.abs(a - r).max())
  max_rel = max_abs / max(float(np.abs(r).max()), 1e-30)
  norm_rel = float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30))
  print(f"  final hidden state vs reference: max abs err {max_abs:.3g}, max rel err "
        f"{max_rel:.3g} (max|diff| / max|ref|), norm rel err {norm_rel:.3g}")
  if args.check:
    bound = _CHECK_BOUND[dtype_name]
    if not np.isfinite(a).all() or not same.all() or norm_rel > bound:
      print(f"CHECK FAILED: tokens equal {int(same.sum())}/{same.size}, norm rel err "
            f"{norm_rel:.3g} (bound {bound:g} for {dtype_name})", file=sys.stderr)
      return 1
    print("  check passed")
  return 0


if __name__ == "__main__":
  sys.exit(main())
