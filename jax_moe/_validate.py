"""Trace-time argument checks shared by the public functions. Each error names the
argument it is about, so a caller can tell what to fix."""

from __future__ import annotations

import operator

import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def as_int(value, name: str, fn: str) -> int:
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{fn}: {name} must be an int, got a bool")
  try:
    return operator.index(value)
  except TypeError:
    raise TypeError(f"{fn}: {name} must be a Python int, got {type(value).__name__}") from None


def check_float_dtype(x, name: str, fn: str) -> None:
  if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
    raise TypeError(f"{fn}: {name} must be float32, bfloat16 or float16, got {x.dtype}")


def check_rank(x, rank: int, name: str, fn: str, layout: str) -> None:
  if x.ndim != rank:
    raise ValueError(f"{fn}: {name} must have rank {rank} {layout}, got shape {tuple(x.shape)}")


def check_choice(value, choices, name: str, fn: str) -> None:
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{fn}: {name} must be one of {sorted(choices)}, got {value!r}")
