"""Execute a ComfyUI workflow with V1 node classes, the way ComfyUI's executor does.

* Only nodes that an output node (`OUTPUT_NODE = True`) depends on run, upstream first.
* Inputs are validated before anything runs (missing required inputs, link types, INT/FLOAT
  ranges, combo values, `VALIDATE_INPUTS`); every problem is reported in one error.
* Outputs are cached across runs of the same runner, keyed by the node class, its input
  values, its upstream signatures and its `IS_CHANGED` result: a re-run executes only what
  changed. Like ComfyUI's default cache, only the entries of the latest workflow are kept.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections.abc import Mapping
from typing import Any

from ..nodes import comfy_host
from .ui_workflow import (
    WorkflowError,
    WorkflowFormatError,
    is_combo,
    is_ui_workflow,
    one_line,
    specs_of,
    ui_to_api,
)
from .workflow_file import check_workflow, is_link, load_workflow, normalized_api_prompt, parse_workflow

log = logging.getLogger(__name__)

__all__ = [
    "WorkflowError",
    "WorkflowFormatError",
    "WorkflowValidationError",
    "WorkflowRunner",
    "load_workflow",
    "parse_workflow",
]


# What a person reads of a refused workflow: the first problems, each on one line of bounded length.
MAX_PROBLEMS_SHOWN = 20
MAX_PROBLEM_CHARS = 300


class WorkflowValidationError(WorkflowError):
    """The workflow failed validation; `problems` lists one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = [one_line(p) for p in problems]
        # One line per problem: Exception's own __init__, not WorkflowError's one-line message.
        Exception.__init__(self, "The workflow is not valid:\n" + "\n".join(f"- {p}" for p in self.shown()))

    def __reduce__(self):  # pickled (a Ray worker's error) with its problems, not its text
        return (type(self), (self.problems,))

    def shown(self, limit: int = MAX_PROBLEMS_SHOWN, width: int = MAX_PROBLEM_CHARS) -> list[str]:
        """The problems to show: the first `limit`, each cut to `width` characters (a workflow of
        thousands of broken nodes, or a node id of a megabyte, must not flood the terminal)."""
        lines = [p if len(p) <= width else p[: width - 3] + "..." for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more problems.")
        return lines


_CONVERTERS = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}


_is_link = is_link


def _sort_key(node_id: str):
    # ASCII digits only: "²".isdigit() is true but int() refuses it
    return (0, int(node_id), "") if node_id.isascii() and node_id.isdigit() else (1, 0, node_id)


def _cycle_text(cycle: list[str]) -> str:
    if len(cycle) > 12:  # a cycle through a long chain: its ends, not a screenful of ids
        cycle = [*cycle[:6], f"... ({len(cycle) - 9} more)", *cycle[-3:]]
    return " -> ".join(cycle)


class _Unhashable:
    """Stands for a value that cannot be compared: never equal to anything (always re-run)."""

    __slots__ = ()


def _hashable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return (type(value).__name__, value)
    if isinstance(value, (list, tuple)):
        return ("seq", tuple(_hashable(v) for v in value))
    if isinstance(value, Mapping):
        items = sorted(((str(k), _hashable(v)) for k, v in value.items()), key=lambda kv: kv[0])
        return ("map", tuple(items))
    return _Unhashable()


class _Signature:
    """A node's cache key; hashes once, so nested upstream signatures stay cheap."""

    __slots__ = ("key", "_hash")

    def __init__(self, key: tuple) -> None:
        self.key = key
        self._hash = hash(key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, _Signature) and self._hash == other._hash and self.key == other.key
        )


class _CacheEntry:
    __slots__ = ("outputs", "ui")

    def __init__(self, outputs: tuple, ui: dict | None) -> None:
        self.outputs, self.ui = outputs, ui


def _validate_node_input(received: Any, expected: Any) -> bool:
    """ComfyUI's link type check: equal, '*', a combo list, or overlapping 'A,B' unions."""
    if received == expected or received == "*" or expected == "*":
        return True
    if isinstance(received, (list, tuple)) and expected == "COMBO":
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    left = {t.strip() for t in received.split(",")}
    right = {t.strip() for t in expected.split(",")}
    return "*" in left or "*" in right or bool(left & right)


def _function_params(fn: Any) -> tuple[set[str], bool]:
    """The parameter names of a (bound) callable and whether it takes **kwargs."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _check_widget(
    where: str, inputs: dict, name: str, input_type: Any, options: Mapping, self_validated: bool
) -> str | None:
    """Convert a widget value in place as ComfyUI does and check it against its declaration; the
    problem, or None. `self_validated`: the class's VALIDATE_INPUTS checks range and choices."""
    value = inputs[name]
    if isinstance(value, Mapping) and "__value__" in value:
        value = inputs[name] = value["__value__"]
    try:
        convert = _CONVERTERS.get(input_type) if isinstance(input_type, str) else None
        if convert is not None:
            value = inputs[name] = convert(value)
    except (TypeError, ValueError, OverflowError) as exc:
        return f"{where}: input '{name}': cannot convert {value!r} to {input_type} ({exc})."
    if input_type == "FLOAT" and not math.isfinite(value):
        return f"{where}: input '{name}': {value} is not a finite number."
    if self_validated:
        return None
    if "min" in options and value < options["min"]:
        return f"{where}: input '{name}': value {value} is smaller than the minimum {options['min']}."
    if "max" in options and value > options["max"]:
        return f"{where}: input '{name}': value {value} is bigger than the maximum {options['max']}."
    if is_combo(input_type):
        choices = input_type if input_type != "COMBO" else options.get("options") or []
        if value not in choices:
            listed = f"{len(choices)} choices" if len(choices) > 20 else repr(list(choices))
            return f"{where}: input '{name}': {value!r} is not one of {listed}."
    return None


class WorkflowRunner:
    """Runs API- or UI-format workflows with the given node classes (`NODE_CLASS_MAPPINGS`)."""

    def __init__(self, node_classes: Mapping[str, type]) -> None:
        self.node_classes = dict(node_classes)
        self._cache: dict[_Signature, _CacheEntry] = {}
        self._objects: dict[tuple[str, str], Any] = {}
        self.executed: list[str] = []  # node ids executed by the last run (not from cache)
        self.outputs: dict[str, tuple] = {}  # every node's outputs in the last run
        self._declared: dict[type, dict] = {}  # INPUT_TYPES() of each class, once per run

    def _input_types(self, node_class: type) -> dict:
        """A class's INPUT_TYPES(), asked once per run: it lists model folders, and a workflow may
        have thousands of nodes of one class."""
        if node_class not in self._declared:
            declared = node_class.INPUT_TYPES()
            self._declared[node_class] = declared if isinstance(declared, Mapping) else {}
        return self._declared[node_class]

    def _specs(self, node_class: type) -> list:
        return specs_of(self._input_types(node_class))

    # ------------------------------------------------------------ entry point
    def run(self, workflow: Mapping, extra_pnginfo: dict | None = None) -> dict[str, dict]:
        """Run a workflow; returns `{node_id: {"ui": dict, "result": tuple}}` for every output
        node and every node that returned a `ui` dict, cached ones included."""
        check_workflow(workflow)
        self._declared = {}
        if is_ui_workflow(workflow):
            prompt = ui_to_api(workflow, self.node_classes)
            if extra_pnginfo is None:
                extra_pnginfo = {"workflow": workflow}
        else:
            prompt = copy.deepcopy(normalized_api_prompt(workflow))
        self.executed = []
        order = self._validate(prompt)
        extra = {"prompt": copy.deepcopy(prompt), "extra_pnginfo": extra_pnginfo}

        signatures = self._signatures(prompt, order, extra)
        wanted = set(signatures.values())
        self._cache = {sig: entry for sig, entry in self._cache.items() if sig in wanted}
        live = {(nid, prompt[nid]["class_type"]) for nid in order}
        self._objects = {k: v for k, v in self._objects.items() if k in live}

        outputs: dict[str, tuple] = {}
        results: dict[str, dict] = {}
        for node_id in order:
            class_type = prompt[node_id]["class_type"]
            node_class = self.node_classes[class_type]
            signature = signatures[node_id]
            entry = self._cache.get(signature)
            if entry is None:
                comfy_host.check_interrupted()
                entry = self._execute(node_id, prompt[node_id], node_class, outputs, extra)
                self._cache[signature] = entry
                self.executed.append(node_id)
            outputs[node_id] = entry.outputs
            if getattr(node_class, "OUTPUT_NODE", False) or entry.ui is not None:
                results[node_id] = {"ui": entry.ui or {}, "result": entry.outputs}
        self.outputs = outputs
        return results

    # ------------------------------------------------------------ validation
    def validate(self, prompt: dict) -> list[str]:
        """Check an API prompt as `run` does (INPUT_TYPES asked afresh), converting widget values in
        place; the node ids a run would execute, in order. Raises WorkflowValidationError."""
        self._declared = {}
        return self._validate(prompt)

    def _validate(self, prompt: dict) -> list[str]:
        """Validate; returns the node ids to execute in topological order."""
        problems: list[str] = []
        for node_id, node in prompt.items():
            if not isinstance(node, Mapping) or "class_type" not in node:
                problems.append(f"Node {node_id}: it has no class_type.")
            elif node["class_type"] not in self.node_classes:
                problems.append(f"Node {node_id}: unknown node type {node['class_type']!r}.")
            elif not isinstance(node.get("inputs", {}), Mapping):
                problems.append(f"Node {node_id} ({node['class_type']}): 'inputs' is not a mapping.")
        if problems:
            raise WorkflowValidationError(problems)
        for node in prompt.values():
            node.setdefault("inputs", {})

        output_ids = sorted(
            (
                nid
                for nid, n in prompt.items()
                if getattr(self.node_classes[n["class_type"]], "OUTPUT_NODE", False)
            ),
            key=_sort_key,
        )
        if not output_ids:
            raise WorkflowValidationError(
                ["The workflow has no output node (such as SaveImage or PreviewImage)."]
            )

        order = self._execution_order(prompt, output_ids)
        for node_id in order:
            problems.extend(self.validate_node(prompt, node_id))
        if problems:
            raise WorkflowValidationError(problems)
        return order

    @staticmethod
    def _execution_order(prompt: dict, output_ids: list[str]) -> list[str]:
        """The nodes the outputs need, upstream first (depth first, inputs by name, as ComfyUI
        orders them); a loop with an explicit stack, so chains of thousands of nodes are fine."""

        def upstream(node_id: str) -> list[str]:
            inputs = prompt[node_id]["inputs"]
            return [inputs[n][0] for n in sorted(inputs) if _is_link(inputs[n]) and inputs[n][0] in prompt]

        order: list[str] = []
        state: dict[str, int] = {}  # 1 = on the current path, 2 = done
        for root in output_ids:
            if state.get(root) == 2:
                continue
            state[root] = 1
            path, stack = [root], [iter(upstream(root))]
            while stack:
                for dep in stack[-1]:
                    if state.get(dep) == 2:
                        continue
                    if state.get(dep) == 1:
                        cycle = path[path.index(dep) :] + [dep]
                        raise WorkflowValidationError([f"The workflow has a cycle: {_cycle_text(cycle)}."])
                    state[dep] = 1
                    path.append(dep)
                    stack.append(iter(upstream(dep)))
                    break
                else:
                    stack.pop()
                    done = path.pop()
                    state[done] = 2
                    order.append(done)
        return order

    def validate_node(self, prompt: dict, node_id: str) -> list[str]:
        """The problems of one node's inputs as a run would find them (values converted in place)."""
        node = prompt[node_id]
        class_type = node["class_type"]
        node_class = self.node_classes[class_type]
        where = f"Node {node_id} ({class_type})"
        if getattr(node_class, "INPUT_IS_LIST", False) or any(
            getattr(node_class, "OUTPUT_IS_LIST", None) or ()
        ):
            raise NotImplementedError(
                f"{where}: INPUT_IS_LIST / OUTPUT_IS_LIST nodes are not supported by the headless runner."
            )
        inputs = node["inputs"]
        problems: list[str] = []
        validate_fn = getattr(node_class, "VALIDATE_INPUTS", None)
        validate_params, validate_kwargs = _function_params(validate_fn) if validate_fn else (set(), False)
        received_types: dict[str, Any] = {}
        try:
            specs = self._specs(node_class)
        except Exception as exc:
            return [f"{where}: INPUT_TYPES failed: {exc}"]

        for category, name, input_type, options in specs:
            if name not in inputs:
                if category == "required":
                    problems.append(f"{where}: required input '{name}' is missing.")
                continue
            if isinstance(inputs[name], list):
                problem, received = self._check_link(prompt, where, name, inputs[name])
                if received is not None:
                    received_types[name] = received
                    if "input_types" not in validate_params and not _validate_node_input(
                        received, input_type
                    ):
                        link = inputs[name]
                        problem = (
                            f"{where}: input '{name}' expects {input_type} but node {link[0]} "
                            f"({prompt[link[0]]['class_type']}) output {link[1]} is {received}."
                        )
            else:
                self_validated = name in validate_params or validate_kwargs
                problem = _check_widget(where, inputs, name, input_type, options, self_validated)
            if problem:
                problems.append(problem)

        if validate_fn is not None and (validate_params or validate_kwargs):
            problems += self._run_validate_inputs(
                node_id, prompt, validate_fn, validate_params, validate_kwargs, received_types
            )
        return problems

    def _check_link(self, prompt: dict, where: str, name: str, value: list) -> tuple[str | None, Any]:
        """(problem, None) for a bad link, else (None, the linked output's type)."""
        if not _is_link(value):
            return f"{where}: input '{name}' is a bad link {value!r}; expected [node_id, slot].", None
        origin = prompt.get(value[0])
        if origin is None:
            return f"{where}: input '{name}' links to node {value[0]}, which is not in the workflow.", None
        return_types = getattr(self.node_classes[origin["class_type"]], "RETURN_TYPES", ())
        if not 0 <= value[1] < len(return_types):
            return (
                f"{where}: input '{name}' links to output {value[1]} of node {value[0]} "
                f"({origin['class_type']}), which has {len(return_types)} outputs."
            ), None
        return None, return_types[value[1]]

    def _run_validate_inputs(
        self, node_id: str, prompt: dict, validate_fn: Any, params: set[str], kwargs: bool, received: dict
    ) -> list[str]:
        """The node class's own VALIDATE_INPUTS, as ComfyUI calls it."""
        node = prompt[node_id]
        where = f"Node {node_id} ({node['class_type']})"
        node_class = self.node_classes[node["class_type"]]
        args = self._constant_inputs(node_id, node, node_class, prompt, None)
        args = {k: v for k, v in args.items() if k in params or kwargs}
        if "input_types" in params:
            args["input_types"] = received
        try:
            verdict = validate_fn(**args)
        except Exception as exc:
            return [f"{where}: VALIDATE_INPUTS raised {type(exc).__name__}: {exc}"]
        if verdict is True:
            return []
        detail = "custom validation failed" if verdict is False or verdict is None else str(verdict)
        return [f"{where}: {detail}"]

    # ------------------------------------------------------------ inputs and signatures
    def _hidden_inputs(self, node_id: str, node_class: type, extra: dict) -> dict[str, Any]:
        hidden = (self._input_types(node_class).get("hidden") or {}).items()
        values: dict[str, Any] = {}
        for name, kind in hidden:
            kind = kind[0] if isinstance(kind, (tuple, list)) else kind
            if kind == "PROMPT":
                values[name] = extra["prompt"]
            elif kind == "EXTRA_PNGINFO":
                values[name] = extra["extra_pnginfo"]
            elif kind == "UNIQUE_ID":
                values[name] = node_id
            elif kind == "DYNPROMPT":
                values[name] = None
        return values

    def _constant_inputs(self, node_id, node, node_class, prompt, extra) -> dict[str, Any]:
        """Declared inputs with links replaced by None, plus hidden ones (what ComfyUI hands to
        IS_CHANGED and VALIDATE_INPUTS)."""
        declared = {name for _, name, _, _ in self._specs(node_class)}
        values = {k: (None if _is_link(v) else v) for k, v in node["inputs"].items() if k in declared}
        values.update(
            self._hidden_inputs(node_id, node_class, extra or {"prompt": prompt, "extra_pnginfo": None})
        )
        return values

    def _signatures(self, prompt: dict, order: list[str], extra: dict) -> dict[str, _Signature]:
        canonical = {sig: sig for sig in self._cache}
        signatures: dict[str, _Signature] = {}
        for node_id in order:
            node = prompt[node_id]
            node_class = self.node_classes[node["class_type"]]
            parts: list[Any] = [
                node["class_type"],
                self._is_changed(node_id, node, node_class, prompt, extra),
            ]
            hidden_kinds = (self._input_types(node_class).get("hidden") or {}).values()
            if getattr(node_class, "NOT_IDEMPOTENT", False) or "UNIQUE_ID" in hidden_kinds:
                parts.append(("node", node_id))
            for name in sorted(node["inputs"]):
                value = node["inputs"][name]
                if _is_link(value):
                    parts.append((name, "link", signatures[value[0]], value[1]))
                else:
                    parts.append((name, _hashable(value)))
            sig = _Signature(tuple(parts))
            signatures[node_id] = canonical.setdefault(sig, sig)
        return signatures

    def _is_changed(self, node_id, node, node_class, prompt, extra) -> Any:
        is_changed = getattr(node_class, "IS_CHANGED", None)
        if is_changed is None:
            return False
        try:
            value = is_changed(**self._constant_inputs(node_id, node, node_class, prompt, extra))
        except Exception as exc:
            log.warning(
                "Node %s (%s): IS_CHANGED failed (%s); it will run again.", node_id, node["class_type"], exc
            )
            return _Unhashable()
        if isinstance(value, float) and math.isnan(value):
            return _Unhashable()
        return _hashable(value)

    # ------------------------------------------------------------ execution
    def _execute(self, node_id: str, node: dict, node_class: type, outputs: dict, extra: dict) -> _CacheEntry:
        class_type = node["class_type"]
        where = f"Node {node_id} ({class_type})"
        specs = {name: options for _, name, _, options in self._specs(node_class)}
        kwargs: dict[str, Any] = {}
        for name, value in node["inputs"].items():
            if name not in specs:
                continue
            if _is_link(value) and not specs[name].get("rawLink"):
                upstream = outputs[value[0]]
                if value[1] >= len(upstream):
                    raise WorkflowError(
                        f"{where}: input '{name}' wants output {value[1]} of node {value[0]}, "
                        f"which returned {len(upstream)} outputs."
                    )
                value = upstream[value[1]]
            kwargs[name] = value
        kwargs.update(self._hidden_inputs(node_id, node_class, extra))

        key = (node_id, class_type)
        try:
            obj = self._objects.get(key)
            if obj is None:
                obj = self._objects[key] = node_class()
            returned = getattr(obj, node_class.FUNCTION)(**kwargs)
        except comfy_host.Interrupted:
            raise
        except Exception as exc:
            message = str(exc) or type(exc).__name__
            raise WorkflowError(f"{where}: {message}") from exc

        ui = None
        if isinstance(returned, Mapping):
            if "expand" in returned:
                raise NotImplementedError(
                    f"{where}: node expansion ('expand') is not supported by the headless runner."
                )
            ui = returned.get("ui")
            result = returned.get("result", ())
        else:
            result = returned
        if result is None and not getattr(node_class, "RETURN_TYPES", ()):
            result = ()
        if not isinstance(result, (tuple, list)):
            raise WorkflowError(
                f"{where}: the node returned {type(result).__name__}, expected a tuple of outputs."
            )
        return _CacheEntry(tuple(result), ui)
