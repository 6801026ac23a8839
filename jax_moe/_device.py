"""Device questions answered at trace time (for heuristics and benchmarks).

Uses cuda-python (`cuda.bindings`, the optional `[cuda]` extra) when it is installed
and a GPU is visible; otherwise returns `None`, and callers use defaults. Nothing
here is needed for correctness.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceInfo:
  name: str
  compute_capability: tuple[int, int]
  sm_count: int
  l2_bytes: int


@functools.lru_cache(maxsize=None)
def cuda_device_info(ordinal: int = 0) -> DeviceInfo | None:
  """Properties of CUDA device `ordinal`, or None without cuda-python or a GPU."""
  try:
    from cuda.bindings import runtime as cudart
  except Exception:
    return None
  try:
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count <= ordinal:
      return None
    err, prop = cudart.cudaGetDeviceProperties(ordinal)
    if err != cudart.cudaError_t.cudaSuccess:
      return None
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return DeviceInfo(name=name.rstrip("\x00"),
                      compute_capability=(int(prop.major), int(prop.minor)),
                      sm_count=int(prop.multiProcessorCount),
                      l2_bytes=int(prop.l2CacheSize))
  except Exception:
    return None


def sm_count(default: int = 132) -> int:
  info = cuda_device_info()
  return info.sm_count if info is not None else default


def l2_bytes(default: int = 50 * 2**20) -> int:
  info = cuda_device_info()
  return info.l2_bytes if info is not None else default
