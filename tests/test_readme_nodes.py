"""README's node table says what the nodes declare: display names, inputs in order, the choices of
every combo (the first is the default), the default of every number and switch, which sockets are
optional, and the outputs.

A row is `| display name | `id` | inputs | outputs |`; an input is written `name`,
`name (a/b/c)` for a combo's choices, `name = default` for a number or switch, `name (optional)` or
`name (TYPE, optional)` for an optional socket, and a cell `as <display name>` repeats that row's inputs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from comfyui_diffusers_adapters.headless.ui_workflow import input_specs, is_widget
from comfyui_diffusers_adapters.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

README = Path(__file__).resolve().parents[1] / "README.md"
ROW = re.compile(r"^\| (?P<display>[^|]+?) \| `(?P<id>\w+)` \| (?P<inputs>[^|]+?) \| (?P<outputs>[^|]+?) \|$")
ITEM = re.compile(r"(?P<name>\w+)(?: \((?P<note>.*)\))?(?: = (?P<default>\S+))?")
# Combos listing model files: their choices are the user's files.
FILE_COMBOS = frozenset(
    {"checkpoint", "lora_name", "embedding", "ipadapter", "clip_vision", "insightface_model"}
    | {"transformer", "clip_l", "t5", "vae"}
)


def split_top(text: str) -> list[str]:
    """Split at commas outside parentheses ("latent_image (LATENT, optional), denoise")."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


def table_rows(text: str) -> dict[str, dict]:
    """id -> {display, inputs: [parsed items], outputs: [names]} for the node table's rows."""
    rows = {}
    for line in text.splitlines():
        match = ROW.match(line)
        if match and match["id"].startswith("DiffusersAdapters"):
            rows[match["id"]] = {
                "display": match["display"],
                "inputs": match["inputs"],
                "outputs": [o.strip() for o in match["outputs"].split(",")],
            }
    cells = {row["display"]: row["inputs"] for row in rows.values()}
    for row in rows.values():
        cell = row["inputs"]
        if cell.startswith("as "):
            cell = cells[cell[3:]]
        row["inputs"] = [parse_item(item) for item in split_top(cell)]
    return rows


def parse_item(item: str) -> dict:
    match = ITEM.fullmatch(item)
    assert match, f"README node table: cannot read the input {item!r}"
    return {**match.groupdict(), "text": item}


def problems_of(row: dict, node_class: type) -> list[str]:
    specs = input_specs(node_class)
    names = [item["name"] for item in row["inputs"]]
    if names != [name for _, name, _, _ in specs]:
        return [f"inputs {names}, the node has {[name for _, name, _, _ in specs]}"]
    problems = []
    for item, (category, name, kind, options) in zip(row["inputs"], specs):
        problems += [f"{name}: {p}" for p in item_problems(item, category, name, kind, options)]
    outputs = list(getattr(node_class, "RETURN_NAMES", None) or node_class.RETURN_TYPES)
    if row["outputs"] != outputs:
        problems.append(f"outputs {row['outputs']}, the node returns {outputs}")
    return problems


def item_problems(item: dict, category: str, name: str, kind, options: dict) -> list[str]:
    note, default = item["note"], item["default"]
    if isinstance(kind, (list, tuple)):
        if name in FILE_COMBOS:
            return [] if note is None and default is None else ["a file list: no choices or default"]
        choices = [c.strip() for c in (note or "").split("/")]
        expected = [str(c) for c in kind]
        if choices != expected or options.get("default", kind[0]) != kind[0]:
            return [f"choices {choices}, the node offers {expected} (default first)"]
        return []
    if kind in ("INT", "FLOAT", "BOOLEAN"):
        wanted = str(options.get("default")).lower() if kind == "BOOLEAN" else options.get("default")
        read = default if kind == "BOOLEAN" or default is None else float(default)
        if note is None and read == wanted:
            return []
        return [f"written as {item['text']!r}, the default is {wanted}"]
    if kind == "STRING" or is_widget(kind, options):
        return [] if note is None and default is None else [f"written as {item['text']!r}: text has no note"]
    optional = note is not None and note.split(",")[-1].strip() == "optional"
    if optional != (category == "optional"):
        return [f"a {category} socket, written as {item['text']!r}"]
    return []


ROWS = table_rows(README.read_text(encoding="utf-8"))


def test_every_node_has_a_row():
    assert sorted(ROWS) == sorted(NODE_CLASS_MAPPINGS)


@pytest.mark.parametrize("node", sorted(NODE_CLASS_MAPPINGS))
def test_readme_row_matches_the_node(node):
    row = ROWS[node]
    assert row["display"] == NODE_DISPLAY_NAME_MAPPINGS[node]
    problems = problems_of(row, NODE_CLASS_MAPPINGS[node])
    assert not problems, f"README row of {node}:\n" + "\n".join(problems)


def test_the_check_catches_a_wrong_choice_a_wrong_default_and_a_missing_input():
    node_class = NODE_CLASS_MAPPINGS["DiffusersAdaptersApplyIPAdapter"]
    good = ROWS["DiffusersAdaptersApplyIPAdapter"]
    assert problems_of(good, node_class) == []
    for wrong in ("faceid_v2 (auto/on/off)", "scale = 0.5", "image"):
        name = wrong.split(" ")[0]
        inputs = [parse_item(wrong) if i["name"] == name else i for i in good["inputs"]]
        assert problems_of({**good, "inputs": inputs}, node_class), wrong
    shorter = {**good, "inputs": [i for i in good["inputs"] if i["name"] != "combine_embeds"]}
    assert problems_of(shorter, node_class)
