"""Named MoE shapes shared by tests, benchmarks and the demo.

Each entry is a real model's MoE layer (hidden size H, expert intermediate size I,
experts E, experts per token k, and its routing); `small_stand_in` gives a shape of
the same structure small enough for CPU tests.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class MoEShape:
  name: str
  hidden: int          # H
  intermediate: int    # I (per expert)
  num_experts: int     # E
  top_k: int           # k
  scoring: str = "softmax"
  renormalize: bool = True
  num_groups: int = 1
  top_groups: int = 1
  group_score: str = "top2_sum"
  scaling_factor: float = 1.0
  correction_bias: bool = False
  expert_scale: bool = False
  activation: str = "silu"
  num_shared_experts: int = 0
  shared_intermediate: int = 0   # I_s per shared expert

  def expert_bytes(self, itemsize: int = 2) -> int:
    """Bytes of one expert's gate_up + down weights."""
    return 3 * self.hidden * self.intermediate * itemsize

  def small_stand_in(self) -> "MoEShape":
    """Same routing structure, CPU-test-sized matrices."""
    return replace(self, name=self.name + "_small", hidden=64, intermediate=48,
                   shared_intermediate=32 if self.num_shared_experts else 0)


SHAPES = {
    # Gemma-4-26B-A4B: GeGLU experts, softmax routing with a per-expert scale.
    "gemma4": MoEShape("gemma4", hidden=2816, intermediate=704, num_experts=128, top_k=8,
                       expert_scale=True, activation="gelu_tanh"),
    # Qwen3-30B-A3B: SwiGLU, softmax top-8 renormalized.
    "qwen3": MoEShape("qwen3", hidden=2048, intermediate=768, num_experts=128, top_k=8),
    # Mixtral-8x7B: SwiGLU, softmax top-2 renormalized.
    "mixtral": MoEShape("mixtral", hidden=4096, intermediate=14336, num_experts=8, top_k=2),
    # DeepSeek-V3: sigmoid scores + correction bias, 8 groups / top-4 by top-2 sum,
    # routed scaling 2.5, one shared expert.
    "deepseek_v3": MoEShape("deepseek_v3", hidden=7168, intermediate=2048, num_experts=256,
                            top_k=8, scoring="sigmoid", num_groups=8, top_groups=4,
                            group_score="top2_sum", scaling_factor=2.5, correction_bias=True,
                            num_shared_experts=1, shared_intermediate=2048),
    # A small shape for demos on CPU.
    "tiny": MoEShape("tiny", hidden=256, intermediate=128, num_experts=16, top_k=4),
}
