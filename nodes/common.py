"""Names shared by the pack's nodes (ids, socket types, category) and the check of their widget inputs."""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Mapping

PACK = "DiffusersAdapters"
CATEGORY = "Diffusers Adapters"
# Custom socket type names are global in ComfyUI: prefixed so they cannot collide.
PIPELINE = "DIFFUSERS_ADAPTERS_PIPELINE"
FACEID = "DIFFUSERS_ADAPTERS_FACEID"  # face embeddings and crops from FaceIDEmbed
NUMBER_TYPES = ("INT", "FLOAT")
WIDGET_TYPES = (*NUMBER_TYPES, "STRING", "BOOLEAN")


def node_id(name: str) -> str:
    """The registered node id of a pack node class (prefixed, like the socket types)."""
    return f"{PACK}{name}"


class NodeInputError(ValueError):
    """A node input outside what its widget declares (NaN, inf, beyond min/max, not a number)."""


def shown(value: Any, limit: int = 40) -> str:
    """A short, always printable form of a workflow value for error messages (an integer of
    thousands of digits has no repr in Python 3.11+, and a long one would flood the message)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_number(where: str, kind: str, value: Any, spec: Mapping[str, Any]) -> int | float:
    """`value` as the widget of type `kind` ("INT"/"FLOAT") with `spec` ({"min", "max"}) takes it,
    or NodeInputError naming `where`.

    ComfyUI's editor keeps widgets in range, but API prompts and the headless runner can send
    anything, and ComfyUI's own validation lets NaN through (NaN < min and NaN > max are both false).
    A whole float for an INT (20.0) is taken as the integer, as ComfyUI's int() does; bools, text and
    fractions for an INT are refused."""
    low, high = spec.get("min"), spec.get("max")
    bounds = f" from {low} to {high}" if low is not None and high is not None else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NodeInputError(f"{where} must be a number{bounds}, got {shown(value)}.")
    if isinstance(value, float) and not math.isfinite(value):
        raise NodeInputError(f"{where} must be a finite number{bounds}, got {value}.")
    if kind == "INT" and isinstance(value, float):
        if not value.is_integer():
            raise NodeInputError(f"{where} must be a whole number{bounds}, got {value}.")
        value = int(value)
    # Python compares ints and floats exactly, so a huge integer is compared before any conversion.
    if (low is not None and value < low) or (high is not None and value > high):
        raise NodeInputError(f"{where} must be{bounds or ' in range'}, got {shown(value)}.")
    return int(value) if kind == "INT" else float(value)


def number_specs(input_types: Mapping[str, Mapping[str, tuple]]) -> dict[str, tuple[str, dict]]:
    """name -> (INT or FLOAT, widget options) for every number input of a node's INPUT_TYPES."""
    return widget_specs(input_types, NUMBER_TYPES)


def widget_specs(input_types: Mapping[str, Mapping[str, tuple]], kinds: tuple) -> dict[str, tuple[str, dict]]:
    """name -> (type, widget options) for every input of a node's INPUT_TYPES whose type is in `kinds`."""
    specs = {}
    for section in ("required", "optional"):
        for name, spec in input_types.get(section, {}).items():
            if isinstance(spec[0], str) and spec[0] in kinds:
                specs[name] = (spec[0], dict(spec[1]) if len(spec) > 1 else {})
    return specs


def check_widget(where: str, kind: str, value: Any, spec: Mapping[str, Any]) -> Any:
    """check_number for INT/FLOAT; STRING must be text and BOOLEAN a bool (an API prompt's "false"
    would otherwise be true)."""
    if kind in NUMBER_TYPES:
        return check_number(where, kind, value, spec)
    wanted = {"STRING": str, "BOOLEAN": bool}[kind]
    if not isinstance(value, wanted):
        raise NodeInputError(
            f"{where} must be {'text' if kind == 'STRING' else 'true or false'}, got {shown(value)}."
        )
    return value


def checks_numbers(cls: type) -> type:
    """Class decorator: the node's FUNCTION checks every INT/FLOAT input against the widget that
    INPUT_TYPES declares for it (check_number), and STRING/BOOLEAN inputs by type, before it runs, so
    the check cannot drift from the widgets. The widget specs are read once per class (INPUT_TYPES
    also lists model files)."""
    original: Callable = getattr(cls, cls.FUNCTION)
    signature = inspect.signature(original)
    read: dict[type, dict[str, tuple[str, dict]]] = {}  # per class: subclasses inherit the function

    @functools.wraps(original)
    def run(self, *args, **kwargs):
        node = type(self)
        if node not in read:
            read[node] = widget_specs(node.INPUT_TYPES(), WIDGET_TYPES)
        bound = signature.bind(self, *args, **kwargs)
        for name, (kind, spec) in read[node].items():
            if name in bound.arguments:
                where = f"{node.__name__} input {name!r}"
                bound.arguments[name] = check_widget(where, kind, bound.arguments[name], spec)
        return original(*bound.args, **bound.kwargs)

    setattr(cls, cls.FUNCTION, run)
    return cls
