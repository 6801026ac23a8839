"""Shared fixtures: the `platform` fixture runs a test on the CPU and, where a GPU
is present, again on the GPU (skipped otherwise)."""

from __future__ import annotations

import jax
import pytest


def gpu_available() -> bool:
  try:
    return len(jax.devices("gpu")) > 0
  except RuntimeError:
    return False


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def platform(request):
  """Runs the test with jax's default device set to this platform."""
  if request.param == "gpu" and not gpu_available():
    pytest.skip("no GPU")
  device = jax.devices(request.param)[0]
  with jax.default_device(device):
    yield request.param


def clear_traces() -> None:
  """Drop every cached trace and compilation: a jitted function (jax.jit(moe_block),
  moe._grouped_op's cached ops) is traced once per shape, so a heuristic changed
  afterwards would otherwise not reach it."""
  from jax_moe import moe
  jax.clear_caches()
  moe._grouped_op.cache_clear()


@pytest.fixture
def set_heuristic(monkeypatch):
  """set_heuristic(name, value): a jax_moe.heuristics constant for this test only,
  with cached traces dropped when it is set and again when it is restored (so no
  later test runs a program traced under the changed value)."""
  from jax_moe import heuristics

  def set_(name, value):
    assert hasattr(heuristics, name), name
    monkeypatch.setattr(heuristics, name, value)
    clear_traces()

  yield set_
  monkeypatch.undo()
  clear_traces()
