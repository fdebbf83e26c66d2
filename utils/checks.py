"""Comparing a from-scratch computation with a library's: tolerances that follow the dtype (CH03 on).

A formula written out by hand and the module it re-implements round their intermediate results
at different points, so in low precision they agree only up to the dtype's resolution: bfloat16
keeps 8 significant bits (relative steps of about 0.4-0.8 %), float16 11 bits (0.05-0.1 %),
float32 24 bits. :func:`tolerances` gives ``atol``/``rtol`` a little above one rounding step of the
dtype, for ``torch.testing.assert_close``. They stay far below the differences a wrong formula
makes (a missing weight, a mean instead of a root mean square: errors of order 1), so a check
with these tolerances still fails when the formula is wrong.
"""

from __future__ import annotations

import torch

#: (atol, rtol) per dtype: about one rounding step of the dtype, with room for a different order
#: of the same operations.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-7),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def tolerances(dtype: torch.dtype | torch.Tensor) -> dict[str, float]:
    """``{"atol": ..., "rtol": ...}`` for comparing two results computed in ``dtype``.

    Use it as ``torch.testing.assert_close(ours, theirs, **tolerances(theirs.dtype))``.
    float32: 1e-5 / 1e-5; float16: 1e-3 / 1e-3; bfloat16: 1e-2 / 1e-2; float64: 1e-10 / 1e-7.

    Args:
        dtype: a floating-point torch dtype, or a tensor (its dtype is used).

    Raises:
        ValueError: for a dtype that is not one of the four above (e.g. an integer dtype, which
            should be compared exactly with ``torch.equal``).
    """
    if isinstance(dtype, torch.Tensor):
        dtype = dtype.dtype
    if dtype not in TOLERANCES:
        known = ", ".join(str(d).replace("torch.", "") for d in TOLERANCES)
        raise ValueError(f"No tolerance for dtype {dtype!r}: use one of {known} "
                         "(compare integer tensors exactly with torch.equal).")
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}
