"""The benchmark scripts' own option parsing (their measurements run on a GPU)."""

import os
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
