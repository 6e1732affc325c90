"""Shape helpers shared by the math modules."""

from torch import Tensor


def append_dims(v: Tensor, x: Tensor) -> Tensor:
    """A per-sample vector `v` [batch] reshaped (and moved/cast) to broadcast against `x` [batch, ...]."""
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
