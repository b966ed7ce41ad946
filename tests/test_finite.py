"""zdni.finite.finite: the numpy fast path agrees with torch.isfinite on every dtype and view."""

from __future__ import annotations

import pytest
import torch

from zdni.finite import finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf")])
def test_finite_agrees_with_torch(dtype: torch.dtype, bad: float | None) -> None:
    """One non-finite value anywhere (here the last of a 2-D tensor) makes it not finite."""
    t = torch.randn(16, 8).to(dtype)
    if bad is not None:
        t[-1, -1] = bad
    assert finite(t) is (bad is None) is bool(torch.isfinite(t).all())


@pytest.mark.parametrize("view", ["transposed", "strided", "neg", "requires_grad", "empty"])
def test_finite_sees_through_views(view: str) -> None:
    """Non-contiguous and negated views and tensors needing grad are checked too."""
    t = torch.randn(6, 4)
    t[2, 3] = float("nan")
    if view == "transposed":
        t = t.t()
    elif view == "strided":
        t = t[::2]
    elif view == "neg":  # the imaginary part of a conjugate: a float tensor with the neg bit
        c = torch.randn(6, 4, dtype=torch.complex64)
        c[2, 3] = complex(0, float("inf"))
        t = c.conj().imag
        assert t.is_neg()
    elif view == "requires_grad":
        t = (t * 1).requires_grad_()
    elif view == "empty":
        assert finite(torch.empty(0, 4))
        return
    assert finite(t) is bool(torch.isfinite(t).all()) is False


def test_integer_tensors_are_finite() -> None:
    """An integer tensor has no non-finite values."""
    assert finite(torch.arange(5))
