"""Saved UI workflows as ComfyUI's editor (frontend 1.35) draws and saves them: a node's sockets and
widget values from its class's `INPUT_TYPES`, and the least height LiteGraph gives it.

Used to re-save the example workflows when a node gains an input (scripts/resave_workflows.py)
and by the tests that keep them current. The widget order is ui_workflow.widget_layout's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .ui_workflow import (
    NOTE_TYPES,
    assign_widget_values,
    input_specs,
    is_force_input,
    is_widget,
    widget_layout,
)

# LiteGraph's measures in the frontend: title bar, one socket row, one widget row (20 px + 4 px
# gap), the smallest multiline text box (--comfy-widget-min-height, 50 px, + gap).
TITLE_HEIGHT = 30
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 24
MULTILINE_HEIGHT = 54
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
# The examples keep their seed when run again (the editor's own default is "randomize").
DEFAULT_CONTROL = "fixed"


def socket_specs(node_class: type) -> list[tuple[str, str]]:
    """(name, type) of the inputs the editor draws as sockets (not widgets), in order."""
    return [
        (name, kind)
        for category, name, kind, options in input_specs(node_class)
        if not is_widget(kind, options) or is_force_input(category, options)
    ]


def min_height(node_type: str, node_class: type | None) -> int:
    """The least body height (the saved size, without the title bar) LiteGraph gives a node."""
    if node_class is None:
        return MULTILINE_HEIGHT + 8 if node_type in NOTE_TYPES else SLOT_HEIGHT
    rows = max(len(socket_specs(node_class)), len(node_class.RETURN_TYPES), 1)
    widgets = sum(
        (MULTILINE_HEIGHT if s.options.get("multiline") else WIDGET_HEIGHT) + WIDGET_HEIGHT * s.helpers
        for s in widget_layout(node_class)
        if not s.forced
    )
    return rows * SLOT_HEIGHT + widgets + 8


def current_widget_values(node: Mapping, node_class: type) -> list[Any]:
    """The node's widget values in its class's current widget order: saved values by name, the
    default for a widget added since, a seed's control value kept (or "fixed")."""
    linked = {
        (e.get("widget") or {}).get("name") or e.get("name")
        for e in node.get("inputs") or []
        if e.get("link")
    }
    by_name = assign_widget_values(node, node_class, linked)
    saved = node.get("widgets_values") or []
    control = next((v for v in saved if isinstance(v, str) and v in CONTROL_VALUES), DEFAULT_CONTROL)
    values: list[Any] = []
    for slot in widget_layout(node_class):
        if slot.forced:
            continue
        if slot.upload:
            values.append("image")
            continue
        values.append(by_name[slot.name])
        if slot.helpers:
            values += [control] + [""] * (slot.helpers - 1)
    return values


def resave_node(node: dict, node_class: type, links: dict[int, list]) -> None:
    """Rewrite one node as the editor would save it now: widget values, socket inputs in the
    class's order (links kept by input name, the link table's target slots updated), height."""
    node["widgets_values"] = current_widget_values(node, node_class)
    old = {entry["name"]: entry for entry in node.get("inputs") or []}
    inputs = []
    for slot, (name, kind) in enumerate(socket_specs(node_class)):
        link = (old.get(name) or {}).get("link")
        inputs.append({"name": name, "type": kind, "link": link})
        if link is not None:
            links[link][4] = slot
    node["inputs"] = inputs
    node["outputs"] = current_outputs(node, node_class)
    node["size"] = [node["size"][0], max(node["size"][1], min_height(node["type"], node_class))]


def current_outputs(node: Mapping, node_class: type) -> list[dict]:
    """The class's outputs, each keeping the saved links of the output of the same slot and type."""
    names = getattr(node_class, "RETURN_NAMES", None) or node_class.RETURN_TYPES
    saved = node.get("outputs") or []
    outputs = []
    for slot, (name, kind) in enumerate(zip(names, node_class.RETURN_TYPES)):
        entry = (
            dict(saved[slot]) if slot < len(saved) and saved[slot].get("type") == kind else {"links": None}
        )
        entry.update(name=name, type=kind, slot_index=slot)
        outputs.append(entry)
    return outputs


def resave_workflow(workflow: dict, node_classes: Mapping[str, type]) -> dict:
    """Every node of a known class re-saved with resave_node (Notes and unknown types kept)."""
    links = {link[0]: link for link in workflow.get("links") or []}
    for node in workflow.get("nodes") or []:
        node_class = node_classes.get(node["type"])
        if node_class is not None:
            resave_node(node, node_class, links)
    return workflow


# The part of a 1600x1000 browser window where the canvas shows (frontend 1.35.9, measured with
# scripts/editor_check.py): right of the sidebar (59 px), below the tab bar (37 px) and the floating
# workflow name and Run bars (to y 88): (left, top, right, bottom).
VISIBLE = (60, 92, 1596, 940)
# Drawn over that part: the minimap and zoom controls at the bottom right, the canvas info text
# (render time, node counts) at the bottom left.
COVERED = ((1338, 736, 1600, 1000), (0, 912, 140, 1000))


def node_box(node: Mapping) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a node on the canvas, title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


# The node source badge the editor draws above the title bar of a custom node (not of core nodes):
# the pack's folder name at 12 px, right-aligned, 20 px tall with a 2 px gap (LGraphNode.drawBadges,
# frontend 1.35; "comfyui-diffusers-adapters" measured 142 px wide).
BADGE_WIDTH = 150
BADGE_HEIGHT = 22


def badge_box(node: Mapping) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) on the canvas of the source badge above a custom node's title."""
    left, top, right, _bottom = node_box(node)
    return max(left, right - BADGE_WIDTH), top - BADGE_HEIGHT, right, top


def graph_box(workflow: Mapping) -> tuple[float, float, float, float]:
    """The canvas rectangle that holds every node and group."""
    boxes = item_boxes(workflow)
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def item_boxes(workflow: Mapping) -> list[tuple[float, float, float, float]]:
    """(left, top, right, bottom) on the canvas of every node (title bar included) and group."""
    boxes = [node_box(n) for n in workflow.get("nodes") or []]
    groups = [g["bounding"] for g in workflow.get("groups") or []]
    return boxes + [(x, y, x + w, y + h) for x, y, w, h in groups]


def on_screen(box: tuple[float, float, float, float], ds: Mapping) -> tuple[float, float, float, float]:
    """A canvas rectangle where the editor draws it with the view `ds`: screen = (canvas + offset) * scale."""
    (dx, dy), scale = ds["offset"], ds["scale"]
    return ((box[0] + dx) * scale, (box[1] + dy) * scale, (box[2] + dx) * scale, (box[3] + dy) * scale)


def overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def fit_view(workflow: dict) -> None:
    """Save a view (extra.ds) that shows the whole graph in VISIBLE, clear of COVERED: at zoom 1
    when it fits, smaller when it does not, centred across. The editor restores it on opening."""
    left, top, right, bottom = graph_box(workflow)
    margin = 4  # the saved offset is rounded
    width, height = VISIBLE[2] - VISIBLE[0] - 2 * margin, VISIBLE[3] - VISIBLE[1] - 2 * margin
    scale = int(min(1.0, width / (right - left), height / (bottom - top)) * 100) / 100  # rounded down
    boxes = item_boxes(workflow)
    while True:
        dx = (VISIBLE[0] + margin + (width - (right - left) * scale) / 2) / scale - left
        dy = (VISIBLE[1] + margin) / scale - top
        ds = {"scale": scale, "offset": [round(dx, 1), round(dy, 1)]}
        hidden = any(overlaps(on_screen(box, ds), c) for box in boxes for c in COVERED)
        if not hidden or scale <= 0.5:
            break
        scale = round(scale - 0.01, 2)
    workflow.setdefault("extra", {})["ds"] = ds
