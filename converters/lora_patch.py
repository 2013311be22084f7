"""Compatibility name of `converters.lora_form` (the canonical LoRA form), for callers not yet updated."""

from .lora_form import PARTS, LayerPatch, LoraFile, LoraFormatError

__all__ = ["PARTS", "LayerPatch", "LoraFile", "LoraFormatError"]
