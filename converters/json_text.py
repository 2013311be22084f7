"""One bounded JSON parser for every JSON text that comes from a file or a workflow (safetensors
`__metadata__` fields, block weights, IP-Adapter scales): within bounds real inputs never meet, and
every refusal a `JsonTextError` (a ValueError) naming the input, never a raw RecursionError or a
Python error about integer digits.

Bounds (defaults; a caller may pass tighter ones):
- MAX_CHARS 4,000,000: the largest real field is kohya's `ss_tag_frequency` for big datasets (a few
  hundred kB to about 1 MB); diffusers' per-module `alpha_pattern` for every SDXL layer is about 300 kB.
- MAX_DEPTH 16: real metadata and block weights nest two or three levels.
- MAX_DIGITS 30: integers in real data are counts, ranks and seeds (at most 20 digits); Python's own
  int parser gets slow (quadratic) on thousands of digits.
- Numbers must be finite: NaN, Infinity and overflowing floats (1e999) are refused.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate

MAX_CHARS = 4_000_000
MAX_DEPTH = 16
MAX_DIGITS = 30
_MAX_NUMBER_CHARS = 100  # a float literal longer than this is no real value


class JsonTextError(ValueError):
    """JSON text that is not JSON or exceeds a bound; the message names the input."""


def parse_bounded_json(
    text: str | bytes,
    what: str,
    *,
    max_chars: int = MAX_CHARS,
    max_depth: int = MAX_DEPTH,
    max_digits: int = MAX_DIGITS,
) -> object:
    """`text` parsed as JSON, or JsonTextError("<what>: <why>") when it is not JSON or exceeds a bound:
    more than `max_chars` characters, nesting deeper than `max_depth`, an integer of more than
    `max_digits` digits, or a number that is not finite."""

    def refuse(why: str) -> JsonTextError:
        return JsonTextError(f"{what} is refused: {why}.")

    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise JsonTextError(f"{what} is not JSON: it is not UTF-8 text.") from None
    if not isinstance(text, str):
        raise JsonTextError(f"{what} is not JSON: expected text, got {type(text).__name__}.")
    if len(text) > max_chars:
        raise refuse(f"{len(text)} characters, more than the {max_chars} allowed")
    depth = nesting_depth_of_text(text)
    if depth > max_depth:
        raise refuse(f"nested more than {max_depth} levels deep ({depth})")

    def integer(literal: str) -> int:
        if len(literal.lstrip("-")) > max_digits:
            raise refuse(f"an integer of {len(literal.lstrip('-'))} digits (at most {max_digits})")
        return int(literal)

    def real(literal: str) -> float:
        value = float(literal) if len(literal) <= _MAX_NUMBER_CHARS else math.inf
        if not math.isfinite(value):
            raise refuse(f"the number {literal[:40]} is not a finite number")
        return value

    def constant(literal: str):
        raise refuse(f"{literal} is not a number")

    try:
        return json.loads(text, parse_int=integer, parse_float=real, parse_constant=constant)
    except JsonTextError:
        raise
    except RecursionError:  # the depth scan above makes this unreachable; kept as a guard
        raise refuse(f"nested more than {max_depth} levels deep") from None
    except ValueError as e:
        raise JsonTextError(f"{what} is not JSON: {str(e)[:200]}.") from None


def nesting_depth_of_text(text: str) -> int:
    """How deeply `[`/`{` nest in JSON text, brackets inside strings ignored; before parsing, in C-speed
    passes (the json module has no depth limit of its own and recurses)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_DELTA.__getitem__, brackets)), default=0)


# A string runs to its closing quote, or to the end of the text when unterminated: the pattern never
# fails once it starts at a quote, so the scan stays linear (json.loads refuses the bad text after).
_STRING = re.compile(r'"[^"\\]*(?:\\(?:.|\Z)[^"\\]*)*(?:"|\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DELTA = {"[": 1, "{": 1, "]": -1, "}": -1}
