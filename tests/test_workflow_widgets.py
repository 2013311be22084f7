"""The saved example workflows match the nodes as they are now, and open readable in the editor.

* Widget values: as many as the frontend makes widgets from `INPUT_TYPES` (required, then
  optional; a seed's "control after generate" value; Load Image's upload button), each one fitting
  its widget. A node that gained a widget since the workflow was saved makes the editor fill the
  default and mark the tab as modified the moment it opens.
* Sockets: the saved inputs are the node's sockets, in order, with the right types.
* Layout: no node (title bar included) overlaps another, each node is at least as tall as its
  sockets and widgets need, and the saved view shows every node and group in a 1600x1000 window.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from comfyui_diffusers_adapters.headless.editor_layout import (
    CONTROL_VALUES,
    COVERED,
    VISIBLE,
    badge_box,
    graph_box,
    item_boxes,
    min_height,
    node_box,
    on_screen,
    overlaps,
    socket_specs,
)
from comfyui_diffusers_adapters.headless.standin_nodes import STANDIN_NODE_CLASS_MAPPINGS
from comfyui_diffusers_adapters.headless.ui_workflow import (
    NOTE_TYPES,
    assign_widget_values,
    is_combo,
    widget_layout,
)
from comfyui_diffusers_adapters.nodes import NODE_CLASS_MAPPINGS

EXAMPLES = Path(__file__).resolve().parents[1] / "example_workflows"
NAMES = sorted(p.name for p in EXAMPLES.glob("*.json"))
CLASSES = {**STANDIN_NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS}
# Combos listing model or input files: each ComfyUI install has its own files, so any name is fine
# (Load Flux's four: transformer, clip_l, t5, vae).
FILE_COMBOS = frozenset(
    {"checkpoint", "lora_name", "embedding", "ipadapter", "clip_vision", "insightface_model", "image"}
    | {"transformer", "clip_l", "t5", "vae"}
)


def load(name: str) -> dict:
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


def graph_nodes(workflow: dict) -> list[dict]:
    """The nodes that run (Notes have no class)."""
    return [n for n in workflow["nodes"] if n["type"] not in NOTE_TYPES]


def widget_problems(node: dict) -> list[str]:
    """What does not match between a saved node's widgets_values and its class's widgets."""
    node_class = CLASSES[node["type"]]
    where = f"node {node['id']} ({node['type']})"
    slots = [s for s in widget_layout(node_class) if not s.forced]
    values = node.get("widgets_values") or []
    expected = sum(s.width for s in slots)
    if len(values) != expected:
        names = [s.name for s in slots]
        return [f"{where}: {len(values)} widget values saved, the node has {expected} ({names})"]
    problems, position = [], 0
    for slot in slots:
        value, helpers = values[position], values[position + 1 : position + slot.width]
        position += slot.width
        problems += [f"{where} {slot.name}: {p}" for p in value_problems(slot, value)]
        if slot.input_type == "INT" and helpers and helpers[0] not in CONTROL_VALUES:
            problems.append(
                f"{where} {slot.name}: control value {helpers[0]!r} is not one of {CONTROL_VALUES}"
            )
    return problems


def value_problems(slot, value) -> list[str]:
    kind, options = slot.input_type, slot.options
    if slot.upload:
        return [] if value == "image" else [f"upload button value {value!r}, the editor saves 'image'"]
    if is_combo(kind):
        choices = list(kind) if isinstance(kind, (list, tuple)) else list(options.get("options") or [])
        if slot.name in FILE_COMBOS:
            return [] if isinstance(value, str) and value else [f"file name {value!r} is not a name"]
        return [] if value in choices else [f"{value!r} is not one of {choices}"]
    wanted = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}[kind]
    if isinstance(value, bool) != (kind == "BOOLEAN") or not isinstance(value, wanted):
        return [f"{value!r} is not a {kind}"]
    low, high = options.get("min"), options.get("max")
    if kind in ("INT", "FLOAT") and (
        (low is not None and value < low) or (high is not None and value > high)
    ):
        return [f"{value!r} is outside {low}..{high}"]
    return []


def overlap(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_every_node_type_of_the_examples_is_known():
    unknown = {
        (name, n["type"]) for name in NAMES for n in graph_nodes(load(name)) if n["type"] not in CLASSES
    }
    assert not unknown, f"node types without a class here: {sorted(unknown)}"


@pytest.mark.parametrize("name", NAMES)
def test_widget_values_match_the_current_inputs(name):
    problems = [p for node in graph_nodes(load(name)) for p in widget_problems(node)]
    assert not problems, f"{name}: re-save it with scripts/resave_workflows.py:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", NAMES)
def test_saved_sockets_are_the_nodes_sockets(name):
    workflow = load(name)
    problems = []
    for node in graph_nodes(workflow):
        saved = [(entry["name"], entry["type"]) for entry in node.get("inputs") or []]
        if saved != socket_specs(CLASSES[node["type"]]):
            problems.append(f"node {node['id']} ({node['type']}): inputs {saved}")
        outputs = [entry["type"] for entry in node.get("outputs") or []]
        if outputs != list(CLASSES[node["type"]].RETURN_TYPES):
            problems.append(f"node {node['id']} ({node['type']}): outputs {outputs}")
    links = {link[0]: link for link in workflow["links"]}
    for node in workflow["nodes"]:
        for slot, entry in enumerate(node.get("inputs") or []):
            link = links.get(entry.get("link"))
            if entry.get("link") is not None and (link is None or link[3:5] != [node["id"], slot]):
                problems.append(
                    f"node {node['id']} input {entry['name']}: link {entry['link']} points elsewhere"
                )
    assert not problems, f"{name}:\n" + "\n".join(problems)


def test_the_widget_check_catches_a_missing_and_a_wrong_value():
    """The examples' check can fail: one value short (a widget added since) and a combo value gone."""
    node = {"id": 1, "type": "DiffusersAdaptersApplyIPAdapter"}
    node["widgets_values"] = ["a.bin", "b.safetensors", 0.8, 0.0, 1.0, "", 0.6, "auto", 1.0]
    assert "9 widget values saved, the node has 10" in widget_problems(node)[0]
    node["widgets_values"] += ["concat"]
    assert widget_problems(node) == []
    node["widgets_values"][7] = "on"
    assert "'on' is not one of" in widget_problems(node)[0]
    node["widgets_values"][7], node["widgets_values"][2] = "auto", 9.0
    assert "outside 0.0..5.0" in widget_problems(node)[0]


def test_widget_values_are_read_back_by_name():
    """The runner's conversion reads each saved value into the widget of the same name."""
    for name in NAMES:
        for node in graph_nodes(load(name)):
            node_class = CLASSES[node["type"]]
            values = assign_widget_values(node, node_class, set())
            slots = [s for s in widget_layout(node_class) if not (s.forced or s.upload)]
            assert list(values) == [s.name for s in slots], (name, node["id"])


@pytest.mark.parametrize("name", NAMES)
def test_nodes_do_not_overlap_and_are_tall_enough(name):
    nodes = load(name)["nodes"]
    problems = []
    for index, node in enumerate(nodes):
        needed = min_height(node["type"], CLASSES.get(node["type"]))
        if node["size"][1] < needed:
            problems.append(f"node {node['id']} ({node['type']}) is {node['size'][1]} tall, needs {needed}")
        for other in nodes[index + 1 :]:
            if overlap(node_box(node), node_box(other)):
                problems.append(f"nodes {node['id']} and {other['id']} overlap")
        if node["type"] in NODE_CLASS_MAPPINGS:  # the editor draws the pack's name above its nodes
            for other in nodes:
                if other is not node and overlap(badge_box(node), node_box(other)):
                    problems.append(f"node {node['id']}'s source badge covers node {other['id']}")
    assert not problems, f"{name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", NAMES)
def test_the_saved_view_shows_the_whole_graph(name):
    workflow = load(name)
    left, top, right, bottom = graph_box(workflow)
    ds = workflow["extra"]["ds"]
    (dx, dy), scale = ds["offset"], ds["scale"]
    left, top, right, bottom = (
        (left + dx) * scale,
        (top + dy) * scale,
        (right + dx) * scale,
        (bottom + dy) * scale,
    )
    assert scale >= 0.6, f"{name}: zoom {scale} is too small to read"
    assert left >= VISIBLE[0] and top >= VISIBLE[1] and right <= VISIBLE[2] and bottom <= VISIBLE[3], (
        f"{name}: the graph spans ({left:.0f}, {top:.0f})-({right:.0f}, {bottom:.0f}) on screen, "
        f"the visible canvas is {VISIBLE}"
    )
    hidden = [box for box in item_boxes(workflow) if any(overlaps(on_screen(box, ds), c) for c in COVERED)]
    assert not hidden, f"{name}: under the minimap or the canvas info text ({COVERED}): {hidden}"


@pytest.mark.parametrize("name", NAMES)
def test_each_example_has_a_template_thumbnail(name):
    """ComfyUI's template browser asks for example_workflows/<name>.jpg (scripts/workflow_thumbnails.py)."""
    picture = EXAMPLES / name.replace(".json", ".jpg")
    assert picture.is_file(), f"{picture.name} is missing: run scripts/workflow_thumbnails.py"
    assert picture.stat().st_size < 100_000


def test_the_template_category_is_named_for_the_packs_folder():
    """The template browser titles the pack's category from locales/en/main.json, keyed by the folder
    ComfyUI loads the pack from (README and pyproject: comfyui-diffusers-adapters)."""
    root = EXAMPLES.parent
    main = json.loads((root / "locales" / "en" / "main.json").read_text(encoding="utf-8"))
    project = re.search(r'^name = "([^"]+)"', (root / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    assert list(main["templateWorkflows"]["category"]) == [project[1]]


GROUP_HEADER = 34  # a group's title bar at font size 24 (LiteGraph: font size x 1.4)


def group_box(group: dict) -> tuple[float, float, float, float]:
    x, y, w, h = group["bounding"]
    return x, y, x + w, y + h


@pytest.mark.parametrize("name", NAMES)
def test_groups_hold_whole_nodes_below_their_titles(name):
    """Groups (model / adapters / sampling / output) do not overlap; a node is wholly inside one,
    under its title bar, or outside all of them."""
    workflow = load(name)
    groups = workflow.get("groups") or []
    problems = [
        f"groups {a['title']!r} and {b['title']!r} overlap"
        for i, a in enumerate(groups)
        for b in groups[i + 1 :]
        if overlap(group_box(a), group_box(b))
    ]
    for node in workflow["nodes"]:
        left, top, right, bottom = node_box(node)
        for group in groups:
            g_left, g_top, g_right, g_bottom = group_box(group)
            inside = g_left <= left and right <= g_right and g_top + GROUP_HEADER <= top
            inside = inside and bottom <= g_bottom
            if overlap(node_box(node), group_box(group)) and not inside:
                problems.append(f"node {node['id']} ({node['type']}) sticks out of group {group['title']!r}")
    assert groups, f"{name} has no groups"
    assert not problems, f"{name}:\n" + "\n".join(problems)
