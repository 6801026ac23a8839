"""jax_moe under shard_map on 4 host CPU devices (DESIGN.md: moe_block jits "under
shard_map"): moe_block with the tokens sharded (each implementation, f32 and bf16,
a scan decode loop), route with the ids compared exactly, plain jit of a sharded x
(GSPMD), and README's expert-parallel recipe (the experts sharded, ids shifted so
that other shards' experts are out of range, psum). The cases run in one fresh
process (tests/shard_map_worker.py), since the device count must be set before jax
starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ("qwen3", "deepseek_v3", "gemma4")
DATA_PARALLEL = [f"data_parallel-{n}-{i}-{m}-{d}" for n in NAMES
                 for i, m in (("auto", "auto"), ("gemv", "auto"), ("grouped", "capacity"),
                              ("grouped", "dense"))
                 for d in ("float32", "bfloat16")]
EXPERT_PARALLEL = ([f"expert_parallel-{n}-{d}" for n in NAMES for d in ("float32", "bfloat16")]
                   + ["expert_parallel-mixtral-float32"])
OTHER = [f"{kind}-{n}" for kind in ("scan", "route", "gspmd") for n in NAMES]


@pytest.fixture(scope="module")
def results():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, os.path.join(HERE, "shard_map_worker.py")],
                     capture_output=True, text=True, timeout=900, env=env)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
  return {r["case"]: r for r in rows}


def test_worker_ran_every_case(results):
  assert sorted(results) == sorted(DATA_PARALLEL + EXPERT_PARALLEL + OTHER)


@pytest.mark.parametrize("case", DATA_PARALLEL + EXPERT_PARALLEL + OTHER)
def test_sharded_matches_reference(results, case):
  r = results[case]
  assert "error" not in r, r["error"]
  assert r["shape_ok"]
  assert r["err"] <= r["tol"], f"{case}: relative error {r['err']:.3g} > {r['tol']:.3g}"
  if case.startswith("route-"):
    assert r["ids_equal"], f"{case}: sharded routing chose other experts"
