"""The benchmark and GPU-check scripts' own option parsing (their measurements run on
a GPU)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import bench_gemv  # noqa: E402
import harness  # noqa: E402


def test_gemv_config_specs():
  assert bench_gemv.parse_config("4") == dict(kernel_variant=4)
  assert bench_gemv.parse_config("auto") == {}
  # a leading f: expert_gemv_combine (k: sum in the stream kernel, c: combine's kernel)
  assert bench_gemv.parse_config("f") == {} and bench_gemv.parse_config("f6") == dict(
      kernel_variant=6)
  assert bench_gemv.parse_config("fk") == dict(combine_in_kernel=True)
  assert bench_gemv.parse_config("fc5") == dict(combine_in_kernel=False, kernel_variant=5)
  assert bench_gemv.parse_config("1:gu4:d8:nt2") == dict(
      kernel_variant=1, k_split_gate_up=4, k_split_down=8, token_tiles=2)


@pytest.mark.parametrize("spec", ["x", "4:zz2", "4:gu", "", "fx", "fk:gu"])
def test_gemv_bad_config_spec(spec):
  with pytest.raises(ValueError, match="--variants"):
    bench_gemv.parse_config(spec)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *args],
                        capture_output=True, text=True, env=env, timeout=600)


def test_sanitize_ops_selects():
  """--ops restricts the sanitizer workload (here run on CPU, as a plain check)."""
  p = _script("sanitize_kernels.py", "--small", "--ops=combine")
  assert p.returncode == 0, p.stdout + p.stderr
  lines = [ln for ln in p.stdout.splitlines() if ln.startswith(("ok", "FAIL"))]
  assert lines and all(" combine " in ln for ln in lines), p.stdout


@pytest.mark.parametrize("ops", ["--ops=gemv", "--ops=", "--ops=route,bogus"])
def test_sanitize_bad_ops(ops):
  p = _script("sanitize_kernels.py", ops)
  assert p.returncode != 0 and "--ops" in p.stderr


def test_profile_bad_variant():
  p = _script("profile_gemv_decode.py", "gemma4", "1", "2")
  assert p.returncode != 0 and "kernel_variant (3rd argument)" in p.stderr


def test_read_bandwidth_takes_the_cuda_rate(monkeypatch):
  """The floor's read rate is the fastest candidate, the GPU script's CUDA read rate
  (JAX_MOE_READ_BW_GBPS) included: a rate far above any XLA reduction must win."""
  monkeypatch.setenv("JAX_MOE_READ_BW_GBPS", "1e9")
  bw = harness.measure_read_bandwidth(1 << 20, sets=2)
  assert bw == 1e18
  assert harness.READ_BANDWIDTH_CANDIDATES["cuda_read_kernel"] == 1e18
  assert len(harness.READ_BANDWIDTH_CANDIDATES) == 4
  monkeypatch.delenv("JAX_MOE_READ_BW_GBPS")
  assert harness.measure_read_bandwidth(1 << 20, sets=2) < 1e18
  assert "cuda_read_kernel" not in harness.READ_BANDWIDTH_CANDIDATES


@pytest.mark.parametrize("value", ["fast", "-3", "0", "inf", "nan"])
def test_read_bandwidth_bad_env(monkeypatch, value):
  monkeypatch.setenv("JAX_MOE_READ_BW_GBPS", value)
  with pytest.raises(ValueError, match="JAX_MOE_READ_BW_GBPS"):
    harness.measure_read_bandwidth(1 << 20, sets=2)


def _build_probe(tmp_path_factory, name):
  """scripts/<name>.cu built with nvcc (skipped without it). The probes check their
  arguments before any CUDA call, so those checks are tested without a GPU."""
  import shutil
  nvcc = shutil.which("nvcc")
  if nvcc is None:
    pytest.skip("nvcc not found")
  exe = str(tmp_path_factory.mktemp("probe") / name)
  p = subprocess.run([nvcc, "-std=c++17", "-O1", "-arch=sm_90a", "-I" + os.path.join(ROOT, "csrc"),
                      os.path.join(ROOT, "scripts", name + ".cu"), "-o", exe],
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  return exe


def _assert_refused(exe, args, match, env=None):
  """A probe run that must exit 2 before any CUDA call, naming what was wrong."""
  p = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60,
                     env=dict(os.environ, **(env or {})))
  assert p.returncode == 2, p.stdout + p.stderr
  assert re.search(match, p.stderr), p.stderr


@pytest.fixture(scope="module")
def stream_probe(tmp_path_factory):
  return _build_probe(tmp_path_factory, "stream_probe")


@pytest.mark.parametrize("args,match", [
    (["bogus"], "unknown shape 'bogus'"),
    (["gemma4", "0"], "T \\(2nd argument\\)"),
    (["gemma4", "1,x"], "T \\(2nd argument\\)"),
    (["gemma4", "1", "0"], "iterations \\(3rd argument\\)"),
    (["gemma4", "1", "10", "11"], "ring \\(4th argument\\)"),
    (["gemma4", "1", "10", "1", "extra"], "at most 4 arguments"),
    (["--read-bw", "x"], "--read-bw takes no other arguments"),
    (["--self-test", "x"], "--self-test takes no other arguments"),
])
def test_stream_probe_bad_args(stream_probe, args, match):
  _assert_refused(stream_probe, args, match)


def test_stream_probe_self_test(stream_probe):
  """The stream kernel's unit order (csrc/kernels/expert_gemv_stream.cuh: segment
  records, runs of one expert's segments, decode_unit in both orders) checked on the
  host over random expert loads: every unit decodes to a distinct (segment, tile) and
  the numbering is the documented one; and the probe's routings (STREAM_PROBE_ZIPF's
  skew puts far more assignments on the busiest expert). No GPU needed."""
  p = subprocess.run([stream_probe, "--self-test"], capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stdout + p.stderr
  m = re.search(r"self-test ok \((\d+) layouts; busiest expert of 512 assignments: "
                r"uniform (\d+), skewed (\d+)\)", p.stdout)
  assert m, p.stdout
  assert int(m.group(1)) > 500 and int(m.group(3)) >= 2 * int(m.group(2))


@pytest.mark.parametrize("name,value", [
    ("STREAM_PROBE_BW_GBPS", "fast"), ("STREAM_PROBE_BW_GBPS", "0"),
    ("STREAM_PROBE_BW_GBPS", "3100.5"), ("STREAM_PROBE_BW_GBPS", ""),
    ("STREAM_PROBE_QUICK", "yes"), ("STREAM_PROBE_QUICK", "2"), ("STREAM_PROBE_QUICK", ""),
    ("STREAM_PROBE_ZIPF", "x"), ("STREAM_PROBE_ZIPF", "1001"), ("STREAM_PROBE_ZIPF", "-1"),
])
def test_stream_probe_bad_env(stream_probe, name, value):
  """The probe's environment knobs (a fixed floor rate; the quick mode for sanitizer
  runs; skewed routings) are checked before any CUDA call and named in the error."""
  env = dict(os.environ, **{name: value})
  p = subprocess.run([stream_probe, "gemma4", "1", "1"], capture_output=True, text=True,
                     timeout=60, env=env)
  assert p.returncode == 2, p.stdout + p.stderr
  assert f"{name} must be an integer" in p.stderr, p.stderr


@pytest.fixture(scope="module", params=["split_probe", "group_probe"])
def gemv_probe(request, tmp_path_factory):
  """The split and group kernels' probes (same arguments). Building one also checks
  that it compiles against the current kernels."""
  return _build_probe(tmp_path_factory, request.param)


@pytest.mark.parametrize("args,match", [
    (["bogus"], "unknown shape 'bogus'"),
    (["gemma4", "0"], "T \\(2nd argument\\)"),
    (["qwen3", "5"], "T \\(2nd argument\\)"),
    (["gemma4", "1", "0"], "iterations \\(3rd argument\\)"),
    (["gemma4", "1", "10", "extra"], "at most 3 arguments"),
])
def test_gemv_probe_bad_args(gemv_probe, args, match):
  _assert_refused(gemv_probe, args, match)


@pytest.fixture(scope="module")
def route_probe(tmp_path_factory):
  """It also checks that the probe compiles against the current kernels/route.cuh."""
  return _build_probe(tmp_path_factory, "route_probe")


@pytest.mark.parametrize("args,env,match", [
    (["0"], {}, "T \\(1st argument\\)"),
    (["1,65"], {}, "T \\(1st argument\\)"),
    (["1,,8"], {}, "T \\(1st argument\\)"),
    (["1", "0"], {}, "launches \\(2nd argument\\)"),
    (["1", "64", "x"], {}, "at most 2 arguments"),
    (["1", "8"], {"ROUTE_PROBE_COPIES": "0"}, "ROUTE_PROBE_COPIES"),
    (["1", "8"], {"ROUTE_PROBE_NOBIAS": "yes"}, "ROUTE_PROBE_NOBIAS"),
])
def test_route_probe_bad_args(route_probe, args, env, match):
  _assert_refused(route_probe, args, match, env)


def test_route_forced_k_splits_reach_the_primitive():
  """bench_route --fused-splits N: the fused path is traced with k_splits = N (the
  A/B column would silently time the heuristic's kernel if the override were
  ignored); a bad N is refused by route_p naming k_splits."""
  import bench_route
  import jax
  import jax.numpy as jnp
  import jax_moe
  x, w = jnp.ones((2, 64), jnp.bfloat16), jnp.ones((8, 64), jnp.bfloat16)
  fn = lambda x, w: jax_moe.route(x, 2, router_weight=w)  # noqa: E731

  def splits(n):
    jaxpr = jax.make_jaxpr(bench_route._forced("fused", bench_route._splits(n, fn)))(x, w)
    return [e.params["k_splits"] for e in jaxpr.eqns if "k_splits" in e.params]

  assert splits(3) == [3] and splits(17) == [17]
  assert jax_moe.heuristics.route_k_splits(64) == 1  # the override is not the default
  with pytest.raises(ValueError, match="k_splits"):
    splits(0)


@pytest.mark.parametrize("mode", ["dot", "reduce"])
def test_route_forced_block_select_reaches_the_primitive(mode):
  """bench_route's dot_block / reduce_block columns: the logits-path kernel is traced
  with block_select (the heuristic's default, off, in the plain columns)."""
  import bench_route
  import jax
  import jax.numpy as jnp
  import jax_moe
  x, w = jnp.ones((2, 64), jnp.bfloat16), jnp.ones((8, 64), jnp.bfloat16)
  fn = lambda x, w: jax_moe.route(x, 2, router_weight=w)  # noqa: E731

  def selects(f):
    jaxpr = jax.make_jaxpr(bench_route._forced(mode, f))(x, w)
    return [e.params["block_select"] for e in jaxpr.eqns if "block_select" in e.params]

  assert selects(bench_route._block(fn)) == [True]
  assert selects(fn) == [False]


def test_route_forced_fused_block_reaches_the_primitive():
  """bench_route's fused_block column: the router in the call, with block_select."""
  import bench_route
  import jax
  import jax.numpy as jnp
  import jax_moe
  x, w = jnp.ones((2, 64), jnp.bfloat16), jnp.ones((8, 64), jnp.bfloat16)
  fn = lambda x, w: jax_moe.route(x, 2, router_weight=w)  # noqa: E731
  eqns = [e for e in jax.make_jaxpr(bench_route._fused_block(fn))(x, w).eqns
          if "block_select" in e.params]
  assert len(eqns) == 1 and eqns[0].params["block_select"]
  assert eqns[0].invars[1].aval.shape == (8, 64)  # the router is the kernel's operand


def test_time_loop_program_computes_every_output():
  """The timing loop carries every call's whole output, so XLA cannot compute only
  the element that chains the calls (the old loop let XLA's own combine skip its
  work). After one iteration each carried output equals the op on its own set."""
  import jax.numpy as jnp
  import numpy as np
  r = np.random.default_rng(7)
  sets = [(jnp.asarray(r.normal(size=(5, 3, 64)), jnp.float32),
           jnp.asarray(r.normal(size=(5, 3)), jnp.float32)) for _ in range(3)]
  f = lambda y, w: jnp.einsum("tkh,tk->th", y, w)  # noqa: E731
  run = harness.loop_program(f, sets, 1, 1)
  outs = run(harness.loop_init(f, sets), sets)
  assert len(outs) == len(sets)
  for o, (y, w) in zip(outs, sets):
    np.testing.assert_allclose(np.asarray(o), np.asarray(f(y, w)), rtol=1e-5, atol=1e-6)
  assert harness.time_loop(f, sets, repeats=1, target_seconds=1e-3) >= 0.0


def test_moe_floor_counts_the_timed_trajectory():
  """bench_moe's floor counts the experts of the routings the timed chain runs: each
  layer routes the previous layer's normalized output, not the random inputs."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import bench_moe
  import jax_moe
  from jax_moe import moe as moe_lib
  from jax_moe.shapes import SHAPES

  ids = jnp.array([[3, 1], [1, 7], [7, 0]], jnp.int32)
  assert int(bench_moe.distinct_experts(ids, 8)) == 4
  shape = SHAPES["mixtral"].small_stand_in()
  config = moe_lib.MoEConfig.from_shape(shape)
  key = jax.random.PRNGKey(3)
  params = [moe_lib.example_params(jax.random.fold_in(key, i), shape, jnp.float32)
            for i in range(2)]
  x0 = jax.random.normal(jax.random.fold_in(key, 9), (2, shape.hidden), jnp.float32)
  n_layers, calls = 3, 7
  got = bench_moe.loop_distinct_experts(config, x0, params, n_layers, calls=calls)
  # The same chain replayed by hand: layer j uses params[(j % n_layers) % copies].
  x, want = x0, []
  for j in range(calls):
    p = params[(j % n_layers) % 2]
    ids = jax_moe.route(x, config.top_k, router_weight=p.router_weight,
                        **moe_lib._route_kwargs(p, config))[1]
    want.append(len(np.unique(np.asarray(ids))))
    x = bench_moe._rms(jax_moe.moe_block(x, p, config), x.dtype)
  assert got == pytest.approx(np.mean(want))
  assert bench_moe.floor_bytes(shape, 2.5, 2) == pytest.approx(
      2.5 * shape.expert_bytes(2) + shape.num_experts * shape.hidden * 2)


def test_moe_no_fold_shared_flag(tmp_path, monkeypatch):
  """--no-fold-shared sets heuristics.MOE_FOLD_SHARED_MAX_TOKENS and its _WIDE twin to
  0 for the run (the separate shared-expert call at every T) and the JSON records it."""
  import json
  import bench_moe
  from jax_moe import heuristics
  monkeypatch.setattr(heuristics, "MOE_FOLD_SHARED_MAX_TOKENS", 8)  # restored afterwards
  monkeypatch.setattr(heuristics, "MOE_FOLD_SHARED_MAX_TOKENS_WIDE", 16)
  args = ["--out", str(tmp_path), "--quick", "--shapes", "deepseek_v3", "--tokens", "1",
          "--impls", "auto", "--repeats", "1", "--calls", "1", "--max-copies", "1"]
  assert bench_moe.main(args + ["--no-fold-shared"]) == 0
  assert heuristics.MOE_FOLD_SHARED_MAX_TOKENS == 0
  assert heuristics.MOE_FOLD_SHARED_MAX_TOKENS_WIDE == 0
  with open(tmp_path / "moe.json") as f:
    h = json.load(f)["heuristics"]
    assert h["MOE_FOLD_SHARED_MAX_TOKENS"] == 0 and h["MOE_FOLD_SHARED_MAX_TOKENS_WIDE"] == 0
  monkeypatch.setattr(heuristics, "MOE_FOLD_SHARED_MAX_TOKENS", 8)
  monkeypatch.setattr(heuristics, "MOE_FOLD_SHARED_MAX_TOKENS_WIDE", 16)
  assert bench_moe.main(args) == 0
  with open(tmp_path / "moe.json") as f:
    h = json.load(f)["heuristics"]
    assert h["MOE_FOLD_SHARED_MAX_TOKENS"] == 8 and h["MOE_FOLD_SHARED_MAX_TOKENS_WIDE"] == 16


def test_moe_bias_scale_flag(tmp_path):
  """--bias-scale rescales the random correction bias (0: none): the routing's skew
  that bench_moe prints drops, and the JSON records the scale."""
  import json
  import bench_moe
  args = ["--out", str(tmp_path), "--quick", "--shapes", "deepseek_v3", "--tokens", "128",
          "--impls", "auto", "--repeats", "1", "--calls", "1", "--max-copies", "1"]
  busiest = {}
  for scale in ("0", "0.5"):
    assert bench_moe.main(args + ["--bias-scale", scale]) == 0
    with open(tmp_path / "moe.json") as f:
      d = json.load(f)
    assert d["bias_scale"] == float(scale)
    busiest[scale] = d["rows"][0]["busiest_over_mean_inputs"]
  assert busiest["0"] < busiest["0.5"]


def test_moe_priced_auto_timed_as_itself(tmp_path):
  """Where auto resolves to "priced" (gemv or a grouped branch per call) bench_moe
  times moe_block's auto program itself (no other row's time stands in for it) and
  records the branch it picks for each input set."""
  import json
  import bench_moe
  import jax.numpy as jnp
  from jax_moe import moe as moe_lib
  from jax_moe.shapes import SHAPES
  shape = SHAPES["deepseek_v3"].small_stand_in()
  assert moe_lib.resolve(moe_lib.MoEConfig.from_shape(shape), 128, shape.hidden,
                         shape.intermediate) == ("priced", "capacity")
  args = ["--out", str(tmp_path), "--quick", "--shapes", "deepseek_v3", "--tokens", "128",
          "--impls", "auto", "--repeats", "1", "--calls", "2", "--max-copies", "1"]
  assert bench_moe.main(args) == 0
  with open(tmp_path / "moe.json") as f:
    rows = json.load(f)["rows"]
  assert [r["impl"] for r in rows] == ["auto"]
  assert rows[0]["resolved"] == "priced:capacity" and rows[0]["us"] > 0
  assert len(rows[0]["priced_picks_inputs"]) == rows[0]["calls_per_program"]
  names = moe_lib._priced_plan(jnp.zeros((128, shape.top_k), jnp.int32), shape.num_experts,
                               shape.hidden, shape.intermediate, "capacity")[0]
  assert set(rows[0]["priced_picks_inputs"]) <= set(names)


@pytest.mark.parametrize("bad", ["-0.1", "nan", "inf"])
def test_moe_bias_scale_refused(tmp_path, capsys, bad):
  """A negative or non-finite --bias-scale is refused naming the option."""
  import bench_moe
  with pytest.raises(SystemExit) as e:
    bench_moe.main(["--out", str(tmp_path), "--quick", "--bias-scale", bad])
  assert e.value.code == 2
  assert "--bias-scale" in capsys.readouterr().err


def _trace_chain():
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "scripts"))
  import trace_chain
  return trace_chain


def test_trace_chain_layer_table():
  """Cycles run from one routing kernel to the next; per position: mean duration and
  the idle time before it; a cycle with an extra event (the loop's own, once per
  step) is counted apart, with its extra time."""
  tc = _trace_chain()
  stream = "void jax_moe::cuda::gemv_stream_kernel<__nv_bfloat16, 3, 768, false>(GemvStreamArgs)"
  layer = [(stream, 30.0, 0.5), ("combine_kernel<bf16>(CombineArgs, long, long)", 3.0, -1.0),
           ("input_reduce_fusion_8", 2.0, 0.25), ("route_logits_kernel(RouteArgs)", 2.5, 0.125)]
  events, t = [], 0.0
  for step in range(4):
    for _ in range(3):
      for name, dur, gap in layer:
        t += gap
        events.append((t * 1e3, (t + dur) * 1e3, name))
        t += dur
    t += 1.0
    events.append((t * 1e3, (t + 4.0) * 1e3, "memcpy_DtoH"))  # the loop's own
    t += 4.0
  rows, period, busy, n_other, extra = tc.layer_table(events)
  assert [r[0] for r in rows] == ["route_logits_kernel", "gemv_stream_kernel",
                                  "combine_kernel", "input_reduce_fusion_8"]
  for (name, dur, gap), (_, want_dur, want_gap) in zip(rows, layer[3:] + layer[:3]):
    assert dur == pytest.approx(want_dur) and gap == pytest.approx(want_gap)
  assert period == pytest.approx(sum(d + g for _, d, g in layer))
  assert busy == pytest.approx(37.5)
  assert n_other == 3 and extra == pytest.approx(5.0)  # 1 us idle + the 4 us copy
  assert tc.layer_table(events[:3]) == ([], 0.0, 0.0, 0, 0.0)  # no whole cycle
  # With routing, the route kernel anchors the layer, even where a second experts
  # kernel (unfolded shared experts) runs in it.
  shared = "void jax_moe::cuda::gemv_mma_kernel<__nv_bfloat16, 1, true, 8, true>(P)"
  layer = [("route_logits_kernel(RouteArgs)", 2.5, 0.25), (stream, 30.0, 0.125),
           ("combine_kernel<float>(CombineArgs)", 3.0, -1.0), (shared, 4.0, 0.5)]
  events, t = [], 0.0
  for _ in range(5):
    for name, dur, gap in layer:
      t += gap
      events.append((t * 1e3, (t + dur) * 1e3, name))
      t += dur
  rows, period, busy, n_other, extra = tc.layer_table(events)
  assert [r[0] for r in rows] == ["route_logits_kernel", "gemv_stream_kernel",
                                  "combine_kernel", "gemv_mma_kernel"]
  assert period == pytest.approx(sum(d + g for _, d, g in layer)) and n_other == 0


def test_trace_chain_without_gpu(capsys):
  """On CPU the trace has no GPU stream (no events) and main() says so."""
  import jax
  import jax.numpy as jnp
  tc = _trace_chain()
  if jax.devices()[0].platform == "gpu":
    pytest.skip("the CPU path")
  assert tc.trace(jax.jit(lambda a: jnp.sin(a) * 2), (jnp.ones(8),), 1) == []
  assert tc.main([]) == 0
  assert "no GPU" in capsys.readouterr().out


def test_trace_chain_impl_fields():
  """--impls entries become MoEConfig fields that MoEConfig accepts, and moe_block
  runs under them (here on the CPU)."""
  import dataclasses
  import jax
  import jax.numpy as jnp
  from jax_moe import moe as moe_lib
  tc = _trace_chain()
  assert tc.impl_fields("auto") == dict(implementation="auto", grouped_method="auto")
  assert tc.impl_fields("grouped:capacity") == dict(implementation="grouped",
                                                    grouped_method="capacity")
  from jax_moe.shapes import SHAPES
  shape = SHAPES["tiny"]
  params = moe_lib.example_params(jax.random.PRNGKey(0), shape, jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, shape.hidden), jnp.float32)
  base = moe_lib.MoEConfig.from_shape(shape)
  want = moe_lib.moe_block(x, params, dataclasses.replace(base, implementation="reference"))
  for impl in ("auto", "gemv", "grouped:dense", "grouped:capacity"):
    cfg = dataclasses.replace(base, **tc.impl_fields(impl))
    np.testing.assert_allclose(np.asarray(moe_lib.moe_block(x, params, cfg)), np.asarray(want),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("args,match", [
    (["--layers", "0"], "--layers must be at least 1"),
    (["--steps", "-1"], "--steps must be at least 1"),
    (["--tokens", "1", "0"], "--tokens must be at least 1"),
    (["--shapes", "nope"], "--shapes"),
    (["--chains", "other"], "--chains"),
    (["--impls", "foo"], "--impls: unknown 'foo'"),
    (["--impls", "auto", "grouped:nope"], "--impls: unknown 'grouped:nope'"),
    (["--impls", "gemv:dense"], "--impls: unknown 'gemv:dense'"),
])
def test_trace_chain_bad_args(capsys, args, match):
  """Bad options are refused by name before any tracing (on CPU too)."""
  tc = _trace_chain()
  with pytest.raises(SystemExit) as e:
    tc.main(args)
  assert e.value.code == 2
  assert match in capsys.readouterr().err


def test_gpu_check_trace_stage(tmp_path):
  """gpu_check.sh's trace stage runs scripts/trace_chain.py with TRACE_ARGS: a bad
  argument fails the stage (and the script), a good one passes (no GPU: it says so)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = os.path.join(root, "scripts", "gpu_check.sh")

  def run(trace_args, out):
    env = dict(os.environ, TRACE_ARGS=trace_args, PYTHON=sys.executable)
    return subprocess.run(["bash", script, str(out), "trace"], capture_output=True, text=True,
                          env=env, timeout=300)

  bad = run("--layers 0", tmp_path / "bad")
  assert bad.returncode != 0
  assert "trace_chain: FAILED" in (tmp_path / "bad" / "summary.txt").read_text()
  assert "--layers must be at least 1" in (tmp_path / "bad" / "trace_chain.log").read_text()
  good = run("--shapes gemma4 --tokens 1", tmp_path / "good")
  assert good.returncode == 0, good.stdout + good.stderr
  assert "trace_chain: ok" in (tmp_path / "good" / "summary.txt").read_text()


def test_gpu_check_combine_probe_stage(tmp_path):
  """gpu_check.sh's combine-probe stage runs scripts/combine_xla_probe.py with the
  PROBE_* variables (here on the CPU, tiny): its table and bitwise column reach the
  log; a bad PROBE_TOKENS / PROBE_SETS / PROBE_FORMS fails the stage and the script
  with an error that names the variable."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = os.path.join(root, "scripts", "gpu_check.sh")

  def run(tokens, out, sets="2", forms="ref_unrolled,reduce_sum,idx_ref,idx_mask_reduce",
          **extra):
    env = {n: v for n, v in os.environ.items() if n != "PROBE_HLO_DIR"}
    env.update(PYTHON=sys.executable, PROBE_TOKENS=tokens, PROBE_SETS=sets,
               PROBE_FORMS=forms, **extra)
    return subprocess.run(["bash", script, str(out), "combine-probe"], capture_output=True,
                          text=True, env=env, timeout=600)

  hlo = tmp_path / "hlo"  # PROBE_HLO_DIR: the compiled HLO (one file per form and H at T=1)
  good = run("1", tmp_path / "good", PROBE_HLO_DIR=str(hlo))
  assert good.returncode == 0, good.stdout + good.stderr
  assert "combine_xla_probe: ok" in (tmp_path / "good" / "summary.txt").read_text()
  assert sorted(p.name for p in hlo.iterdir()) == sorted(
      f"combine_{f}_H{H}.hlo.txt" for f in ("ref_unrolled", "reduce_sum", "idx_ref",
                                            "idx_mask_reduce") for H in (7168, 2816))
  assert not (tmp_path / "good" / "combine_probe_hlo").exists()
  log = (tmp_path / "good" / "combine_probe.log").read_text()
  assert "dense form: H T sets ref_unrolled reduce_sum" in log
  assert "index form: H T sets idx_ref idx_mask_reduce" in log
  rows = [l for l in log.splitlines() if l.startswith(("7168 1 ", "2816 1 "))]
  assert len(rows) == 4 and all("| =" in l for l in rows), log  # each form vs itself
  for name, kw, match in [("tokens", dict(tokens="one"), "PROBE_TOKENS must be"),
                          ("zero", dict(tokens="1,0"), "PROBE_TOKENS must be"),
                          ("sets", dict(tokens="1", sets="x"), "PROBE_SETS must be"),
                          ("forms", dict(tokens="1", forms="reduce_sum,nope"),
                           "PROBE_FORMS names unknown formulations ['nope']")]:
    bad = run(out=tmp_path / name, **kw)
    assert bad.returncode != 0
    assert "combine_xla_probe: FAILED" in (tmp_path / name / "summary.txt").read_text()
    assert match in (tmp_path / name / "combine_probe.log").read_text()


def test_merge_moe_keeps_priced_auto(tmp_path):
  """merge_moe derives "auto" from the row of the implementation it resolves to, but
  a "priced" auto is its own program: its measured row is kept, not derived."""
  import json
  import merge_moe
  from jax_moe import moe as moe_lib
  from jax_moe.shapes import SHAPES
  ds = SHAPES["deepseek_v3"]
  assert moe_lib.resolve(moe_lib.MoEConfig.from_shape(ds), 128, ds.hidden,
                         ds.intermediate) == ("priced", "capacity")
  base = dict(floor_us=100.0)
  run1 = dict(device="gpu:test", read_bandwidth_Bps=3e12, rows=[
      dict(base, shape="deepseek_v3", T=128, impl="auto", resolved="priced:capacity", us=170.0),
      dict(base, shape="deepseek_v3", T=128, impl="gemv", us=180.0)])
  run2 = dict(device="gpu:test", read_bandwidth_Bps=3e12, rows=[
      dict(base, shape="gemma4", T=1, impl="auto", resolved="gemv", us=999.0),
      dict(base, shape="gemma4", T=1, impl="gemv", us=150.0)])
  paths = []
  for i, run in enumerate((run1, run2)):
    paths.append(str(tmp_path / f"run{i}.json"))
    with open(paths[-1], "w") as f:
      json.dump(run, f)
  assert merge_moe.main([str(tmp_path / "out"), *paths]) == 0
  with open(tmp_path / "out" / "moe.json") as f:
    rows = json.load(f)["rows"]
  auto = {(r["shape"], r["T"]): r for r in rows if r["impl"] == "auto"}
  assert len([r for r in rows if r["impl"] == "auto"]) == 2
  assert auto[("deepseek_v3", 128)]["us"] == 170.0  # measured, not gemv's 180
  assert auto[("deepseek_v3", 128)]["resolved"] == "priced:capacity"
  assert auto[("gemma4", 1)]["us"] == 150.0  # derived from gemv's row


def test_benchmarks_refuse_fallbacks_on_gpu(monkeypatch, capsys):
  """On a GPU without jax_moe's CUDA extension the benchmarks exit instead of timing
  the jnp fallbacks as ours (run s16-4 did); JAX_MOE_BENCH_ALLOW_FALLBACK=1 allows it.
  With the extension, or on CPU, they run."""
  import types
  import jax
  import jax_moe
  gpu = [types.SimpleNamespace(platform="gpu", device_kind="fake")]
  info = dict(jax_moe.build_info(), cuda_targets=[], errors={})
  monkeypatch.setattr(jax, "devices", lambda *a: gpu)
  monkeypatch.setattr(jax_moe, "build_info", lambda: info)
  monkeypatch.delenv("JAX_MOE_BENCH_ALLOW_FALLBACK", raising=False)
  with pytest.raises(SystemExit, match="bench_x: .*CUDA extension is not loaded"):
    harness.require_kernels("bench_x")
  monkeypatch.setenv("JAX_MOE_BENCH_ALLOW_FALLBACK", "1")
  harness.require_kernels("bench_x")
  assert "timing the jnp fallbacks" in capsys.readouterr().err
  monkeypatch.delenv("JAX_MOE_BENCH_ALLOW_FALLBACK")
  info["cuda_targets"] = ["jax_moe_route"]
  harness.require_kernels("bench_x")  # built: runs
  monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(platform="cpu")])
  info["cuda_targets"] = []
  harness.require_kernels("bench_x")  # CPU: the CPU handlers are ours
  for bad in ("yes", "true", ""):  # refused by name, on any device
    monkeypatch.setenv("JAX_MOE_BENCH_ALLOW_FALLBACK", bad)
    with pytest.raises(SystemExit, match="JAX_MOE_BENCH_ALLOW_FALLBACK must be 0 or 1"):
      harness.require_kernels("bench_x")


@pytest.mark.parametrize("stage,name,var", [("split-probe", "split_probe", "SPLIT_PROBE_ARGS"),
                                            ("group-probe", "group_probe", "GROUP_PROBE_ARGS")])
def test_gpu_check_probe_stage(tmp_path, stage, name, var):
  """gpu_check.sh's probe stages build scripts/NAME.cu and run it with their
  arguments variable; a bad argument (checked before any CUDA call, so no GPU is
  needed) fails the stage and the script, and the probe's message reaches the log."""
  import shutil
  if shutil.which("nvcc") is None:
    pytest.skip("nvcc not found")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = os.path.join(root, "scripts", "gpu_check.sh")
  env = dict(os.environ, PYTHON=sys.executable, **{var: "bogus 1"})
  p = subprocess.run(["bash", script, str(tmp_path), stage], capture_output=True,
                     text=True, env=env, timeout=600)
  assert p.returncode != 0
  assert f"{name}: FAILED" in (tmp_path / "summary.txt").read_text()
  assert "unknown shape 'bogus'" in (tmp_path / f"{name}.log").read_text()