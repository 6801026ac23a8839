"""jax_moe.moe_block: a whole MoE layer as one call.

out = moe_block(x, params, config)

x [..., H] (leading dims fold into tokens); params: MoEParams; config: MoEConfig.
route (router matmul fused) -> routed experts -> combine (the routing weights are
applied in combine, f32 accumulation) -> + shared experts (weight 1). The output
has x's dtype and shape.

config.implementation picks the experts' path:
  "gemv"       jax_moe.expert_gemv_combine (decode-size T): the experts and the
               weighted sum in one call (one custom call on GPU).
  "grouped"    a large-batch path behind one function, _grouped_experts, that a
               tensor-core grouped-matmul kernel can replace; today it is one of
               several XLA formulations (config.grouped_method).
  "reference"  pure jnp in f32 with the kernels' rounding points: the test oracle.
  "auto"       gemv or grouped by heuristics.moe_implementation (a cost model).

Rounding points (all paths): the activated intermediate is rounded to x's dtype
before the down projection; each expert output row (routed or shared) is rounded
to x's dtype; the weighted sum over the k routed rows plus the shared rows is f32;
one final rounding to x's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap

from jax_moe import _codes, heuristics, reference
from jax_moe._validate import FLOAT_DTYPES, as_int, check_choice, check_routing_counts
from jax_moe.combine import combine
from jax_moe.expert_gemv import expert_gemv, expert_gemv_combine
from jax_moe.route import route

IMPLEMENTATIONS = ("auto", "gemv", "grouped", "reference")
GROUPED_METHODS = ("auto", "ragged_dot", "dense", "gather", "capacity")


# ---- configuration -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Static description of an MoE layer (hashable; a pytree with no leaves, so it
  can be passed straight through jax.jit).

  num_experts, top_k: E and k. activation: "silu" | "gelu_tanh" | "gelu" (the
  routed and the shared experts). scoring, renormalize, num_groups, top_groups,
  group_score, scaling_factor: as jax_moe.route. num_shared_experts: S experts that
  every token runs with weight 1 (DeepSeek/Qwen style). implementation: "auto" |
  "gemv" | "grouped" | "reference". grouped_method: the XLA formulation of the
  grouped path, "auto" (heuristics.moe_grouped_method) | "ragged_dot" | "dense" |
  "gather" | "capacity".
  """
  num_experts: int
  top_k: int
  activation: str = "silu"
  scoring: str = "softmax"
  renormalize: bool = True
  num_groups: int = 1
  top_groups: int = 1
  group_score: str = "top2_sum"
  scaling_factor: float = 1.0
  num_shared_experts: int = 0
  implementation: str = "auto"
  grouped_method: str = "auto"

  def __post_init__(self):
    fn = "MoEConfig"
    E = as_int(self.num_experts, "num_experts", fn)
    S = as_int(self.num_shared_experts, "num_shared_experts", fn)
    if E < 1:
      raise ValueError(f"{fn}: num_experts must be >= 1, got {E}")
    k, G, TG = check_routing_counts(E, self.top_k, self.num_groups, self.top_groups, fn,
                                    "num_experts")
    if S < 0:
      raise ValueError(f"{fn}: num_shared_experts must be >= 0, got {S}")
    check_choice(self.activation, _codes.ACTIVATION, "activation", fn)
    check_choice(self.scoring, _codes.SCORING, "scoring", fn)
    check_choice(self.group_score, _codes.GROUP_SCORE, "group_score", fn)
    check_choice(self.implementation, IMPLEMENTATIONS, "implementation", fn)
    check_choice(self.grouped_method, GROUPED_METHODS, "grouped_method", fn)
    if not isinstance(self.renormalize, (bool, np.bool_)):
      raise TypeError(f"{fn}: renormalize must be a bool, got {type(self.renormalize).__name__}")
    try:
      sf = float(self.scaling_factor)
    except (TypeError, ValueError):
      raise TypeError(f"{fn}: scaling_factor must be a float, got "
                      f"{type(self.scaling_factor).__name__}") from None
    if not math.isfinite(sf):
      raise ValueError(f"{fn}: scaling_factor must be finite, got {sf}")
    # Normalize to plain Python types so equal configs hash equal (jit cache keys).
    for name, v in (("num_experts", E), ("top_k", k), ("num_groups", G), ("top_groups", TG),
                    ("num_shared_experts", S), ("renormalize", bool(self.renormalize)),
                    ("scaling_factor", sf)):
      object.__setattr__(self, name, v)

  @classmethod
  def from_shape(cls, shape, **overrides) -> "MoEConfig":
    """The config of a named model shape (a jax_moe.shapes.MoEShape or its name in
    shapes.SHAPES), with any field overridden, e.g. implementation="gemv"."""
    shape = _shape(shape, "MoEConfig.from_shape")
    fields = dict(num_experts=shape.num_experts, top_k=shape.top_k,
                  activation=shape.activation, scoring=shape.scoring,
                  renormalize=shape.renormalize, num_groups=shape.num_groups,
                  top_groups=shape.top_groups, group_score=shape.group_score,
                  scaling_factor=shape.scaling_factor,
                  num_shared_experts=shape.num_shared_experts)
    fields.update(overrides)
    return cls(**fields)

  def replace(self, **changes) -> "MoEConfig":
    return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    MoEConfig, data_fields=[], meta_fields=[f.name for f in dataclasses.fields(MoEConfig)])


# ---- parameters ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MoEParams:
  """The arrays of one MoE layer (a pytree; None for absent optional parts).

  router_weight    [E, H]        x's dtype
  w_gate_up        [E, 2I, H]    x's dtype; per expert gate rows then up rows
  w_down           [E, H, I]     x's dtype
  correction_bias  [E] f32       or None (sigmoid routing's selection bias)
  expert_scale     [E] f32       or None (per-expert weight multiplier)
  shared_gate_up   [S, 2I_s, H]  x's dtype, or None
  shared_down      [S, H, I_s]   x's dtype, or None

  Every weight is in the [out, in] layout of torch/HF checkpoints, so loading is a
  stack, never a transpose.

  Shared experts use the routed experts' per-expert layout rather than one wide
  [S*2I_s, H] / [H, S*I_s] MLP, because:
  - at decode they run through the same expert_gemv launch design as the routed
    experts (ids 0..S-1 for every token): a GEMV kernel tuned to read each weight
    byte once, where XLA's dot at T=1..64 is a generic cuBLAS GEMV;
  - at prefill nothing is lost: [S, 2I_s, H] reshapes for free to [S*2I_s, H], one
    tensor-core matmul, and the down projection is one batched matmul over S;
  - a wide HF shared MLP (DeepSeek/Qwen store S shared experts as one MLP of
    intermediate S*I_s) is the same function split into S blocks of I_s
    intermediate units, which params_from_hf does once at load time.
  """
  router_weight: Any
  w_gate_up: Any
  w_down: Any
  correction_bias: Any = None
  expert_scale: Any = None
  shared_gate_up: Any = None
  shared_down: Any = None

  @property
  def num_experts(self) -> int:
    return self.w_gate_up.shape[0]

  @property
  def hidden(self) -> int:
    return self.w_gate_up.shape[2]

  @property
  def intermediate(self) -> int:
    return self.w_gate_up.shape[1] // 2

  @property
  def dtype(self):
    return self.w_gate_up.dtype

  def replace(self, **changes) -> "MoEParams":
    return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    MoEParams, data_fields=[f.name for f in dataclasses.fields(MoEParams)], meta_fields=[])


def _normal(key, shape, dtype, fan_in):
  # std 1/sqrt(fan_in): unit-variance inputs give unit-variance matmul outputs.
  scale = 1.0 / math.sqrt(max(fan_in, 1))
  draw = lambda k, s: (jax.random.normal(k, s, jnp.float32) * scale).astype(dtype)  # noqa: E731
  if len(shape) < 3 or shape[0] <= 1:
    return draw(key, shape)
  # One expert at a time: a big layer's f32 draw (DeepSeek-V3: 30 GB) never exists whole.
  return jax.lax.map(lambda k: draw(k, shape[1:]), jax.random.split(key, shape[0]))


def init_router(key, shape, dtype=jnp.float32):
  """router_weight [E, H]: logits ~ N(0, 1) for unit-variance x."""
  return _normal(key, shape, dtype, shape[-1])


def init_gate_up(key, shape, dtype=jnp.float32):
  """[E, 2I, H]: gate and up pre-activations ~ N(0, 1) for unit-variance x."""
  return _normal(key, shape, dtype, shape[-1])


def init_down(key, shape, dtype=jnp.float32):
  """[E, H, I]: each expert's output is O(1) (its GLU intermediate has variance < 1)."""
  return _normal(key, shape, dtype, shape[-1])


def init_params(key, config: MoEConfig, hidden: int, intermediate: int, *,
                shared_intermediate: int = 0, dtype=jnp.float32, correction_bias: bool = False,
                expert_scale: bool = False) -> MoEParams:
  """Freshly initialized parameters: O(1) outputs for O(1) inputs. correction_bias
  starts at 0 and expert_scale at 1 (neutral), as in training from scratch."""
  E, H, I, S = config.num_experts, hidden, intermediate, config.num_shared_experts
  if S and shared_intermediate < 1:
    raise ValueError(f"init_params: config.num_shared_experts={S} needs shared_intermediate "
                     f">= 1, got {shared_intermediate}")
  k = jax.random.split(key, 5)
  return MoEParams(
      router_weight=init_router(k[0], (E, H), dtype),
      w_gate_up=init_gate_up(k[1], (E, 2 * I, H), dtype),
      w_down=init_down(k[2], (E, H, I), dtype),
      correction_bias=jnp.zeros((E,), jnp.float32) if correction_bias else None,
      expert_scale=jnp.ones((E,), jnp.float32) if expert_scale else None,
      shared_gate_up=init_gate_up(k[3], (S, 2 * shared_intermediate, H), dtype) if S else None,
      shared_down=init_down(k[4], (S, H, shared_intermediate), dtype) if S else None)


def _shape(shape, fn):
  if isinstance(shape, str):
    from jax_moe.shapes import SHAPES
    if shape not in SHAPES:
      raise ValueError(f"{fn}: unknown shape {shape!r}; known: {sorted(SHAPES)}")
    return SHAPES[shape]
  return shape


# Standard deviation of example_params' random correction_bias. A random bias is not
# a trained one (which balances the load): with this one, DeepSeek-V3's routing of
# N(0, 1) inputs sends the busiest expert about 10x the mean assignments (RESULTS.md,
# session 15); bench_moe --bias-scale rescales it.
EXAMPLE_BIAS_SCALE = 0.1


def example_params(key, shape, dtype=jnp.bfloat16) -> MoEParams:
  """Random parameters for a jax_moe.shapes.MoEShape or its name (demos, tests,
  benchmarks): init_params, plus a non-trivial correction_bias / expert_scale where
  the model has one, so those code paths change the result."""
  shape = _shape(shape, "example_params")
  config = MoEConfig.from_shape(shape)
  k1, k2, k3 = jax.random.split(key, 3)
  p = init_params(k1, config, shape.hidden, shape.intermediate,
                  shared_intermediate=shape.shared_intermediate, dtype=dtype)
  E = shape.num_experts
  if shape.correction_bias:  # comparable to the spread of sigmoid scores
    p = p.replace(correction_bias=EXAMPLE_BIAS_SCALE * jax.random.normal(k2, (E,), jnp.float32))
  if shape.expert_scale:
    p = p.replace(expert_scale=jax.random.uniform(k3, (E,), jnp.float32, 0.5, 1.5))
  return p


def _stack(arrays, name: str, fn: str):
  """Stack a list of per-expert arrays (host numpy stays on the host: one copy)."""
  if hasattr(arrays, "ndim") and arrays.ndim == 3:
    return arrays
  arrays = list(arrays)
  if not arrays:
    raise ValueError(f"{fn}: {name} is empty")
  shapes = {tuple(a.shape) for a in arrays}
  if len(shapes) != 1 or len(next(iter(shapes))) != 2:
    raise ValueError(f"{fn}: {name} must be a list of equal-shape 2-D arrays, got shapes "
                     f"{sorted(shapes)}")
  if all(isinstance(a, np.ndarray) for a in arrays):
    return np.stack(arrays)
  return jnp.stack([jnp.asarray(a) for a in arrays])


def _cat(parts, axis):
  if all(isinstance(a, np.ndarray) for a in parts):
    return np.concatenate(parts, axis=axis)
  return jnp.concatenate([jnp.asarray(a) for a in parts], axis=axis)


def params_from_hf(router_weight, gate_proj, up_proj, down_proj, *, correction_bias=None,
                   expert_scale=None, shared_gate_proj=None, shared_up_proj=None,
                   shared_down_proj=None, num_shared_experts: int = 1, dtype=None) -> MoEParams:
  """MoEParams from Hugging Face-style tensors ([out, in] torch layout).

  router_weight: the gate/router Linear weight [E, H].
  gate_proj, up_proj: per expert [I, H] (a list of E arrays, or stacked [E, I, H]).
  down_proj: per expert [H, I] (a list, or stacked [E, H, I]).
  shared_gate_proj, shared_up_proj [S*I_s, H] and shared_down_proj [H, S*I_s]: the
    shared experts as HF stores them, one wide MLP; split into num_shared_experts
    blocks of I_s intermediate units (the same function). A list of S per-expert
    arrays is accepted too.
  dtype: cast the weights (default: keep router_weight's dtype); correction_bias
    and expert_scale [E] become float32.

  The stacking happens once, here (numpy inputs are stacked on the host), so the
  layer never transposes at run time.
  """
  fn = "params_from_hf"
  gate = _stack(gate_proj, "gate_proj", fn)
  up = _stack(up_proj, "up_proj", fn)
  down = _stack(down_proj, "down_proj", fn)
  router = router_weight
  if len(router.shape) != 2:
    raise ValueError(f"{fn}: router_weight must be [E, H], got shape {tuple(router.shape)}")
  E, H = router.shape
  if gate.shape[0] != E or gate.shape[2] != H:
    raise ValueError(f"{fn}: gate_proj must be E={E} arrays of [I, H={H}], got stacked shape "
                     f"{tuple(gate.shape)}")
  if up.shape != gate.shape:
    raise ValueError(f"{fn}: up_proj stacked shape {tuple(up.shape)} must equal gate_proj's "
                     f"{tuple(gate.shape)}")
  I = gate.shape[1]
  if tuple(down.shape) != (E, H, I):
    raise ValueError(f"{fn}: down_proj must be E={E} arrays of [H={H}, I={I}], got stacked "
                     f"shape {tuple(down.shape)}")
  dtype = jnp.dtype(router.dtype if dtype is None else dtype)
  cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
  vec = lambda v: None if v is None else jnp.asarray(v, jnp.float32)  # noqa: E731

  sgu = sd = None
  shared = (shared_gate_proj, shared_up_proj, shared_down_proj)
  if any(a is not None for a in shared):
    if any(a is None for a in shared):
      raise ValueError(f"{fn}: give all of shared_gate_proj, shared_up_proj, shared_down_proj "
                       "or none")
    if isinstance(shared_gate_proj, (list, tuple)):
      sg = _stack(shared_gate_proj, "shared_gate_proj", fn)
      su = _stack(shared_up_proj, "shared_up_proj", fn)
      sdn = _stack(shared_down_proj, "shared_down_proj", fn)
    else:
      S = as_int(num_shared_experts, "num_shared_experts", fn)
      wide = shared_gate_proj.shape[0]
      if S < 1 or wide % S:
        raise ValueError(f"{fn}: num_shared_experts={S} must divide the shared intermediate "
                         f"size {wide} of shared_gate_proj")
      Is = wide // S
      if tuple(shared_gate_proj.shape) != (wide, H) or tuple(shared_up_proj.shape) != (wide, H):
        raise ValueError(f"{fn}: shared_gate_proj/shared_up_proj must be [S*I_s, H={H}], got "
                         f"{tuple(shared_gate_proj.shape)} and {tuple(shared_up_proj.shape)}")
      if tuple(shared_down_proj.shape) != (H, wide):
        raise ValueError(f"{fn}: shared_down_proj must be [H={H}, S*I_s={wide}], got "
                         f"{tuple(shared_down_proj.shape)}")
      sg = shared_gate_proj.reshape(S, Is, H)
      su = shared_up_proj.reshape(S, Is, H)
      sdn = shared_down_proj.reshape(H, S, Is).transpose(1, 0, 2)  # once, at load time
    S, Is = sg.shape[0], sg.shape[1]
    if sg.shape[2] != H or su.shape != sg.shape or tuple(sdn.shape) != (S, H, Is):
      raise ValueError(f"{fn}: shared expert shapes do not agree: gate {tuple(sg.shape)}, up "
                       f"{tuple(su.shape)}, down {tuple(sdn.shape)} (want [S, I_s, H={H}] and "
                       f"[S, H, I_s])")
    sgu = cast(_cat([sg, su], axis=1))
    sd = cast(sdn)
  return MoEParams(router_weight=cast(router), w_gate_up=cast(_cat([gate, up], axis=1)),
                   w_down=cast(down), correction_bias=vec(correction_bias),
                   expert_scale=vec(expert_scale), shared_gate_up=sgu, shared_down=sd)


# ---- validation ----------------------------------------------------------------

def _check(x, params, config):
  fn = "moe_block"
  if not isinstance(config, MoEConfig):
    raise TypeError(f"{fn}: config must be a jax_moe.MoEConfig, got {type(config).__name__}")
  if not isinstance(params, MoEParams):
    raise TypeError(f"{fn}: params must be a jax_moe.MoEParams, got {type(params).__name__}")
  if x.ndim < 1:
    raise ValueError(f"{fn}: x must be [..., H], got a scalar")
  if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
    raise TypeError(f"{fn}: x must be float32, bfloat16 or float16, got {x.dtype}")
  H = x.shape[-1]
  E = config.num_experts

  def arr(name, rank, layout):
    a = getattr(params, name)
    if a is None:
      raise ValueError(f"{fn}: params.{name} {layout} is missing")
    if not hasattr(a, "shape") or len(a.shape) != rank:
      raise ValueError(f"{fn}: params.{name} must have rank {rank} {layout}, got shape "
                       f"{tuple(getattr(a, 'shape', ()))}")
    if jnp.dtype(a.dtype) != jnp.dtype(x.dtype):
      raise TypeError(f"{fn}: params.{name} dtype {a.dtype} must match x dtype {x.dtype}")
    return a

  rw = arr("router_weight", 2, "[E, H]")
  if tuple(rw.shape) != (E, H):
    raise ValueError(f"{fn}: params.router_weight must have shape (E, H) = {(E, H)} "
                     f"(config.num_experts, x's last dim), got {tuple(rw.shape)}")
  wgu = arr("w_gate_up", 3, "[E, 2I, H]")
  if wgu.shape[0] != E or wgu.shape[2] != H or wgu.shape[1] % 2 or wgu.shape[1] == 0:
    raise ValueError(f"{fn}: params.w_gate_up must have shape (E={E}, 2I, H={H}) with 2I even, "
                     f"got {tuple(wgu.shape)}")
  I = wgu.shape[1] // 2
  wd = arr("w_down", 3, "[E, H, I]")
  if tuple(wd.shape) != (E, H, I):
    raise ValueError(f"{fn}: params.w_down must have shape (E, H, I) = {(E, H, I)} to match "
                     f"params.w_gate_up {tuple(wgu.shape)}, got {tuple(wd.shape)}")
  for name in ("correction_bias", "expert_scale"):
    v = getattr(params, name)
    if v is None:
      continue
    if not hasattr(v, "shape") or tuple(v.shape) != (E,):
      raise ValueError(f"{fn}: params.{name} must have shape ({E},) (one value per expert), "
                       f"got {tuple(getattr(v, 'shape', ()))}")
    if not jnp.issubdtype(v.dtype, jnp.floating):
      raise TypeError(f"{fn}: params.{name} must be a float array, got dtype {v.dtype}")
  S = config.num_shared_experts
  has_shared = params.shared_gate_up is not None or params.shared_down is not None
  if S == 0 and has_shared:
    raise ValueError(f"{fn}: params.shared_gate_up/shared_down are given but "
                     "config.num_shared_experts = 0")
  if S:
    sgu = arr("shared_gate_up", 3, "[S, 2I_s, H]")
    if sgu.shape[0] != S or sgu.shape[2] != H or sgu.shape[1] % 2 or sgu.shape[1] == 0:
      raise ValueError(f"{fn}: params.shared_gate_up must have shape (S={S}, 2I_s, H={H}) "
                       f"(S = config.num_shared_experts), got {tuple(sgu.shape)}")
    Is = sgu.shape[1] // 2
    sd = arr("shared_down", 3, "[S, H, I_s]")
    if tuple(sd.shape) != (S, H, Is):
      raise ValueError(f"{fn}: params.shared_down must have shape (S, H, I_s) = {(S, H, Is)} "
                       f"to match params.shared_gate_up, got {tuple(sd.shape)}")
  return H, I


def resolve(config: MoEConfig, num_tokens: int, hidden: int,
            intermediate: int) -> tuple[str, str | None]:
  """(implementation, grouped method or None) that moe_block runs for this shape.
  implementation "priced" (from "auto", heuristics.MOE_PRICED) runs gemv or one of
  the grouped method's branches, whichever is priced cheaper for each call's routing."""
  impl = config.implementation
  if impl == "auto":
    impl = heuristics.moe_implementation(num_tokens, config.num_experts, config.top_k,
                                         hidden, intermediate)
  if impl not in ("grouped", "priced"):
    return impl, None
  method = config.grouped_method
  if method == "auto":
    method = heuristics.moe_grouped_method(num_tokens, config.num_experts, config.top_k,
                                           hidden, intermediate)
  if impl == "priced" and method not in _PRICED_METHODS:  # e.g. grouped_method="ragged_dot"
    impl = heuristics.moe_expected_choice(num_tokens, config.num_experts, config.top_k,
                                          hidden, intermediate)
    return (impl, method) if impl == "grouped" else (impl, None)
  return impl, method


# ---- the grouped (large-batch) path ---------------------------------------------

def _precision(dtype):
  # bf16/f16 products are exact in the f32 accumulator at any precision; an f32
  # caller wants f32 matmuls, not TF32.
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _glu(gu, activation, dtype):
  """act(gate) * up from the f32 [..., 2I] pre-activations, rounded to dtype."""
  I = gu.shape[-1] // 2
  act = reference.activation_fn(activation)
  return (act(gu[..., :I]) * gu[..., I:]).astype(dtype)


_RAGGED_DN = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])),  # rows [N, K] x weights [E, out, K]
    lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def _expert_counts(ids, E):
  """Assignments per expert [E] int32 (ids outside [0, E) not counted)."""
  flat = ids.reshape(-1)
  key = jnp.where((flat >= 0) & (flat < E), flat, E)
  return jnp.bincount(key, length=E + 1)[:E].astype(jnp.int32)


def _sort_assignments(ids, E):
  """Assignments sorted by expert (stable; ids outside [0, E) last): (order [N]
  assignment numbers in sorted order, inv [N] sorted position of each assignment,
  valid [N], counts [E], starts [E] exclusive prefix of counts)."""
  N = ids.size
  flat = ids.reshape(N)
  valid = (flat >= 0) & (flat < E)
  key = jnp.where(valid, flat, E)
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  inv = jnp.zeros((N,), jnp.int32).at[order].set(jnp.arange(N, dtype=jnp.int32))
  counts = _expert_counts(ids, E)
  starts = (jnp.cumsum(counts) - counts).astype(jnp.int32)
  return order, inv, valid, counts, starts


def _grouped_ragged_dot(x, ids, w_gate_up, w_down, activation):
  """Assignments sorted by expert, then two jax.lax.ragged_dot_general matmuls.
  Rows come out in sorted order; index is the inverse permutation."""
  T, k = ids.shape
  E = w_gate_up.shape[0]
  # dropped ids sort last and fall outside every group
  order, inv, valid, sizes, _ = _sort_assignments(ids, E)
  rows = x[order // k]
  prec = _precision(x.dtype)
  gu = jax.lax.ragged_dot_general(rows, w_gate_up, sizes, _RAGGED_DN, precision=prec,
                                  preferred_element_type=jnp.float32)
  h = _glu(gu, activation, x.dtype)
  y = jax.lax.ragged_dot_general(h, w_down, sizes, _RAGGED_DN, precision=prec,
                                 preferred_element_type=jnp.float32).astype(x.dtype)
  return y, jnp.where(valid, inv, -1).reshape(T, k)


def _dense_block(x, w_gate_up, w_down, activation):
  """Every expert on the tokens x [t, H]: rows [E, t, H] in x's dtype."""
  E, two_i, H = w_gate_up.shape
  prec = _precision(x.dtype)
  # [E, 2I, H] -> [E*2I, H] is free: one plain GEMM for all experts' gate/up.
  gu = jnp.dot(x, w_gate_up.reshape(E * two_i, H).T, precision=prec,
               preferred_element_type=jnp.float32).reshape(x.shape[0], E, two_i)
  h = _glu(gu, activation, x.dtype)
  return jnp.einsum("tei,ehi->eth", h, w_down, precision=prec,
                    preferred_element_type=jnp.float32).astype(x.dtype)


def _grouped_dense(x, ids, w_gate_up, w_down, activation):
  """Every expert on every token (two dense matmuls on the tensor cores), then
  combine reads only the selected rows through its index: E/k times the useful
  FLOPs, no sort, no gather of weights. Token blocks of
  heuristics.moe_dense_token_block tokens bound the f32 intermediates."""
  T, k = ids.shape
  E, two_i, H = w_gate_up.shape
  valid = (ids >= 0) & (ids < E)
  tb = heuristics.moe_dense_token_block(T, E, H, two_i // 2)
  if tb >= T:
    y = _dense_block(x, w_gate_up, w_down, activation)
    index = jnp.where(valid, ids * T + jnp.arange(T, dtype=jnp.int32)[:, None], -1)
    return y.reshape(E * T, H), index
  nb = -(-T // tb)
  xp = jnp.pad(x, ((0, nb * tb - T), (0, 0))).reshape(nb, tb, H)
  y = jax.lax.map(lambda xb: _dense_block(xb, w_gate_up, w_down, activation), xp)
  t = jnp.arange(T, dtype=jnp.int32)[:, None]  # row of (t, e): block, expert, offset
  index = jnp.where(valid, (t // tb) * (E * tb) + ids * tb + t % tb, -1)
  return y.reshape(nb * E * tb, H), index


def _grouped_gather(x, ids, w_gate_up, w_down, activation):
  """Each assignment's expert weights gathered, then batched GEMVs: reads (and
  copies) T*k experts, so it only pays when T*k is well below E."""
  T, k = ids.shape
  E, _, H = w_gate_up.shape
  valid = (ids >= 0) & (ids < E)
  safe = jnp.where(valid, ids, 0)
  prec = _precision(x.dtype)
  gu = jnp.einsum("th,tkih->tki", x, w_gate_up[safe], precision=prec,
                  preferred_element_type=jnp.float32)
  h = _glu(gu, activation, x.dtype)
  y = jnp.einsum("tki,tkhi->tkh", h, w_down[safe], precision=prec,
                 preferred_element_type=jnp.float32)
  y = jnp.where(valid[..., None], y, 0.0).astype(x.dtype)
  index = jnp.where(valid, jnp.arange(T * k, dtype=jnp.int32).reshape(T, k), -1)
  return y.reshape(T * k, H), index


def _capacity_rows(x, k, order, counts, starts, w_gate_up, w_down, activation, capacity):
  """Each expert's assignments as rows [E, C] (C = capacity >= every count; expert e's
  row c is its assignment of rank c, sorted position starts[e] + c), two batched
  matmuls over the experts: the outputs [E * C, H] in x's dtype."""
  T, H = x.shape
  E = w_gate_up.shape[0]
  N = order.shape[0]
  c = jnp.arange(capacity, dtype=jnp.int32)
  pos = starts[:, None] + c[None, :]                       # sorted positions [E, C]
  used = c[None, :] < counts[:, None]
  tok = jnp.where(used, order[jnp.minimum(pos, N - 1)] // k, T)  # T: the zero row
  rows = jnp.concatenate([x, jnp.zeros((1, H), x.dtype)])[tok]   # [E, C, H]
  prec = _precision(x.dtype)
  gu = jnp.einsum("ech,eoh->eco", rows, w_gate_up, precision=prec,
                  preferred_element_type=jnp.float32)
  h = _glu(gu, activation, x.dtype)
  y = jnp.einsum("eci,ehi->ech", h, w_down, precision=prec,
                 preferred_element_type=jnp.float32).astype(x.dtype)
  return y.reshape(E * capacity, H)


def _dense_combined(x, ids, weights, w_gate_up, w_down, activation, combine_fn):
  """The dense formulation and its weighted sum: out [T, H] (the capacity switch's
  fallback)."""
  rows, index = _grouped_dense(x, ids, w_gate_up, w_down, activation)
  return combine_fn(rows, weights, index)


def _bucket_index(counts, buckets):
  """Index of the smallest bucket that holds the busiest expert; len(buckets) when
  none does."""
  if not buckets:
    return jnp.int32(0)
  return _busiest_bucket(jnp.max(counts), buckets)


def _busiest_bucket(busiest, buckets):
  """_bucket_index from the busiest expert's count (a traced int32 scalar): scalar
  compares that XLA fuses into one small kernel, no array of the buckets to reduce."""
  return sum((busiest > C).astype(jnp.int32) for C in buckets) if buckets else jnp.int32(0)


def _capacity_switch(x, ids, weights, w_gate_up, w_down, activation, combine_fn, buckets,
                     fallback, extra=None, index=None):
  """The smallest capacity in `buckets` that holds the busiest expert, chosen at run
  time (one lax.switch branch per bucket), else fallback(): out [T, H]. extra: one
  more branch (len(buckets) + 1), taken only when `index` (a traced branch number;
  default _bucket_index) says so."""
  T, k = ids.shape
  E = w_gate_up.shape[0]
  if not buckets and extra is None:
    return fallback()
  # One sort before the switch, shared by the capacity branches. A version that sorted
  # inside each branch was slower (run s16-6, T=512, us per layer, two passes,
  # session 15's code with the sort outside / that version: moe_block Gemma-4 758.2,
  # 756.4 / 768.1, 826.3; Qwen3 618.2, 609.8 / 631.4, 634.6; the XLA-native capacity
  # layer, which shares this function, Gemma-4 741.4, 740.8 / 1263.6, 1255.7; Qwen3
  # 620.2, 606.3 / 974.0, 983.8). With the sort back outside (run s16-7): moe_block
  # Gemma-4 745.3, Qwen3 608.3; XLA-native 736.4, 602.3.
  order, inv, valid, counts, starts = _sort_assignments(ids, E)
  expert = jnp.where(valid, ids.reshape(-1), 0)
  rank = inv - starts[expert]  # of a valid assignment among its expert's

  def capacity_branch(C):
    def run():
      rows = _capacity_rows(x, k, order, counts, starts, w_gate_up, w_down, activation, C)
      index = jnp.where(valid, expert * C + rank, -1).reshape(T, k)
      return combine_fn(rows, weights, index)
    return run

  branches = [capacity_branch(C) for C in buckets] + [fallback] + ([extra] if extra else [])
  if index is None:
    index = _bucket_index(counts, buckets)
  return jax.lax.switch(index, branches)


def _grouped_capacity(x, ids, weights, w_gate_up, w_down, activation, combine_fn):
  """Assignments sorted by expert, each expert's rows padded to a capacity C, two
  batched matmuls over [E, C] rows: about E * C rows of work instead of dense's
  E * T. C is the smallest of heuristics.moe_capacity_buckets that holds the
  busiest expert, chosen at run time (lax.switch over one static-shape branch per
  bucket). Each branch runs combine_fn on its own rows (their number differs per
  branch), so no branch copies its rows into a common layout.

  Memory: a branch holds E * C rows, a dense token block E * tb
  (heuristics.moe_dense_token_block), so buckets stay at or below tb. When no
  bucket holds the busiest expert: with T <= tb the dense formulation; above, the
  same method per token block of tb tokens (each block sorted on its own, with its
  own buckets and dense fallback), which re-reads the weights once per block."""
  T, k = ids.shape
  E, two_i, H = w_gate_up.shape
  tb = heuristics.moe_dense_token_block(T, E, H, two_i // 2)
  args = (x, ids, weights, w_gate_up, w_down, activation, combine_fn)
  if tb >= T:
    return _capacity_switch(*args, heuristics.moe_capacity_buckets(T, E, k),
                            lambda: _dense_combined(*args))

  def blocked():
    nb = -(-T // tb)
    pad = ((0, nb * tb - T), (0, 0))
    xp = jnp.pad(x, pad).reshape(nb, tb, H)
    ip = jnp.pad(ids, pad, constant_values=-1).reshape(nb, tb, k)
    wp = jnp.pad(weights, pad).reshape(nb, tb, k)
    out = jax.lax.map(lambda a: _grouped_capacity(*a, w_gate_up, w_down, activation,
                                                  combine_fn), (xp, ip, wp))
    return out.reshape(nb * tb, out.shape[-1])[:T]

  buckets = tuple(c for c in heuristics.moe_capacity_buckets(T, E, k) if c <= tb)
  return _capacity_switch(*args, buckets, blocked)


_PRICED_METHODS = ("dense", "capacity")


def _priced_buckets(num_tokens, num_experts, top_k, method):
  """The capacity buckets among the priced branches: the capacity method's, none for
  dense."""
  if method not in _PRICED_METHODS:
    raise ValueError(f"priced: grouped method must be one of {_PRICED_METHODS}, got {method!r}")
  if method == "dense":
    return ()
  return heuristics.moe_capacity_buckets(num_tokens, num_experts, top_k)


def _priced_plan(ids, num_experts, hidden, intermediate, method):
  """moe_block's "priced" auto for routing ids [T, k]: (branch names, the traced
  index of the one to run). The branches are the grouped method's (one per capacity
  bucket, then dense; dense alone for method "dense") and "gemv" last. The grouped
  method's run-time pick (_bucket_index) is kept unless heuristics.moe_gemv_seconds
  of this routing (weight passes summed over the experts it selects) is below its
  heuristics.moe_grouped_seconds (rows: the bucket, or T for dense)."""
  T, k = ids.shape
  E, H, I = num_experts, hidden, intermediate
  buckets = _priced_buckets(T, E, k, method)
  names = tuple(f"capacity:{C}" for C in buckets) + ("dense", "gemv")
  counts = _expert_counts(ids, E)
  per_pass = heuristics.gemv_tokens_per_pass(T, E, k)
  # The busiest expert and gemv's weight passes in one variadic reduction over the
  # counts, then scalar selects: fewer small ops before the switch than a max, a sum
  # and a gather of the grouped prices (CPU compile of Gemma-4 T=128: 23 entry
  # fusions, was 28). The plan is all that auto adds to the capacity method where it
  # picks a capacity branch. On H100 the rewrite bought nothing measurable: auto /
  # grouped:capacity at T=128, Gemma-4 and Qwen3, 1.017 and 1.015 before (run s19-4),
  # 1.019 and 1.005 after (s21-2).
  busiest, passes = jax.lax.reduce(
      (counts, (counts + per_pass - 1) // per_pass), (jnp.int32(0), jnp.int32(0)),
      lambda a, b: (jnp.maximum(a[0], b[0]), a[1] + b[1]), (0,))
  grouped = _busiest_bucket(busiest, buckets)
  grouped_s = jnp.float32(heuristics.moe_grouped_seconds(T, E, H, I))  # dense rows
  for C in reversed(buckets):  # the smallest bucket holding the busiest expert
    grouped_s = jnp.where(busiest <= C, jnp.float32(heuristics.moe_grouped_seconds(C, E, H, I)),
                          grouped_s)
  gemv_s = heuristics.moe_gemv_seconds(passes.astype(jnp.float32), T, k, H, I)  # no int32 bytes
  return names, jnp.where(gemv_s < grouped_s, jnp.int32(len(names) - 1), grouped)


def _grouped_priced(x, ids, weights, w_gate_up, w_down, activation, combine_fn, method):
  """moe_block's "priced" auto (heuristics.MOE_PRICED): the grouped method's
  run-time branches and expert_gemv, one of them run per call (_priced_plan)."""
  T, k = ids.shape
  E, two_i, H = w_gate_up.shape
  I = two_i // 2
  if heuristics.moe_dense_token_block(T, E, H, I) < T:
    # Token blocks (only when vmap folded many calls into one): the grouped method alone.
    return _grouped_experts(x, ids, weights, w_gate_up, w_down, activation, method, combine_fn)
  _, branch = _priced_plan(ids, E, H, I, method)
  args = (x, ids, weights, w_gate_up, w_down, activation, combine_fn)

  def gemv():
    y = expert_gemv(x, ids, w_gate_up, w_down, activation=activation)  # [T, k, H]
    rows_of = jnp.arange(T * k, dtype=jnp.int32).reshape(T, k)  # dropped ids: zero rows
    return combine_fn(y.reshape(T * k, H), weights, rows_of)

  return _capacity_switch(*args, _priced_buckets(T, E, k, method),
                          lambda: _dense_combined(*args), extra=gemv, index=branch)


# Formulations that return (rows, index): rows [R, H] in x's dtype and index int32
# [T, k] with rows[index[t, j]] = expert ids[t, j]'s MLP output for token t
# (unweighted), index -1 for a dropped id.
_GROUPED_ROWS = {"ragged_dot": _grouped_ragged_dot, "dense": _grouped_dense,
                 "gather": _grouped_gather}


def _grouped_experts(x, ids, weights, w_gate_up, w_down, activation, method, combine_fn):
  """The large-batch experts and their weighted sum: combine_fn(rows, weights, index)
  -> out [T, H], applied to the rows of the formulation `method` (jax_moe.combine in
  moe_block; the benchmark's XLA-native layer passes a jnp sum). This is the one
  function a tensor-core grouped-matmul kernel replaces."""
  if method == "capacity":
    return _grouped_capacity(x, ids, weights, w_gate_up, w_down, activation, combine_fn)
  if method.startswith("priced:"):  # moe_block's "priced" auto over a grouped method
    return _grouped_priced(x, ids, weights, w_gate_up, w_down, activation, combine_fn,
                           method.partition(":")[2])
  rows, index = _GROUPED_ROWS[method](x, ids, w_gate_up, w_down, activation)
  return combine_fn(rows, weights, index)


@functools.lru_cache(maxsize=None)
def _grouped_op(activation: str, method: str, out_dtype):
  """_grouped_experts + combine as one vmappable function.

  Under vmap the batch folds into the token dimension: one sort and one set of
  matmuls for the whole batch (ragged_dot has no batching rule anyway). Combine is
  inside the same rule because an index means something only next to the rows it
  came with: folded rows must never be broadcast or split apart from their index
  (jax.checkpoint's batching did exactly that when only the experts were wrapped).
  """

  def combine_fn(rows, weights, index):
    return combine(rows, weights, index, out_dtype=out_dtype)

  @custom_vmap
  def op(x, ids, weights, w_gate_up, w_down):
    return _grouped_experts(x, ids, weights, w_gate_up, w_down, activation, method,
                            combine_fn)

  @op.def_vmap
  def _vmap_rule(axis_size, in_batched, x, ids, weights, w_gate_up, w_down):
    B = axis_size
    xb, ib, wb, gb, db = in_batched
    bcast = lambda a, b: a if b else jnp.broadcast_to(a, (B,) + a.shape)  # noqa: E731
    x, ids, weights = bcast(x, xb), bcast(ids, ib), bcast(weights, wb)
    if gb or db:  # expert weights differ per batch element (vmap over layers)
      return jax.lax.map(lambda a: op(*a), (x, ids, weights, bcast(w_gate_up, gb),
                                            bcast(w_down, db))), True
    T, H, k = x.shape[1], x.shape[2], ids.shape[2]
    out = op(x.reshape(B * T, H), ids.reshape(B * T, k), weights.reshape(B * T, k),
             w_gate_up, w_down)
    return out.reshape(B, T, out.shape[-1]), True

  return op


# ---- shared experts ------------------------------------------------------------

def _shared_rows(x, params, config, impl):
  """Shared experts' outputs [T, S, H] in x's dtype (weight 1)."""
  T = x.shape[0]
  S = config.num_shared_experts
  sgu, sd = params.shared_gate_up, params.shared_down
  if impl == "reference":
    ids = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (T, S))
    return reference.expert_gemv(x, ids, sgu, sd, activation=config.activation)
  if impl == "gemv" and not heuristics.moe_shared_dense(T):
    ids = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (T, S))
    return expert_gemv(x, ids, sgu, sd, activation=config.activation)
  # Large batch (and the gemv path above MOE_SHARED_GEMV_MAX_TOKENS): every token
  # runs every shared expert, so plain matmuls.
  _, two_is, H = sgu.shape
  prec = _precision(x.dtype)
  gu = jnp.dot(x, sgu.reshape(S * two_is, H).T, precision=prec,
               preferred_element_type=jnp.float32).reshape(T, S, two_is)
  h = _glu(gu, config.activation, x.dtype)
  return jnp.einsum("tsi,shi->tsh", h, sd, precision=prec,
                    preferred_element_type=jnp.float32).astype(x.dtype)


def _add_shared(routed_f32, shared):
  acc = routed_f32
  for s in range(shared.shape[1]):  # f32, in shared-expert order after the routed sum
    acc = acc + shared[:, s].astype(jnp.float32)
  return acc


# ---- the block -----------------------------------------------------------------

def _route_kwargs(params, config):
  return dict(scoring=config.scoring, renormalize=config.renormalize,
              num_groups=config.num_groups, top_groups=config.top_groups,
              group_score=config.group_score, correction_bias=params.correction_bias,
              scaling_factor=config.scaling_factor, expert_scale=params.expert_scale)


def _reference_block(x, params, config):
  w, ids = reference.route(x, config.top_k, router_weight=params.router_weight,
                           **_route_kwargs(params, config))
  y = reference.expert_gemv(x, ids, params.w_gate_up, params.w_down,
                            activation=config.activation)
  out = reference.combine(y, w, out_dtype=jnp.float32)
  if config.num_shared_experts:
    out = _add_shared(out, _shared_rows(x, params, config, "reference"))
  return out.astype(x.dtype)


def moe_block(x, params: MoEParams, config: MoEConfig):
  """One MoE layer: route -> experts -> weighted combine (+ shared experts).

  Args:
    x: [..., H] float32, bfloat16 or float16; leading dims fold into tokens.
    params: MoEParams in x's dtype (correction_bias / expert_scale float32).
    config: MoEConfig.

  Returns:
    out [..., H] in x's dtype.
  """
  x = jnp.asarray(x)
  H, I = _check(x, params, config)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, H)
  T = x2.shape[0]
  if T == 0:
    return jnp.zeros(x.shape, x.dtype)
  impl, method = resolve(config, T, H, I)
  if impl == "reference":
    return _reference_block(x2, params, config).reshape(x.shape)

  weights, ids = route(x2, config.top_k, router_weight=params.router_weight,
                       **_route_kwargs(params, config))
  S = config.num_shared_experts
  routed_dtype = jnp.float32 if S else x.dtype  # shared rows add to the f32 sum
  fold = bool(S) and heuristics.moe_fold_shared(
      T, config.num_experts, config.top_k, S, H, I, params.shared_gate_up.shape[1] // 2)
  if impl == "gemv" and (fold or not S):
    # Experts and weighted sum in one call. Folded shared experts are slots k .. k + S - 1
    # of the same call (weight 1): the f32 sum runs over the routed slots, then the
    # shared ones, as the unfolded path adds them, with the same single rounding.
    shared = dict(shared_gate_up=params.shared_gate_up, shared_down=params.shared_down)
    out = expert_gemv_combine(x2, ids, weights, params.w_gate_up, params.w_down,
                              activation=config.activation, **(shared if fold else {}))
    return out.reshape(lead + (H,))
  if impl == "gemv":
    y = expert_gemv(x2, ids, params.w_gate_up, params.w_down, activation=config.activation)
    out = combine(y, weights, out_dtype=routed_dtype)
  else:  # "grouped", or "priced": gemv or a grouped branch chosen at run time
    out = _grouped_op(config.activation, f"priced:{method}" if impl == "priced" else method,
                      jnp.dtype(routed_dtype))(x2, ids, weights, params.w_gate_up,
                                               params.w_down)
  if S:
    out = _add_shared(out, _shared_rows(x2, params, config, impl)).astype(x.dtype)
  return out.reshape(lead + (H,))
