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


def check_routing_counts(E: int, top_k, num_groups, top_groups, fn: str,
                         e_name: str = "E") -> tuple[int, int, int]:
  """top_k, num_groups, top_groups as ints, checked against E experts (named e_name
  in messages): 1 <= top_k <= E, num_groups divides E, 1 <= top_groups <= num_groups,
  and top_k experts available in top_groups groups."""
  top_k = as_int(top_k, "top_k", fn)
  num_groups = as_int(num_groups, "num_groups", fn)
  top_groups = as_int(top_groups, "top_groups", fn)
  if not 1 <= top_k <= E:
    raise ValueError(f"{fn}: top_k must be in [1, {e_name}={E}], got {top_k}")
  if num_groups < 1 or E % num_groups:
    raise ValueError(f"{fn}: num_groups must be >= 1 and divide {e_name}={E}, got {num_groups}")
  if not 1 <= top_groups <= num_groups:
    raise ValueError(f"{fn}: top_groups must be in [1, num_groups={num_groups}], got {top_groups}")
  if top_k > top_groups * (E // num_groups):
    raise ValueError(f"{fn}: top_k={top_k} exceeds the {top_groups * (E // num_groups)} experts "
                     f"available in top_groups={top_groups} groups of {E // num_groups}")
  return top_k, num_groups, top_groups
