"""Numbers from workflows and files: refused when not finite or past a bound, and shown briefly in
error messages (Python 3.11+ cannot even print an integer of more than 4300 digits)."""

from __future__ import annotations

import math
from typing import Any

import torch


def shown(value: Any, limit: int = 40) -> str:
    """A short, always printable form of `value` for an error message."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bounded_number(value: Any, where: str, bound: float, error: type[Exception] = ValueError) -> float:
    """`value` as a float when it is a number (not a bool), finite and within [-bound, bound];
    otherwise `error` naming `where`. Huge integers are compared exactly, never converted first."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{where} must be a number, got {shown(value)}.")
    if isinstance(value, float) and not math.isfinite(value):
        raise error(f"{where} must be a finite number, got {value}.")
    if not -bound <= value <= bound:
        raise error(f"{where} must be a finite number between {-bound:g} and {bound:g}, got {shown(value)}.")
    return float(value)


def tensor_outlier(t: torch.Tensor, bound: float) -> str | None:
    """None when every value of `t` is finite and within [-bound, bound]; else the worst value, shown
    ("nan", "inf", "-3e+07"). One min/max pass: NaN and inf show in the extremes. fp8 and other narrow
    types are widened first (the CPU's min/max need it); empty and meta tensors pass."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = t.float()
    low, high = (float(v) for v in torch.aminmax(t.detach()))
    if -bound <= low <= high <= bound:
        return None
    worst = low if not math.isfinite(low) or abs(low) > abs(high) else high
    return "NaN" if math.isnan(worst) else f"{worst:g}"
