"""Cheaper calls into diffusers' attention layers, with the same arithmetic.

diffusers' `Attention.forward` looks up its processor's call signature (`inspect.signature`) on every
call, to drop keyword arguments the processor does not take: 140 lookups per SDXL UNet forward. On a
fast GPU the denoising step then waits for the host: measured on an H200 (benchmarks/
bench_vs_comfyui.py, variant lean_attention), 56 vs 66 ms per SDXL step at 1024x1024 and 39 vs 55 ms
per SD1.5 step at 512x512. Here each attention layer of the pack's own pipelines gets a forward that
does the same filtering with the signature looked up once per processor class, then makes the same
processor call. diffusers' class itself is left alone (other packs in ComfyUI use it too).
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import torch
from diffusers.models.attention_processor import Attention

_PARAMETERS: dict[type, frozenset[str]] = {}


def _forward(
    self: Attention,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    **cross_attention_kwargs: Any,
) -> torch.Tensor:
    """`Attention.forward` of diffusers 0.42 without the per-call signature lookup (and without its
    warning about keyword arguments the processor ignores)."""
    if cross_attention_kwargs:
        kind = type(self.processor)
        names = _PARAMETERS.get(kind)
        if names is None:
            names = _PARAMETERS[kind] = frozenset(inspect.signature(self.processor.__call__).parameters)
        cross_attention_kwargs = {k: v for k, v in cross_attention_kwargs.items() if k in names}
    return self.processor(
        self,
        hidden_states,
        encoder_hidden_states=encoder_hidden_states,
        attention_mask=attention_mask,
        **cross_attention_kwargs,
    )


def skip_signature_lookups(model: torch.nn.Module) -> int:
    """Give every diffusers attention layer of `model` the cheaper forward; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, Attention) and "forward" not in vars(module):
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
