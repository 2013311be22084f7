"""Workflow files as strangers write them: read, parsed and checked for shape before anything uses them.

Every refusal is a `WorkflowFormatError` whose message is one line naming the file, the node or the
field (cli.py exits with status 2 on it). Checked here: the file (size, UTF-8, JSON, nesting, a
JSON object at the top) and the API format (node objects, `class_type` text, `inputs` an object,
links `[node_id, output_index]`). The UI format's own fields are checked in `ui_workflow`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .ui_workflow import MAX_NODES, WorkflowFormatError, check_node_count, is_node_id, kind_name

# The largest saved ComfyUI workflows are a few MB of JSON (images are never embedded); parsed JSON
# takes about ten times its size in memory.
MAX_WORKFLOW_BYTES = 64 * 1024 * 1024
# A UI workflow nests about eight levels (workflow, nodes, node, inputs, input, widget, ...); subgraph
# definitions double that. Deeper JSON is refused before the recursive code (copying, hashing) sees it.
MAX_JSON_DEPTH = 64

__all__ = ["MAX_JSON_DEPTH", "MAX_NODES", "MAX_WORKFLOW_BYTES", "load_workflow", "parse_workflow"]


def check_depth(value: Any, source: str = "The workflow") -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH (iteratively: no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            raise WorkflowFormatError(f"{source} is nested more than {MAX_JSON_DEPTH} levels deep.")
        stack.extend((child, depth + 1) for child in children)


def parse_workflow(data: bytes, source: str = "The workflow") -> dict:
    """A workflow (UI or API format) from the bytes of a .json file, its shape checked."""
    if len(data) > MAX_WORKFLOW_BYTES:
        raise WorkflowFormatError(f"{source} is larger than {MAX_WORKFLOW_BYTES // 2**20} MB.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise WorkflowFormatError(f"{source} is not UTF-8 text (byte {e.start}).") from None
    try:
        workflow = json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkflowFormatError(
            f"{source} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}."
        ) from None
    except RecursionError:
        raise WorkflowFormatError(f"{source} is nested too deeply to be a workflow.") from None
    except ValueError:  # Python's limit on integer digits (CVE-2020-10735)
        raise WorkflowFormatError(
            f"{source} has a number of more than {sys.get_int_max_str_digits()} digits."
        ) from None
    check_workflow(workflow, source)
    return workflow


def load_workflow(path: str | Path) -> dict:
    """`parse_workflow` of a file; a file that cannot be read is a WorkflowFormatError too."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_WORKFLOW_BYTES + 1)
    except OSError as e:
        raise WorkflowFormatError(f"Cannot read the workflow {path}: {e.strerror or e}.") from None
    return parse_workflow(data, f"The workflow {path.name}")


def check_workflow(workflow: Any, source: str = "The workflow") -> None:
    """The checks every workflow passes first: an object at the top, not too deep, not empty."""
    if not isinstance(workflow, Mapping):
        raise WorkflowFormatError(
            f"{source} has a {kind_name(workflow)} at the top level; a workflow is a JSON object "
            "(ComfyUI's Save or Export (API))."
        )
    check_depth(workflow, source)
    if not workflow:
        raise WorkflowFormatError(f"{source} has no nodes.")


# ---------------------------------------------------------------- API format
def is_link(value: Any) -> bool:
    """An API-format link `[node_id, output_index]` (ids may be numbers in hand-written prompts)."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and is_node_id(value[0])
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
        and value[1] >= 0
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def normalized_api_prompt(workflow: Mapping) -> dict[str, dict]:
    """A copy of an API-format prompt with text node ids and links `[str(node_id), slot]`; refuses
    nodes that are not objects, a `class_type` that is not text, `inputs` that is not an object and
    lists that are not links (a list value is written `{"__value__": [...]}`)."""
    check_node_count(len(workflow))
    prompt: dict[str, dict] = {}
    for key, node in workflow.items():
        if not is_node_id(key):
            raise WorkflowFormatError(f"The workflow has a node id {_short(key)}; ids are text or numbers.")
        node_id = str(key)
        if node_id in prompt:
            raise WorkflowFormatError(f"Node {node_id} appears twice in the workflow.")
        if not isinstance(node, Mapping):
            raise WorkflowFormatError(
                f"Node {node_id} is a {kind_name(node)}, not an object with class_type and inputs."
            )
        class_type = node.get("class_type")
        if not isinstance(class_type, str) or not class_type:
            problem = (
                "has no class_type"
                if class_type is None
                else f"has a class_type that is a {kind_name(class_type)}"
            )
            raise WorkflowFormatError(f"Node {node_id} {problem}; it must name a node type.")
        inputs = node.get("inputs", {})
        if inputs is None:
            inputs = {}
        if not isinstance(inputs, Mapping) or not all(isinstance(k, str) for k in inputs):
            raise WorkflowFormatError(
                f"Node {node_id} ({class_type}): 'inputs' is a {kind_name(inputs)}, not an object of "
                "input names."
            )
        clean: dict[str, Any] = {}
        for name, value in inputs.items():
            if isinstance(value, list):
                if not is_link(value):
                    raise WorkflowFormatError(
                        f"Node {node_id} ({class_type}): input '{name[:80]}' is a bad link {_short(value)}; "
                        "expected [node_id, output_index]."
                    )
                value = [str(value[0]), value[1]]
            clean[name] = value
        prompt[node_id] = {**node, "class_type": class_type, "inputs": clean}
    return prompt
