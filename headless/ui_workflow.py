"""Convert a UI-format workflow (what ComfyUI's "Save" writes) into an API-format prompt.

Follows what the ComfyUI frontend (1.35) does in `graphToPrompt`:

* Widget values are stored per node in `widgets_values`, one entry per widget in widget order:
  the widget inputs of `INPUT_TYPES` (required, then optional), each followed by its helper
  widgets (a "control after generate" value after seed-like INT/FLOAT widgets; a control value
  and a filter string after a combo with `control_after_generate`), then the "upload" button
  of an `image_upload` combo. Widgets converted to sockets keep their place in the list.
* Linked inputs become `[str(origin_id), origin_slot]`; a link overrides a widget's value.
* Reroute nodes are followed to their source; a PrimitiveNode's value is written into the
  widget it feeds; Note / MarkdownNote are ignored.
* Muted nodes (mode 2) are dropped, and so are the inputs that link to them. Bypassed nodes
  (mode 4) are dropped and each of their outputs is routed to one of their inputs of the
  same type.
* List values are wrapped as `{"__value__": [...]}` (a bare list means a link).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

MODE_NEVER = 2  # muted
MODE_BYPASS = 4
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_NAMES = ("seed", "noise_seed")
UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload")
REROUTE = "Reroute"
PRIMITIVE = "PrimitiveNode"
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
VIRTUAL_TYPES = NOTE_TYPES | {REROUTE, PRIMITIVE}


# ComfyUI workflows of real use have tens to a few hundred nodes, the largest about a thousand.
MAX_NODES = 10_000


def one_line(text: str) -> str:
    """`text` with each character that does not print (line breaks, tabs, controls) written as its
    escape: node ids, node types and input names come from the workflow and end up in messages."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class WorkflowError(Exception):
    """A workflow that cannot be converted, validated or run; one line naming the node."""

    def __init__(self, message: str = "") -> None:
        super().__init__(one_line(str(message)))


class WorkflowFormatError(WorkflowError):
    """A workflow file that is not a well-formed workflow; one line naming the node or field."""


def check_node_count(count: int) -> None:
    if count > MAX_NODES:
        raise WorkflowFormatError(f"The workflow has {count} nodes; at most {MAX_NODES} are run.")


def kind_name(value: Any) -> str:
    return (
        "null"
        if value is None
        else {dict: "object", list: "list", str: "text"}.get(type(value), type(value).__name__)
    )


def is_node_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and value != ""
    )


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _list_field(owner: Mapping, field: str, where: str) -> list:
    value = owner.get(field)
    if value is None:
        return []
    if not isinstance(value, list):
        raise WorkflowFormatError(f"{where}: '{field}' is a {kind_name(value)}, not a list.")
    return value


def _check_ui_node(node: Mapping, where: str) -> None:
    if not isinstance(node.get("type"), str):
        raise WorkflowFormatError(
            f"{where}: its type is a {kind_name(node.get('type'))}, not a node type name."
        )
    mode = node.get("mode", 0)
    if mode is not None and not _is_index(mode):
        raise WorkflowFormatError(f"{where}: its mode is {str(mode)[:40]!r}, not a number.")
    values = node.get("widgets_values")
    if values is not None and not isinstance(values, (list, Mapping)):
        raise WorkflowFormatError(f"{where}: 'widgets_values' is a {kind_name(values)}, not a list.")
    for index, entry in enumerate(_list_field(node, "inputs", where)):
        if not isinstance(entry, Mapping):
            raise WorkflowFormatError(f"{where}: inputs[{index}] is a {kind_name(entry)}, not an object.")
        link, widget = entry.get("link"), entry.get("widget")
        if link is not None and not is_node_id(link):
            raise WorkflowFormatError(
                f"{where}: inputs[{index}] has the link {str(link)[:40]!r}, not a link id."
            )
        if widget is not None and not (isinstance(widget, Mapping) and isinstance(widget.get("name"), str)):
            raise WorkflowFormatError(f"{where}: inputs[{index}] has a widget without a name.")
        if link is not None and widget is None and not isinstance(entry.get("name"), str):
            raise WorkflowFormatError(f"{where}: inputs[{index}] is linked but has no name.")
    for index, entry in enumerate(_list_field(node, "outputs", where)):
        if not isinstance(entry, Mapping):
            raise WorkflowFormatError(f"{where}: outputs[{index}] is a {kind_name(entry)}, not an object.")


_LINK_FIELDS = ("id", "origin_id", "origin_slot", "target_id", "target_slot")


def _check_ui_links(workflow: Mapping) -> None:
    seen: set[str] = set()
    for index, link in enumerate(_list_field(workflow, "links", "The workflow")):
        where = f"links[{index}]"
        if isinstance(link, Mapping):
            fields = [link.get(f) for f in _LINK_FIELDS]
        elif isinstance(link, list) and len(link) in (5, 6):
            fields = link[:5]
        else:
            raise WorkflowFormatError(
                f"The workflow's {where} is {str(link)[:60]}; a link is [id, origin_id, origin_slot, "
                "target_id, target_slot, type]."
            )
        link_id, origin, origin_slot, target, target_slot = fields
        if not (is_node_id(link_id) and is_node_id(origin) and is_node_id(target)):
            raise WorkflowFormatError(f"The workflow's {where} has a missing or invalid link or node id.")
        if not (_is_index(origin_slot) and _is_index(target_slot)):
            raise WorkflowFormatError(f"The workflow's {where} (link {link_id}) has an invalid slot number.")
        if str(link_id) in seen:
            raise WorkflowFormatError(f"The workflow's {where}: link id {link_id} appears twice.")
        seen.add(str(link_id))


def check_ui_workflow(workflow: Mapping) -> None:
    """The UI format's fields have the types the frontend writes: refuse the rest with one line
    naming the node or field (not a KeyError or TypeError from deep inside the conversion)."""
    nodes = _list_field(workflow, "nodes", "The workflow")
    check_node_count(len(nodes))
    ids: set[str] = set()
    for index, node in enumerate(nodes):
        if not isinstance(node, Mapping):
            raise WorkflowFormatError(f"The workflow's nodes[{index}] is a {kind_name(node)}, not an object.")
        if not is_node_id(node.get("id")):
            raise WorkflowFormatError(
                f"The workflow's nodes[{index}] ({str(node.get('type'))[:40]}) has no valid id "
                f"({kind_name(node.get('id'))})."
            )
        node_id = str(node["id"])
        if node_id in ids:
            raise WorkflowFormatError(f"Node {node_id} appears twice in the workflow's 'nodes'.")
        ids.add(node_id)
        _check_ui_node(node, f"Node {node_id}")
    _check_ui_links(workflow)
    definitions = workflow.get("definitions")
    if definitions is not None and not isinstance(definitions, Mapping):
        raise WorkflowFormatError(
            f"The workflow's 'definitions' is a {kind_name(definitions)}, not an object."
        )
    for index, subgraph in enumerate(
        _list_field(definitions or {}, "subgraphs", "The workflow's definitions")
    ):
        if not isinstance(subgraph, Mapping) or not (
            subgraph.get("id") is None or is_node_id(subgraph.get("id"))
        ):
            raise WorkflowFormatError(f"The workflow's definitions.subgraphs[{index}] is not a subgraph.")


# ---------------------------------------------------------------- node class introspection
def input_specs(node_class: type) -> list[tuple[str, str, Any, dict]]:
    """`(category, name, type, options)` for the required, then optional, inputs of a class."""
    return specs_of(node_class.INPUT_TYPES())


def specs_of(declared: Mapping) -> list[tuple[str, str, Any, dict]]:
    """`input_specs` from what a class's INPUT_TYPES returned."""
    specs = []
    for category in ("required", "optional"):
        for name, spec in (declared.get(category) or {}).items():
            if not isinstance(spec, (tuple, list)) or not spec:
                spec = (spec,)
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((category, name, spec[0], options))
    return specs


def is_combo(input_type: Any) -> bool:
    return isinstance(input_type, (list, tuple)) or input_type == "COMBO"


def is_widget(input_type: Any, options: Mapping) -> bool:
    """Whether the frontend draws this input as a widget (it may still be linked)."""
    if isinstance(input_type, (list, tuple)):
        return True
    return options.get("widgetType", input_type) in WIDGET_TYPES


def is_force_input(category: str, options: Mapping) -> bool:
    """`forceInput` inputs are sockets only; optional `defaultInput` is read as `forceInput`."""
    return bool(options.get("forceInput")) or (category == "optional" and bool(options.get("defaultInput")))


def helper_widget_count(name: str, input_type: Any, options: Mapping) -> int:
    """How many non-serialised helper widgets the frontend adds right after this widget."""
    control = options.get("control_after_generate")
    if is_combo(input_type):
        return 2 if control else 0  # control value + filter list
    if input_type == "INT":
        if control is None:
            control = name in SEED_NAMES
        return 1 if control else 0
    if input_type == "FLOAT":
        return 1 if control else 0
    return 0


class _Slot:
    """One widget of a node, in widgets_values order."""

    __slots__ = ("name", "input_type", "options", "helpers", "forced", "upload")

    def __init__(self, name, input_type, options, helpers, forced=False, upload=False):
        self.name, self.input_type, self.options = name, input_type, options
        self.helpers, self.forced, self.upload = helpers, forced, upload

    @property
    def width(self) -> int:
        return 1 + self.helpers


def widget_layout(node_class: type, specs: list | None = None) -> list[_Slot]:
    """The widgets of a node class in the order the frontend stores their values.

    Includes `forceInput` inputs (marked `forced`), which only very old workflows stored.
    The upload button of the first required `image_upload` combo comes last: current
    frontends order widgets by the server's `input_order` (required, optional) and append
    widgets the frontend added itself.
    """
    slots: list[_Slot] = []
    upload: _Slot | None = None
    for category, name, input_type, options in specs if specs is not None else input_specs(node_class):
        if not is_widget(input_type, options):
            continue
        forced = is_force_input(category, options)
        slots.append(_Slot(name, input_type, options, helper_widget_count(name, input_type, options), forced))
        if (
            upload is None
            and category == "required"
            and is_combo(input_type)
            and any(options.get(k) is True for k in UPLOAD_OPTIONS)
        ):
            upload = _Slot("upload", "IMAGEUPLOAD", {}, 0, upload=True)
    if upload is not None:
        slots.append(upload)
    return slots


def widget_default(input_type: Any, options: Mapping) -> Any:
    """The value a fresh frontend widget starts with."""
    if "default" in options:
        return options["default"]
    if is_combo(input_type):
        values = input_type if isinstance(input_type, (list, tuple)) else options.get("options") or []
        return values[0] if values else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(input_type)


def _api_value(value: Any) -> Any:
    return {"__value__": value} if isinstance(value, list) else value


# ---------------------------------------------------------------- widgets_values -> inputs
def assign_widget_values(
    node: Mapping, node_class: type, linked: set[str], slots: list[_Slot] | None = None
) -> dict[str, Any]:
    """Widget name -> value for a node, from its `widgets_values` (list or dict); `slots`: its
    class's `widget_layout`, when the caller has it already."""
    slots = widget_layout(node_class) if slots is None else slots
    values = node.get("widgets_values")
    result: dict[str, Any] = {}
    if isinstance(values, Mapping):
        for slot in slots:
            if slot.forced or slot.upload:
                continue
            result[slot.name] = values.get(slot.name, widget_default(slot.input_type, slot.options))
        return result
    values = list(values or [])

    current = [s for s in slots if not s.forced]
    legacy_forced = slots  # old frontends also stored forceInput widgets
    without_linked = [s for s in current if s.name not in linked or s.upload]
    for layout in (current, legacy_forced, without_linked):
        if sum(s.width for s in layout) == len(values):
            break
    else:
        layout = current
        expected = sum(s.width for s in current)
        # Fewer values: the node gained widgets since the workflow was saved; they keep their defaults,
        # as in ComfyUI's frontend. More values than widgets is worth a warning.
        (log.info if len(values) < expected else log.warning)(
            "Node %s (%s): %d widget values, expected %d; assigning them in order.",
            node.get("id"),
            node.get("type"),
            len(values),
            expected,
        )
    position = 0
    for slot in layout:
        if position < len(values):
            value = values[position]
        else:  # fewer values than widgets: the frontend leaves the default in place
            value = widget_default(slot.input_type, slot.options)
        position += slot.width
        if not (slot.forced or slot.upload):
            result[slot.name] = value
    for slot in current:  # widgets skipped by the layout (linked ones) still have a value
        if not slot.upload and slot.name not in result:
            result[slot.name] = widget_default(slot.input_type, slot.options)
    return result


# ---------------------------------------------------------------- graph resolution
def _types_compatible(a: Any, b: Any) -> bool:
    """LiteGraph.isValidConnection for type strings."""
    if not a or not b or a == "*" or b == "*":
        return True
    if not isinstance(a, str) or not isinstance(b, str):
        return a == b
    left = {t.strip().lower() for t in a.split(",")}
    right = {t.strip().lower() for t in b.split(",")}
    return "*" in left or "*" in right or bool(left & right)


class _Graph:
    def __init__(self, workflow: Mapping) -> None:
        self.nodes: dict[str, dict] = {}
        for node in workflow.get("nodes") or []:
            self.nodes[str(node["id"])] = node
        self.links: dict[Any, tuple[str, int, str, int, Any]] = {}
        for link in workflow.get("links") or []:
            if isinstance(link, Mapping):  # workflow schema 1.0
                key = link["id"]
                entry = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"])
                link_type = link.get("type")
            else:
                key, entry, link_type = link[0], tuple(link[1:5]), link[5] if len(link) > 5 else None
            self.links[key] = (str(entry[0]), int(entry[1]), str(entry[2]), int(entry[3]), link_type)

    def link_origin(self, link_id: Any) -> tuple[str, int] | None:
        link = self.links.get(link_id)
        if link is None:
            return None
        return link[0], link[1]

    def _input_origin(self, node: Mapping, index: int) -> tuple[str, int] | None:
        """Where input `index` of `node` is linked from, or None."""
        inputs = node.get("inputs") or []
        if index >= len(inputs):
            return None
        link_id = inputs[index].get("link")
        if link_id is None:
            return None
        origin = self.link_origin(link_id)
        if origin is None:
            log.warning("Node %s: link %s is not in the workflow's links; ignored.", node.get("id"), link_id)
        return origin

    def resolve_output(self, node_id: str, slot: int, wanted_type: Any, seen: set) -> tuple[str, Any] | None:
        """Follow a link's origin through Reroute / bypassed nodes (a loop, not recursion: chains of
        thousands of reroutes are valid).

        Returns ("link", [node_id, slot]), ("value", primitive value), ("muted", None), or
        None when nothing feeds the input.
        """
        while True:
            key = (node_id, slot)
            if key in seen:
                raise WorkflowError(f"Node {node_id}: circular link through reroute or bypassed nodes.")
            seen.add(key)
            node = self.nodes.get(node_id)
            if node is None:
                log.warning("A link comes from node %s, which is not in the workflow; ignored.", node_id)
                return None
            node_type = node.get("type")
            mode = node.get("mode", 0)
            if node_type == PRIMITIVE:
                values = node.get("widgets_values")
                if isinstance(values, Mapping):
                    values = list(values.values())
                return ("value", values[0]) if values else None
            if node_type in NOTE_TYPES:
                return None
            if node_type == REROUTE:
                index = 0
            elif mode == MODE_NEVER:
                return ("muted", None)
            elif mode == MODE_BYPASS:
                index = self._bypass_input(node, slot, wanted_type)
                if index < 0:
                    log.warning(
                        "Bypassed node %s has no input of type %s; the link is dropped.", node_id, wanted_type
                    )
                    return None
            else:
                return ("link", [node_id, slot])
            origin = self._input_origin(node, index)
            if origin is None:
                return None
            node_id, slot = origin

    def resolve_input(self, node: Mapping, index: int, wanted_type: Any, seen: set):
        origin = self._input_origin(node, index)
        if origin is None:
            return None
        return self.resolve_output(origin[0], origin[1], wanted_type, seen)

    @staticmethod
    def _bypass_input(node: Mapping, slot: int, wanted_type: Any) -> int:
        """The frontend's choice of input that a bypassed node's output `slot` passes on."""
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        if wanted_type in ("*", "", None):
            return slot if len(inputs) > slot else 0
        out_type = outputs[slot].get("type") if slot < len(outputs) else None
        if slot < len(inputs):
            in_type = inputs[slot].get("type")
            if _types_compatible(in_type, out_type) and _types_compatible(in_type, wanted_type):
                return slot
        for i, entry in enumerate(inputs):
            if entry.get("type") == wanted_type:
                return i
        for i, entry in enumerate(inputs):
            t = entry.get("type")
            if _types_compatible(t, out_type) and _types_compatible(t, wanted_type):
                return i
        return -1


# ---------------------------------------------------------------- conversion
def is_ui_workflow(workflow: Mapping) -> bool:
    return isinstance(workflow, Mapping) and "nodes" in workflow and "links" in workflow


def ui_to_api(workflow: Mapping, node_classes: Mapping[str, type]) -> dict[str, dict]:
    """Convert a UI-format workflow to an API-format prompt `{id: {class_type, inputs}}`."""
    if not is_ui_workflow(workflow):
        raise WorkflowError("Not a UI-format workflow: it needs 'nodes' and 'links'.")
    check_ui_workflow(workflow)
    graph = _Graph(workflow)
    subgraph_ids = {sg.get("id") for sg in (workflow.get("definitions") or {}).get("subgraphs") or []}
    prompt: dict[str, dict] = {}
    layouts: dict[type, list[_Slot]] = {}  # INPUT_TYPES once per class, not once per node
    for node_id, node in graph.nodes.items():
        node_type = node.get("type")
        mode = node.get("mode", 0)
        if node_type in VIRTUAL_TYPES or mode in (MODE_NEVER, MODE_BYPASS):
            continue
        if node_type in subgraph_ids:
            raise NotImplementedError(
                f"Node {node_id} is a subgraph; the headless runner does not run subgraphs. "
                "Unpack it in ComfyUI (right-click > Unpack Subgraph) and save the workflow again."
            )
        node_class = node_classes.get(node_type)
        if node_class is None:
            raise WorkflowError(
                f"Node {node_id}: unknown node type {node_type!r}. It is not one of this pack's nodes "
                "or the LoadImage/SaveImage/PreviewImage stand-ins."
            )
        ui_inputs = node.get("inputs") or []
        linked = {
            (entry.get("widget") or {}).get("name") or entry.get("name")
            for entry in ui_inputs
            if entry.get("link") is not None
        }
        if node_class not in layouts:
            layouts[node_class] = widget_layout(node_class)
        widgets = assign_widget_values(node, node_class, linked, layouts[node_class])
        inputs = {name: _api_value(v) for name, v in widgets.items()}
        for index, entry in enumerate(ui_inputs):
            if entry.get("link") is None:
                continue
            name = (entry.get("widget") or {}).get("name") or entry.get("name")
            resolved = graph.resolve_input(node, index, entry.get("type"), set())
            if resolved is None:
                continue
            kind, value = resolved
            if kind == "link":
                inputs[name] = [str(value[0]), int(value[1])]
            elif kind == "value":
                inputs[name] = _api_value(value)
            else:  # linked to a muted node: the frontend drops the input altogether
                inputs.pop(name, None)
        prompt[node_id] = {
            "class_type": node_type,
            "inputs": inputs,
            "_meta": {"title": node.get("title") or node_type},
        }
    for entry in prompt.values():  # links to nodes that are not in the prompt are dropped
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt
