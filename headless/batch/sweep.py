"""Sweep specs: which node inputs a batch varies and over which values, checked against the workflow.

A spec is a list of axes (JSON, or repeated `--set NODE.INPUT=VALUES` flags); each axis names a node
(its id, its title, its display name or its type) and a widget input of it, and gives the values: a
list, `{"range": [start, stop, step]}` (stop included, exact decimal steps) or `{"lines": "file.txt"}`.
The items are the cross product, the first axis varying slowest (rows of the contact sheet), the
second next (columns). Every value is checked with the runner's own input checks (INPUT_TYPES bounds,
combo choices, VALIDATE_INPUTS) before anything runs.
"""

from __future__ import annotations

import copy
import graphlib
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from ..runner import WorkflowRunner, WorkflowValidationError
from ..ui_workflow import is_ui_workflow, specs_of, ui_to_api, widget_layout
from ..workflow_file import is_link, normalized_api_prompt

# A sweep of more items than this is almost always a typo (a range step of 0.001); 10,000 tiny
# images already take hours on a GPU. Split bigger sweeps into several batches.
MAX_ITEMS = 10_000
MAX_AXES = 8  # more dimensions than a person can read off contact sheets
MAX_SPEC_BYTES = 1024 * 1024  # a spec or a lines file is hand-written text: a megabyte is plenty
MAX_LINE_CHARS = 10_000  # one prompt line; the text encoders see 77..512 tokens anyway
MAX_PROBLEMS = 20  # value problems listed before "... and N more"


class SweepError(ValueError):
    """A sweep spec that cannot be used; the message names the axis, node, input or file."""


@dataclass(frozen=True)
class Axis:
    """One swept input as the user wrote it (node not yet looked up)."""

    node: str
    input: str
    values: tuple

    @property
    def label(self) -> str:
        return f"{self.node}.{self.input}"


@dataclass(frozen=True)
class Target:
    """An axis found in the workflow: the prompt's node id and where its value sits in the UI JSON."""

    axis: Axis
    node_id: str
    position: int | str | None  # widgets_values index (list) or key (object); None for API prompts
    depth: int  # longest link path from a source node: loaders are shallow, samplers deep
    values: tuple  # the values after the runner's conversion (1 -> 1.0 for a FLOAT)


@dataclass(frozen=True)
class Item:
    """One run of the sweep: its position in sweep order and the value index on every axis."""

    index: int
    coords: tuple[int, ...]


# ---------------------------------------------------------------- spec text -> axes
def _read_text(path: Path, what: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SweepError(f"Cannot read the {what} {path}: {e.strerror or e}.") from None
    if len(data) > MAX_SPEC_BYTES:
        raise SweepError(f"The {what} {path} is larger than {MAX_SPEC_BYTES // 1024} KB.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SweepError(f"The {what} {path} is not UTF-8 text (byte {e.start}).") from None


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SweepError(f"{where}: range bounds must be numbers, not {value!r}.")
    try:
        number = Decimal(str(value))  # str(): 0.2 is "0.2", not 0.200000000000000011...
    except InvalidOperation:
        raise SweepError(f"{where}: {value!r} is not a number.") from None
    if not number.is_finite():
        raise SweepError(f"{where}: {value!r} is not a finite number.")
    return number


def decimal_range(start: Any, stop: Any, step: Any, where: str = "range") -> list[int | float]:
    """start, start+step, ... up to stop included, computed in decimal: [0.2, 1.2, 0.2] gives
    0.6, not 0.6000000000000001. Integers when all three are integers."""
    a, b, s = (_decimal(v, where) for v in (start, stop, step))
    if s == 0 or (b - a) * s < 0:
        raise SweepError(f"{where}: the step {step} never goes from {start} to {stop}.")
    count = int((b - a) / s) + 1
    if count > MAX_ITEMS:
        raise SweepError(f"{where}: {count} values; a sweep has at most {MAX_ITEMS} items.")
    integral = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, stop, step))
    return [int(a + k * s) if integral else float(a + k * s) for k in range(count)]


def _lines(name: Any, base_dir: Path, where: str) -> list[str]:
    if not isinstance(name, str) or not name:
        raise SweepError(f"{where}: 'lines' must name a text file.")
    path = base_dir / name
    lines = [line.strip() for line in _read_text(path, "lines file").splitlines()]
    lines = [line for line in lines if line]
    too_long = next((n for n, line in enumerate(lines, 1) if len(line) > MAX_LINE_CHARS), None)
    if too_long:
        raise SweepError(f"{where}: line {too_long} of {path} is longer than {MAX_LINE_CHARS} characters.")
    return lines


def _values(entry: Mapping, base_dir: Path, where: str) -> tuple:
    given = [k for k in ("values", "range", "lines") if k in entry]
    if len(given) != 1:
        raise SweepError(f"{where}: give exactly one of 'values', 'range' or 'lines'.")
    if "range" in entry:
        bounds = entry["range"]
        if not isinstance(bounds, list) or len(bounds) != 3:
            raise SweepError(f"{where}: 'range' is [start, stop, step], e.g. [0.2, 1.2, 0.2].")
        values = decimal_range(*bounds, where=where)
    elif "lines" in entry:
        values = _lines(entry["lines"], base_dir, where)
    else:
        values = entry["values"]
        if not isinstance(values, list):
            raise SweepError(f"{where}: 'values' must be a list.")
        bad = next((v for v in values if not isinstance(v, (str, int, float, bool))), None)
        if bad is not None:
            raise SweepError(f"{where}: {json.dumps(bad)[:60]} is not a text, number or true/false value.")
    if not values:
        raise SweepError(f"{where}: it has no values.")
    if len(values) > MAX_ITEMS:
        raise SweepError(f"{where}: {len(values)} values; a sweep has at most {MAX_ITEMS} items.")
    return tuple(values)


def parse_axis(entry: Any, base_dir: Path, where: str) -> Axis:
    """One axis object: {"node": ..., "input": ..., and "values" | "range" | "lines"}."""
    if not isinstance(entry, Mapping):
        raise SweepError(f"{where} is not an object with node, input and values.")
    node, name = entry.get("node"), entry.get("input")
    if isinstance(node, bool) or not isinstance(node, (str, int)) or node == "":
        raise SweepError(f"{where}: 'node' must be a node id or title.")
    if not isinstance(name, str) or not name:
        raise SweepError(f"{where}: 'input' must name an input of the node, e.g. \"seed\".")
    unknown = sorted(set(entry) - {"node", "input", "values", "range", "lines"})
    if unknown:
        raise SweepError(f"{where}: unknown field {unknown[0]!r}.")
    return Axis(str(node), name, _values(entry, base_dir, f"{where} ({node}.{name})"))


def parse_spec(spec: Any, base_dir: Path) -> list[Axis]:
    """Axes from a parsed JSON spec: a list of axes, or {"axes": [...]}."""
    if isinstance(spec, Mapping):
        spec = spec.get("axes")
    if not isinstance(spec, list) or not spec:
        raise SweepError('A sweep spec is a list of axes, or {"axes": [...]}, with at least one axis.')
    if len(spec) > MAX_AXES:
        raise SweepError(f"The sweep has {len(spec)} axes; at most {MAX_AXES} are supported.")
    return [parse_axis(entry, base_dir, f"Axis {n + 1}") for n, entry in enumerate(spec)]


def load_spec(path: str | Path) -> list[Axis]:
    """Axes from a JSON spec file; 'lines' files are found next to it."""
    path = Path(path)
    try:
        spec = json.loads(_read_text(path, "sweep spec"))
    except json.JSONDecodeError as e:
        raise SweepError(f"The sweep spec {path} is not valid JSON: {e.msg} at line {e.lineno}.") from None
    except RecursionError:
        raise SweepError(f"The sweep spec {path} is nested too deeply.") from None
    return parse_spec(spec, path.parent)


def _flag_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text  # plain text: a prompt or a file name


def parse_set_flag(flag: str, base_dir: Path = Path(".")) -> Axis:
    """`NODE.INPUT=VALUES`: VALUES is a JSON list, a JSON object ({"range": ...} or {"lines": ...}),
    or comma-separated values. The node is split at the last dot before '=' (titles may hold dots)."""
    target, sep, text = flag.partition("=")
    node, dot, name = target.rpartition(".")
    if not sep or not dot or not node or not name:
        raise SweepError(f"--set {flag[:80]!r}: write NODE.INPUT=VALUES, e.g. Sampler.seed=1,2,3.")
    parsed = _flag_value(text) if text.strip()[:1] in "[{" and text.strip() else None
    if isinstance(parsed, Mapping):
        entry = {"node": node, "input": name, **parsed}
    elif isinstance(parsed, list):
        entry = {"node": node, "input": name, "values": parsed}
    else:
        entry = {"node": node, "input": name, "values": [_flag_value(v.strip()) for v in text.split(",")]}
    return parse_axis(entry, base_dir, f"--set {target}")


# ---------------------------------------------------------------- axes checked against the workflow
def base_prompt(workflow: Mapping, runner: WorkflowRunner) -> dict[str, dict]:
    """The API prompt the workflow runs as (muted and bypassed nodes dropped)."""
    if is_ui_workflow(workflow):
        return ui_to_api(workflow, runner.node_classes)
    return copy.deepcopy(normalized_api_prompt(workflow))


def _find_node(axis: Axis, prompt: Mapping, ui_nodes: Mapping, display: Mapping) -> str:
    """The node an axis names: its id first, else its title, display name or type (one match)."""
    if axis.node in prompt:
        return axis.node
    if axis.node in ui_nodes:
        raise SweepError(f"{axis.label}: node {axis.node} is muted or bypassed, so it does not run.")
    matches = sorted(
        nid
        for nid, node in prompt.items()
        if axis.node
        in {
            (ui_nodes.get(nid) or {}).get("title"),
            (node.get("_meta") or {}).get("title"),
            display.get(node["class_type"]),
            node["class_type"],
        }
    )
    if len(matches) > 1:
        raise SweepError(
            f"{axis.label}: {len(matches)} nodes are called {axis.node!r} (ids {', '.join(matches[:10])}); "
            "name one by its id or give it a title of its own."
        )
    if not matches:
        raise SweepError(f"{axis.label}: no node has the id or title {axis.node!r} in the workflow.")
    return matches[0]


def _ui_position(node: Mapping, node_class: type, name: str, where: str) -> int | str:
    """Where `name`'s value sits in a UI node's widgets_values, choosing the layout the way
    ui_workflow.assign_widget_values does (current, legacy forceInput, or without linked widgets)."""
    values = node.get("widgets_values")
    if isinstance(values, Mapping):
        return name
    values = values or []
    linked = {
        (e.get("widget") or {}).get("name") or e.get("name")
        for e in node.get("inputs") or []
        if e.get("link") is not None
    }
    if name in linked:
        raise SweepError(f"{where}: the input is linked to another node; sweep the node it comes from.")
    slots = widget_layout(node_class)
    current = [s for s in slots if not s.forced]
    layouts = (current, slots, [s for s in current if s.name not in linked or s.upload])
    layout = next((lay for lay in layouts if sum(s.width for s in lay) == len(values)), current)
    position = 0
    for slot in layout:
        if slot.name == name and not (slot.forced or slot.upload):
            if position >= len(values):
                break
            return position
        position += slot.width
    raise SweepError(
        f"{where}: the node's saved widget values do not reach this input; open the workflow in ComfyUI "
        "and save it again."
    )


def _depths(prompt: Mapping) -> dict[str, int]:
    """Longest link path from a source node (graphlib orders the graph)."""
    deps = {
        nid: {v[0] for v in node["inputs"].values() if is_link(v) and v[0] in prompt}
        for nid, node in prompt.items()
    }
    depth: dict[str, int] = {}
    try:
        order = list(graphlib.TopologicalSorter(deps).static_order())
    except graphlib.CycleError:
        return dict.fromkeys(prompt, 0)  # the runner's validation names the cycle
    for nid in order:
        depth[nid] = 1 + max((depth[d] for d in deps[nid]), default=-1)
    return depth


def _checked_values(axis: Axis, node_id: str, prompt: dict, runner: WorkflowRunner) -> tuple:
    """Each value through the runner's own checks for that node; the converted values."""
    problems: list[str] = []
    converted = []
    for value in axis.values:
        trial = dict(prompt)
        node = trial[node_id] = copy.deepcopy(prompt[node_id])
        node["inputs"][axis.input] = value
        found = runner.validate_node(trial, node_id)
        problems += [f"{axis.label} = {str(value)[:60]!r}: {p}" for p in found]
        converted.append(node["inputs"][axis.input])
    if problems:
        raise WorkflowValidationError(problems)
    return tuple(converted)


def _locate(axis: Axis, prompt: Mapping, ui_nodes: Mapping, runner: WorkflowRunner, display: Mapping):
    """(node id, UI widget position) of an axis, or SweepError naming what is wrong."""
    node_id = _find_node(axis, prompt, ui_nodes, display)
    node_class = runner.node_classes[prompt[node_id]["class_type"]]
    where = f"{axis.label} (node {node_id}, {prompt[node_id]['class_type']})"
    names = [name for _, name, _, _ in specs_of(node_class.INPUT_TYPES())]
    if axis.input not in names:
        raise SweepError(f"{where}: the node has no input {axis.input!r}; it has {', '.join(names)}.")
    if is_link(prompt[node_id]["inputs"].get(axis.input)):
        raise SweepError(f"{where}: the input is linked to another node; sweep the node it comes from.")
    position = _ui_position(ui_nodes[node_id], node_class, axis.input, where) if ui_nodes else None
    return node_id, position


def resolve(
    workflow: Mapping, axes: Sequence[Axis], runner: WorkflowRunner, display: Mapping | None = None
) -> list[Target]:
    """Find every axis in the workflow and check all its values; raises SweepError (a wrong spec) or
    WorkflowValidationError (the workflow, or a value the node refuses) before anything runs."""
    count = math.prod(len(a.values) for a in axes)
    if count > MAX_ITEMS:
        raise SweepError(f"The sweep has {count} items; at most {MAX_ITEMS} run in one batch.")
    prompt = base_prompt(workflow, runner)
    ui_nodes = {str(n["id"]): n for n in workflow.get("nodes") or []} if is_ui_workflow(workflow) else {}
    places = [_locate(axis, prompt, ui_nodes, runner, display or {}) for axis in axes]
    seen: dict[tuple[str, str], Axis] = {}
    for axis, (node_id, _) in zip(axes, places):
        twice = seen.setdefault((node_id, axis.input), axis)
        if twice is not axis:
            raise SweepError(f"{axis.label}: node {node_id}'s {axis.input} is swept twice ({twice.label}).")
        # the workflow is checked with the sweep's first values: the saved value of a swept input
        # (a checkpoint the user does not have) does not matter
        prompt[node_id]["inputs"][axis.input] = axis.values[0]
    runner.validate(copy.deepcopy(prompt))  # the rest of the workflow must be valid
    depths = _depths(prompt)
    return [
        Target(
            axis, node_id, position, depths.get(node_id, 0), _checked_values(axis, node_id, prompt, runner)
        )
        for axis, (node_id, position) in zip(axes, places)
    ]


# ---------------------------------------------------------------- items
def items_in_run_order(targets: Sequence[Target]) -> list[Item]:
    """The cross product, numbered in sweep order (first axis slowest), returned in the order to run
    them: axes of upstream nodes (checkpoints, adapters) vary slowest so that the runner's cache keeps
    a loaded model across items and switches it rarely."""
    grid = itertools.product(*(range(len(t.values)) for t in targets))
    items = [Item(n, coords) for n, coords in enumerate(grid)]
    by_depth = sorted(range(len(targets)), key=lambda a: (targets[a].depth, a))
    return sorted(items, key=lambda item: tuple(item.coords[a] for a in by_depth))


def item_values(targets: Sequence[Target], item: Item) -> dict[str, Any]:
    """`{"Node.input": value}` of an item, in axis order."""
    return {t.axis.label: t.values[c] for t, c in zip(targets, item.coords)}


def item_workflow(workflow: Mapping, targets: Sequence[Target], item: Item) -> dict:
    """The workflow with the item's values written where ComfyUI keeps them (UI: widgets_values;
    API: inputs), so that its JSON, saved in the PNG, restores the item in ComfyUI."""
    result = copy.deepcopy(dict(workflow))
    if not is_ui_workflow(result):
        for t, c in zip(targets, item.coords):
            key = next(k for k in result if str(k) == t.node_id)
            result[key].setdefault("inputs", {})[t.axis.input] = t.values[c]
        return result
    nodes = {str(n["id"]): n for n in result["nodes"]}
    for t, c in zip(targets, item.coords):
        nodes[t.node_id]["widgets_values"][t.position] = t.values[c]
    return result
