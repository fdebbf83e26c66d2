"""Comparing a from-scratch computation with a library's: tolerances that follow the dtype (CH03 on).

A formula written out by hand and the module it re-implements round their intermediate results
at different points, so in low precision they agree only up to the dtype's resolution: bfloat16
keeps 8 significant bits (relative steps of about 0.4-0.8 %), float16 11 bits (0.05-0.1 %),
float32 24 bits. :func:`tolerances` gives ``rtol`` a little above one rounding step of the dtype
and an ``atol`` of the same size *relative to the largest value of the reference*, for
``torch.testing.assert_close``. Scaling ``atol`` matters: a tiny random model's outputs are of
order 0.01, and a fixed ``atol=1e-2`` would accept any formula at all. With these tolerances a
check still fails when the formula is wrong (a missing weight, a mean instead of a root mean
square, the activation on the wrong branch: errors of the order of the values themselves).

Also one argument check shared by the least-squares repairs of CH04 and CH05: :func:`check_damping`.
"""

from __future__ import annotations

import math

import torch

#: (atol, rtol) per dtype, for values of order 1: about one rounding step of the dtype, with room
#: for a different order of the same operations.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-7),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def tolerances(reference: torch.Tensor | torch.dtype) -> dict[str, float]:
    """``{"atol": ..., "rtol": ...}`` for comparing a result with ``reference``.

    Use it as ``torch.testing.assert_close(ours, theirs, **tolerances(theirs))``.
    Per dtype (for values of order 1): float32 1e-5 / 1e-5; float16 1e-3 / 1e-3; bfloat16
    1e-2 / 1e-2; float64 1e-10 / 1e-7.

    Args:
        reference: the tensor the result is compared with (recommended): its dtype picks the
            tolerances and ``atol`` is multiplied by its largest absolute value. Or a dtype: the
            tolerances for values of order 1.

    Raises:
        ValueError: for a dtype that is not one of the four above (e.g. an integer dtype, which
            should be compared exactly with ``torch.equal``).
    """
    dtype = reference.dtype if isinstance(reference, torch.Tensor) else reference
    if dtype not in TOLERANCES:
        known = ", ".join(str(d).replace("torch.", "") for d in TOLERANCES)
        raise ValueError(f"No tolerance for dtype {dtype!r}: pass a floating-point tensor or one of {known} "
                         "(compare integer tensors exactly with torch.equal).")
    atol, rtol = TOLERANCES[dtype]
    if isinstance(reference, torch.Tensor) and reference.numel():
        atol *= max(reference.detach().abs().max().item(), torch.finfo(dtype).tiny)
    return {"atol": atol, "rtol": rtol}


def check_damping(damping, default: float) -> None:
    """Raise ``ValueError`` unless ``damping`` (a ridge strength) is a finite positive number; the message
    names ``default``, the caller's default value."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping > 0 or math.isinf(damping):
        raise ValueError(f"damping must be a positive number ({default} is the default), got {damping!r}.")
