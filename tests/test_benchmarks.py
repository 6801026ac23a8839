"""The benchmark and GPU-check scripts' own option parsing (their measurements run on
a GPU)."""

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import bench_gemv  # noqa: E402


def test_gemv_config_specs():
  assert bench_gemv.parse_config("4") == dict(kernel_variant=4)
  assert bench_gemv.parse_config("1:gu4:d8:nt2") == dict(
      kernel_variant=1, k_split_gate_up=4, k_split_down=8, token_tiles=2)


@pytest.mark.parametrize("spec", ["x", "4:zz2", "4:gu", ""])
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
