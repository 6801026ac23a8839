"""Integer codes for enum-like FFI attributes; must match csrc/common/params.h."""

SCORING = {"softmax": 0, "sigmoid": 1}
GROUP_SCORE = {"top2_sum": 0, "max": 1}
ACTIVATION = {"silu": 0, "gelu_tanh": 1, "gelu": 2}
