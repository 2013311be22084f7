"""Weight deltas of LoRA-family layer patches, one small pure function per algorithm.

Every function takes a `LayerPatch` (canonical tensor names, see lora_patch.py) and the shape of the
layer's weight, and returns float32 tensors whatever the input dtype. The definitions are LyCORIS's
(lycoris-lora 4.1.3, the trainer of LoCon/LoHa/LoKr/DoRA files), checked against its modules' forward
pass in tests/test_lora_math.py.

Scale: the low-rank algorithms multiply their product by alpha / rank, where rank is read off the
tensors (down rows, w1b rows, ...). alpha None or 0 means alpha = rank (scale 1), as in LyCORIS and
Kohya. A `patch.rank` that disagrees with the tensors is an error. Full-matrix LoKr (w1 and w2 both
stored whole) ignores alpha, as LyCORIS does.

Bias deltas ("bias", full's "diff_b", norm's "b_norm") are used as stored: never scaled by alpha/rank.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch

from .lora_patch import LayerPatch, LoraFormatError

Shape = Sequence[int]

_DORA_EPS = torch.finfo(torch.float32).eps  # LyCORIS adds finfo(dtype).eps to the weight norm


# --- helpers -------------------------------------------------------------------------------------


def _device_of(patch: LayerPatch, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for tensor in patch.tensors.values():
        return tensor.device
    raise LoraFormatError(f"{patch.algorithm} patch has no tensors")


def _get(
    patch: LayerPatch, names: Sequence[str], device: torch.device, optional: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    """The named tensors in float32 on `device`; a missing required one is a LoraFormatError."""
    missing = [name for name in names if name not in patch.tensors]
    if missing:
        raise LoraFormatError(
            f"{patch.algorithm} patch lacks {', '.join(missing)} (has {', '.join(sorted(patch.tensors))})"
        )
    out = {}
    for name in (*names, *optional):
        if name in patch.tensors:
            out[name] = patch.tensors[name].to(device=device, dtype=torch.float32)
    return out


def _matrix(t: torch.Tensor, name: str, algorithm: str) -> torch.Tensor:
    """A [a, b] view of a [a, b, 1, 1, ...] tensor (conv 1x1 factors); other trailing sizes are errors."""
    if t.dim() < 2 or math.prod(t.shape[2:]) != 1:
        raise LoraFormatError(f"{algorithm} {name} must be a matrix (or [a, b, 1, 1]), got {tuple(t.shape)}")
    return t.reshape(t.shape[0], t.shape[1])


def _check(condition: bool, algorithm: str, message: str) -> None:
    if not condition:
        raise LoraFormatError(f"{algorithm}: {message}")


def _low_rank_scale(patch: LayerPatch, rank: int) -> float:
    """alpha / rank, rank taken from the tensors. alpha None or 0 means scale 1 (LyCORIS, Kohya)."""
    if patch.rank is not None and int(patch.rank) != rank:
        raise LoraFormatError(f"{patch.algorithm}: patch rank {patch.rank} but the tensors have rank {rank}")
    if patch.alpha is None or float(patch.alpha) == 0.0:
        return 1.0
    return float(patch.alpha) / rank


def _fit(delta: torch.Tensor, shape: Shape, algorithm: str) -> torch.Tensor:
    """`delta` reshaped to the layer's weight shape: same output size and same number of values."""
    shape = tuple(int(s) for s in shape)
    if delta.numel() != math.prod(shape) or delta.shape[0] != shape[0]:
        raise LoraFormatError(
            f"{algorithm} delta has shape {tuple(delta.shape)}, the layer's weight is {shape}"
        )
    return delta.reshape(shape)


# --- one function per algorithm ------------------------------------------------------------------


def lora_delta(patch: LayerPatch, shape: Shape, device: torch.device | str | None = None) -> torch.Tensor:
    """LoRA / LoCon: ΔW = alpha/r · up @ down.

    up [out, r] or [out, r, 1, 1]; down [r, in] or (conv) [r, in, k, k], so ΔW = up @ down.flatten(1)
    reshaped to [out, in, k, k]. Tucker LoCon (LyCORIS use_tucker) has down [r, in, 1, 1], mid
    [r, r, k, k] and ΔW[p, q, ...] = Σ_ij mid[i, j, ...] · up[p, i] · down[j, q]. r = down's rows.
    """
    dev = _device_of(patch, device)
    t = _get(patch, ("up", "down"), dev, optional=("mid",))
    algo = patch.algorithm
    up = _matrix(t["up"], "up", algo)
    down = t["down"]
    rank = down.shape[0]
    mid = t.get("mid")
    if mid is None:
        _check(
            up.shape[1] == rank, algo, f"up {tuple(t['up'].shape)} and down {tuple(down.shape)} ranks differ"
        )
        delta = up @ down.reshape(rank, -1)
    else:
        down = _matrix(down, "down", algo)
        _check(
            mid.dim() >= 2 and mid.shape[0] == up.shape[1] and mid.shape[1] == rank,
            algo,
            f"mid {tuple(mid.shape)} does not join up {tuple(up.shape)} and down {tuple(down.shape)}",
        )
        delta = torch.einsum("ij...,pi,jq->pq...", mid, up, down)
    return _fit(delta * _low_rank_scale(patch, rank), shape, algo)


def _hada_half(a: torch.Tensor, b: torch.Tensor, tucker: torch.Tensor | None, algo: str, n: int):
    """One Hadamard factor: a @ b, or with Tucker core t: Σ_ij t[i, j, ...] · a[i, p] · b[j, q]."""
    if tucker is None:
        a = _matrix(a, f"w{n}a", algo)
        _check(
            a.shape[1] == b.shape[0], algo, f"w{n}a {tuple(a.shape)} and w{n}b {tuple(b.shape)} ranks differ"
        )
        return a @ b.reshape(b.shape[0], -1)
    a, b = _matrix(a, f"w{n}a", algo), _matrix(b, f"w{n}b", algo)
    _check(
        tucker.dim() >= 2 and tucker.shape[0] == a.shape[0] and tucker.shape[1] == b.shape[0],
        algo,
        f"t{n} {tuple(tucker.shape)} does not join w{n}a {tuple(a.shape)} and w{n}b {tuple(b.shape)}",
    )
    return torch.einsum("ij...,jq,ip->pq...", tucker, b, a)


def loha_delta(patch: LayerPatch, shape: Shape, device: torch.device | str | None = None) -> torch.Tensor:
    """LoHa: ΔW = alpha/r · (w1a @ w1b) ⊙ (w2a @ w2b), reshaped to the layer (conv: w*b is [r, in·k·k]).

    Tucker LoHa (t1, t2 [r, r, k, k]; w*a [r, out], w*b [r, in]): each factor is
    Σ_ij t[i, j, ...] · wa[i, p] · wb[j, q], as LyCORIS's HadaWeightTucker. r = w1b's rows.
    """
    dev = _device_of(patch, device)
    t = _get(patch, ("w1a", "w1b", "w2a", "w2b"), dev, optional=("t1", "t2"))
    algo = patch.algorithm
    _check(("t1" in t) == ("t2" in t), algo, "Tucker LoHa needs both t1 and t2")
    first = _hada_half(t["w1a"], t["w1b"], t.get("t1"), algo, 1)
    second = _hada_half(t["w2a"], t["w2b"], t.get("t2"), algo, 2)
    _check(
        first.shape == second.shape,
        algo,
        f"w1 product {tuple(first.shape)} and w2 product {tuple(second.shape)} differ",
    )
    return _fit(first * second * _low_rank_scale(patch, t["w1b"].shape[0]), shape, algo)


def lokr_delta(patch: LayerPatch, shape: Shape, device: torch.device | str | None = None) -> torch.Tensor:
    """LoKr: ΔW = scale · kron(w1, w2).

    w1 is "w1" [a, c] or w1a [a, r] @ w1b [r, c]; w2 is "w2" ([b, d] or conv [b, d, k, k]), or
    w2a [b, r] @ w2b [r, d·k·k], or Tucker: Σ_ij t2[i, j, ...] · w2a[i, p] · w2b[j, q] with w2a
    [r, b], w2b [r, d]. For convs w1 is broadcast over the kernel axes. scale = alpha / r when either
    half is factored (r = w1b's or w2b's rows); 1 when both are full matrices (LyCORIS forces
    alpha = rank there, so a stored alpha is ignored).
    """
    dev = _device_of(patch, device)
    algo = patch.algorithm
    names = set(patch.tensors)
    for n in ("1", "2"):
        full, parts = f"w{n}" in names, {f"w{n}a", f"w{n}b"} & names
        _check(
            len(parts) == (0 if full else 2),
            algo,
            f"needs either w{n} or w{n}a + w{n}b (has {', '.join(sorted(names))})",
        )
    t = _get(patch, (), dev, optional=("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2"))
    ranks = []
    if "w1" in t:
        w1 = _matrix(t["w1"], "w1", algo)
    else:
        w1a, w1b = _matrix(t["w1a"], "w1a", algo), _matrix(t["w1b"], "w1b", algo)
        _check(
            w1a.shape[1] == w1b.shape[0],
            algo,
            f"w1a {tuple(w1a.shape)} and w1b {tuple(w1b.shape)} ranks differ",
        )
        w1 = w1a @ w1b
        ranks.append(w1b.shape[0])
    _check("t2" not in t or "w2" not in t, algo, "t2 given with a full w2")
    if "w2" in t:
        w2 = t["w2"]
    else:
        w2 = _hada_half(t["w2a"], t["w2b"], t.get("t2"), algo, 2)
        ranks.append(t["w2b"].shape[0])
    _check(len(set(ranks)) <= 1, algo, f"w1 and w2 factors have different ranks {ranks}")
    scale = _low_rank_scale(patch, ranks[0]) if ranks else 1.0
    w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
    return _fit(torch.kron(w1.contiguous(), w2.contiguous()) * scale, shape, algo)  # kron needs contiguous


def full_delta(patch: LayerPatch, shape: Shape, device: torch.device | str | None = None) -> torch.Tensor:
    """Full fine-tune difference (LyCORIS "full"): ΔW = diff; the bias delta is diff_b."""
    dev = _device_of(patch, device)
    return _fit(_get(patch, ("diff",), dev)["diff"], shape, patch.algorithm)


def norm_delta(patch: LayerPatch, shape: Shape, device: torch.device | str | None = None) -> torch.Tensor:
    """Norm layers (LayerNorm, GroupNorm): Δweight = w_norm; the bias delta is b_norm."""
    dev = _device_of(patch, device)
    return _fit(_get(patch, ("w_norm",), dev)["w_norm"], shape, patch.algorithm)


_DELTAS: Mapping[str, Callable[..., torch.Tensor]] = {
    "lora": lora_delta,
    "loha": loha_delta,
    "lokr": lokr_delta,
    "full": full_delta,
    "norm": norm_delta,
}
_BIAS_NAMES = {"full": "diff_b", "norm": "b_norm"}


def weight_delta(patch: LayerPatch, shape: Shape, device: torch.device | str | None = None) -> torch.Tensor:
    """ΔW of `patch` at strength 1, float32, reshaped to `shape`, on `device` (default: the tensors').

    With "dora_scale" this is the plain delta before weight decomposition; use `merged_weight`.
    """
    fn = _DELTAS.get(patch.algorithm)
    if fn is None:
        raise LoraFormatError(f"unknown LoRA algorithm {patch.algorithm!r} (known: {', '.join(_DELTAS)})")
    return fn(patch, shape, device)


def bias_delta(patch: LayerPatch, device: torch.device | str | None = None) -> torch.Tensor | None:
    """The bias delta at strength 1 (float32, 1-D), or None: "diff_b" (full), "b_norm" (norm) or "bias"."""
    names = [n for n in (_BIAS_NAMES.get(patch.algorithm), "bias") if n and n in patch.tensors]
    if not names:
        return None
    if len(names) > 1:
        raise LoraFormatError(f"{patch.algorithm} patch has two bias deltas: {' and '.join(names)}")
    return patch.tensors[names[0]].to(device=_device_of(patch, device), dtype=torch.float32).reshape(-1)


def _weight_decompose(
    weight: torch.Tensor, dora_scale: torch.Tensor, strength: float, axis: int
) -> torch.Tensor:
    """LyCORIS's DoRA epilogue on W' = W + ΔW (functional.general.weight_decompose).

    s = dora_scale / (‖W'‖ + eps), the norm taken per output row (axis 1: over the input and kernel
    axes; dora_scale [out, 1, ...]) or per input channel (axis 0: over the output and kernel axes;
    dora_scale [1, in, ...]); at strength m != 1, s = m · (s - 1) + 1; result W' · s.
    """
    _check(
        weight.dim() >= 2,
        "dora",
        f"weight decomposition needs a matrix or conv weight, got {tuple(weight.shape)}",
    )
    _check(axis in (0, 1), "dora", f"dora_axis must be 0 or 1, got {axis}")
    kept = 0 if axis == 1 else 1  # the axis dora_scale runs along
    expected = [1] * weight.dim()
    expected[kept] = weight.shape[kept]
    _check(
        dora_scale.numel() == weight.shape[kept]
        and (dora_scale.dim() < 2 or tuple(dora_scale.shape) == tuple(expected[: dora_scale.dim()])),
        "dora",
        f"dora_scale {tuple(dora_scale.shape)} does not fit weight {tuple(weight.shape)} "
        f"with dora_axis={axis}",
    )
    moved = weight.transpose(0, 1) if kept == 1 else weight
    norm = moved.reshape(moved.shape[0], -1).norm(dim=1).reshape(expected) + _DORA_EPS
    scale = dora_scale.reshape(expected) / norm
    if strength != 1:
        scale = strength * (scale - 1) + 1
    return weight * scale


def _is_plain_lora(patch: LayerPatch, shape: torch.Size) -> bool:
    """LoRA/LoCon without Tucker mid or DoRA whose factors fit the weight (else the checked path)."""
    t = patch.tensors
    if (
        patch.algorithm != "lora"
        or "mid" in t
        or "dora_scale" in t
        or patch.rank not in (None, t["down"].shape[0])
    ):
        return False
    up, down = t["up"], t["down"]
    return (
        up.dim() in (2, 4)
        and up.shape[0] == shape[0]
        and up.reshape(up.shape[0], -1).shape[1] == down.shape[0]
        and down.reshape(down.shape[0], -1).shape[1] * shape[0] == math.prod(shape)
    )


def plain_lora_factors(
    patch: LayerPatch, shape: torch.Size, strength: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(up [out, r], down [r, in·k·k], strength·alpha/r) in float32 for a plain LoRA/LoCon layer, whose
    merge is one `addmm` into the 2-D view of the weight; None for every other kind of patch."""
    if not _is_plain_lora(patch, shape):
        return None
    up, down = (patch.tensors[k].to(device, torch.float32) for k in ("up", "down"))
    rank = down.shape[0]
    alpha = float(strength) * _low_rank_scale(patch, rank)
    return up.reshape(up.shape[0], -1), down.reshape(rank, -1), alpha


def merged_weight(base_weight: torch.Tensor, patch: LayerPatch, strength: float = 1.0) -> torch.Tensor:
    """The layer's new weight (float32, on base_weight's device) with `patch` applied at `strength`.

    Plain: W + strength · ΔW. With "dora_scale" (DoRA, LyCORIS's definition): W' = W + ΔW at full
    strength, then `_weight_decompose(W', dora_scale, strength)`. Note that LyCORIS blends only the
    magnitude: at strength 0 a DoRA layer gives W + ΔW, not W.
    """
    base = base_weight.detach().to(torch.float32)
    factors = plain_lora_factors(patch, base.shape, strength, base.device)
    if factors is not None:
        # The common case in one pass, no full-size temporaries: W + strength·alpha/r · up @ down.
        up, down, alpha = factors
        return torch.addmm(base.reshape(base.shape[0], -1), up, down, alpha=alpha).reshape(base.shape)
    delta = weight_delta(patch, tuple(base.shape), device=base.device)
    dora_scale = patch.tensors.get("dora_scale")
    if dora_scale is None:
        return base + float(strength) * delta
    dora_scale = dora_scale.to(device=base.device, dtype=torch.float32)
    return _weight_decompose(base + delta, dora_scale, float(strength), patch.dora_axis)
