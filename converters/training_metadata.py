"""Human-readable summary of the training metadata trainers write into safetensors headers
(kohya `ss_*`, Stability's modelspec), trigger words first."""

from __future__ import annotations

import re
from collections import Counter
from typing import Mapping

from .json_text import JsonTextError, parse_bounded_json

# A kohya dataset folder is named "<repeats>_<instance prompt>", e.g. "10_sks dog".
_REPEATS_PREFIX = re.compile(r"^\d+_")
_SHOWN_FIELDS = (
    ("modelspec.title", "title"),
    ("modelspec.architecture", "architecture"),
    ("modelspec.author", "author"),
    ("modelspec.description", "description"),
    ("modelspec.usage_hint", "usage hint"),
    ("modelspec.license", "license"),
    ("ss_output_name", "output name"),
    ("ss_sd_model_name", "trained on"),
    ("ss_base_model_version", "base model"),
    ("ss_network_module", "network"),
    ("ss_network_dim", "rank"),
    ("ss_network_alpha", "alpha"),
    ("ss_num_epochs", "epochs"),
    ("ss_steps", "steps"),
    ("ss_resolution", "resolution"),
)


def _json_field(metadata: Mapping[str, str], key: str) -> dict:
    """A JSON field of the header within json_text's bounds; {} when unreadable (the summary is an
    aid: a broken field must not stop the file from loading)."""
    try:
        value = parse_bounded_json(metadata.get(key) or "{}", f"the {key} metadata field")
    except JsonTextError:
        return {}
    return value if isinstance(value, dict) else {}


def tag_frequencies(metadata: Mapping[str, str]) -> Counter:
    """Caption tag counts over all dataset folders (`ss_tag_frequency`)."""
    counts: Counter = Counter()
    for tags in _json_field(metadata, "ss_tag_frequency").values():
        if isinstance(tags, dict):
            for tag, n in tags.items():
                if isinstance(n, (int, float)):
                    counts[str(tag).strip()] += int(n)
    return counts


def trigger_words(metadata: Mapping[str, str], max_tags: int = 5) -> list[str]:
    """Likely trigger words: the declared trigger phrase, kohya instance prompts, top tags."""
    words: list[str] = []
    for key in ("modelspec.trigger_phrase", "ss_trigger_words", "trigger_words"):
        if metadata.get(key):
            words += [w.strip() for w in str(metadata[key]).split(",") if w.strip()]
    for folder in list(_json_field(metadata, "ss_dataset_dirs")) + list(
        _json_field(metadata, "ss_tag_frequency")
    ):
        name = _REPEATS_PREFIX.sub("", str(folder)).strip()
        if name and name != str(folder).strip():
            words.append(name)
    words += [tag for tag, _ in tag_frequencies(metadata).most_common(max_tags)]
    return list(dict.fromkeys(w for w in words if w))


def summarize(metadata: Mapping[str, str] | None) -> str:
    """A short text for the node's info output; empty when the file carries no training metadata."""
    if not metadata:
        return ""
    lines = []
    triggers = trigger_words(metadata)
    if triggers:
        lines.append("trigger words: " + ", ".join(triggers))
    for key, label in _SHOWN_FIELDS:
        value = metadata.get(key)
        if value not in (None, "", "None"):
            lines.append(f"{label}: {str(value)[:200]}")
    top = tag_frequencies(metadata).most_common(15)
    if top:
        lines.append("top tags: " + ", ".join(f"{t} ({n})" for t, n in top))
    return "\n".join(lines)
