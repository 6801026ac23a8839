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
