"""Integer codes for enum-like FFI attributes; must match csrc/common/params.h."""

SCORING = {"softmax": 0, "sigmoid": 1}
GROUP_SCORE = {"top2_sum": 0, "max": 1}
ACTIVATION = {"silu": 0, "gelu_tanh": 1, "gelu": 2}

# expert_gemv kernel_variant 7 ("split") and its chunk of intermediate columns per block
# (kGemvSplitVariant, kSplitChunk): the h scratch of that variant holds its partials.
GEMV_SPLIT_VARIANT = 7
GEMV_SPLIT_CHUNK = 32


def gemv_scratch_cols(hidden: int, intermediate: int, variant: int) -> int:
  """Elements of x's dtype per assignment in expert_gemv's h scratch (params.h
  GemvScratchCols): I, or for the split variant its f32 partials, 2 H (I / C) 16-bit
  elements, and never less than I."""
  if variant != GEMV_SPLIT_VARIANT:
    return intermediate
  return max(intermediate, 2 * hidden * (intermediate // GEMV_SPLIT_CHUNK))
