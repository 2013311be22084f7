"""Malformed workflow files through the headless runner and cli.py: one clear line naming the node or
field, exit status 2; long but valid chains run (no recursion)."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui_diffusers_adapters.headless.runner import WorkflowError, WorkflowRunner, WorkflowValidationError
from comfyui_diffusers_adapters.headless.standin_nodes import STANDIN_NODE_CLASS_MAPPINGS
from comfyui_diffusers_adapters.headless.ui_workflow import ui_to_api

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_cli_under_test", ROOT / "cli.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


class Pass:
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "go"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    def go(self, images):
        return (images,)


NODES = {**STANDIN_NODE_CLASS_MAPPINGS, "Pass": Pass}


@pytest.fixture
def folders(tmp_path, monkeypatch, models_root):
    for name in ("input", "output", "temp"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(f"DIFFUSERS_ADAPTERS_{name.upper()}", str(tmp_path / name))
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "input" / "a.png")
    return tmp_path


def run_cli(folders, text: str | bytes) -> tuple[int, str]:
    """cli.py run in this process (cheap); the slow test below runs it as a subprocess."""
    path = folders / "wf.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    argv = ["run", str(path), "--models", str(folders / "models"), "--input", str(folders / "input")]
    argv += ["--output", str(folders / "output")]
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(argv)
    return code, err.getvalue()


def load_save(images_input=None) -> dict:
    images_input = ["1", 0] if images_input is None else images_input
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": images_input, "filename_prefix": "x"}},
    }


def ui(nodes, links) -> dict:
    return {"nodes": nodes, "links": links, "version": 0.4}


def ui_node(node_id, node_type, inputs=(), widgets=()):
    return {
        "id": node_id,
        "type": node_type,
        "mode": 0,
        "inputs": list(inputs),
        "widgets_values": list(widgets),
    }


def ui_load_save(**change) -> dict:
    nodes = [
        ui_node(1, "LoadImage", widgets=["a.png", "image"]),
        ui_node(2, "SaveImage", [{"name": "images", "type": "IMAGE", "link": 1}], ["x"]),
    ]
    workflow = ui(nodes, [[1, 1, 0, 2, 0, "IMAGE"]])
    workflow.update(change)
    return workflow


def _api(**node2):
    prompt = load_save()
    prompt["2"] = node2
    return json.dumps(prompt)


MALFORMED = {
    # the file
    "not-json": ('{"1": {"class_type": ', "not valid JSON.*line 1"),
    "not-utf8": (b'{"1": "\xff\xfe"}', "UTF-8"),
    "empty-file": ("", "not valid JSON"),
    "top-level-list": ("[1, 2]", "list at the top level"),
    "top-level-null": ("null", "null at the top level"),
    "top-level-string": ('"x"', "top level"),
    "deep-nesting": ("[" * 100_000 + "]" * 100_000, "nested"),
    "deep-nesting-inside": (
        json.dumps({"1": {"class_type": "X", "inputs": {"a": [[[[[[]]]]]]}}}).replace(
            "[[[[[[]]]]]]", "[" * 2000 + "]" * 2000
        ),
        "nested",
    ),
    "huge-int": ('{"1": {"class_type": "LoadImage", "inputs": {"image": 1' + "1" * 5000 + "}}}", "digits"),
    "empty-object": ("{}", "no nodes"),
    # API format
    "node-not-object": ('{"1": 5, "2": {"class_type": "SaveImage", "inputs": {}}}', "Node 1"),
    "no-class-type": (_api(inputs={}), "Node 2.*class_type"),
    "class-type-list": (_api(class_type=["SaveImage"], inputs={}), "Node 2.*class_type"),
    "class-type-null": (_api(class_type=None, inputs={}), "Node 2.*class_type"),
    "class-type-dict": (_api(class_type={"a": 1}, inputs={}), "Node 2.*class_type"),
    "inputs-list": (_api(class_type="SaveImage", inputs=[["1", 0]]), "Node 2.*inputs"),
    "inputs-string": (_api(class_type="SaveImage", inputs="x"), "Node 2.*inputs"),
    "link-node-list": (json.dumps(load_save([["1"], 0])), "Node 2.*'images'"),
    "link-node-dict": (json.dumps(load_save([{"a": 1}, 0])), "Node 2.*'images'"),
    "link-arity-3": (json.dumps(load_save(["1", 0, 0])), "Node 2.*'images'"),
    "link-arity-1": (json.dumps(load_save(["1"])), "Node 2.*'images'"),
    "link-slot-string": (json.dumps(load_save(["1", "0"])), "Node 2.*'images'"),
    "link-slot-bool": (json.dumps(load_save(["1", True])), "Node 2.*'images'"),
    "link-slot-negative": (json.dumps(load_save(["1", -1])), "Node 2.*'images'"),
    "link-slot-float": (json.dumps(load_save(["1", 0.5])), "Node 2.*'images'"),
    "link-slot-huge": (json.dumps(load_save(["1", 10**30])), "Node 2.*'images'"),
    "link-to-nothing": (json.dumps(load_save(["7", 0])), "Node 2.*node 7"),
    "unicode-digit-id": (json.dumps({"²": load_save()["2"]}), "Node ².*node 1"),
    "nan-image-name": (
        json.dumps(load_save() | {"1": {"class_type": "LoadImage", "inputs": {"image": float("nan")}}}),
        "Node 1",
    ),
    # UI format
    "nodes-not-list": (json.dumps(ui({"1": {}}, [])), "'nodes'"),
    "ui-node-not-object": (json.dumps(ui([5], [])), "nodes\\[0\\]"),
    "node-without-id": (json.dumps(ui([{"type": "SaveImage"}], [])), "nodes\\[0\\].*id"),
    "node-id-null": (json.dumps(ui([ui_node(None, "SaveImage")], [])), "nodes\\[0\\].*id"),
    "node-id-list": (json.dumps(ui([ui_node([1], "SaveImage")], [])), "nodes\\[0\\].*id"),
    "node-id-bool": (json.dumps(ui([ui_node(True, "SaveImage")], [])), "nodes\\[0\\].*id"),
    "duplicate-ids": (
        json.dumps(ui([ui_node(1, "LoadImage"), ui_node(1, "SaveImage")], [])),
        "Node 1.*twice",
    ),
    "type-not-string": (json.dumps(ui([ui_node(1, ["SaveImage"])], [])), "Node 1.*type"),
    "type-missing": (json.dumps(ui([{"id": 1}], [])), "Node 1.*type"),
    "mode-string": (json.dumps(ui([ui_node(1, "SaveImage") | {"mode": "x"}], [])), "Node 1.*mode"),
    "ui-inputs-dict": (
        json.dumps(ui([ui_node(2, "SaveImage") | {"inputs": {"images": 1}}], [])),
        "Node 2.*inputs",
    ),
    "ui-input-entry-int": (json.dumps(ui([ui_node(2, "SaveImage", [5])], [])), "Node 2.*inputs"),
    "ui-input-link-list": (
        json.dumps(ui([ui_node(2, "SaveImage", [{"name": "images", "type": "IMAGE", "link": [1]}])], [])),
        "Node 2.*link",
    ),
    "ui-input-name-missing": (
        json.dumps(
            ui_load_save(
                nodes=[
                    ui_node(1, "LoadImage", widgets=["a.png", "image"]),
                    ui_node(2, "SaveImage", [{"link": 1}], ["x"]),
                ]
            )
        ),
        "Node 2.*name",
    ),
    "outputs-not-list": (json.dumps(ui([ui_node(1, "SaveImage") | {"outputs": 3}], [])), "Node 1.*outputs"),
    "widgets-int": (
        json.dumps(ui([ui_node(2, "SaveImage") | {"widgets_values": 5}], [])),
        "Node 2.*widgets_values",
    ),
    "widgets-string": (
        json.dumps(ui([ui_node(2, "SaveImage") | {"widgets_values": "xyz"}], [])),
        "Node 2.*widgets_values",
    ),
    "links-not-list": (json.dumps(ui_load_save(links={"1": 1})), "'links'"),
    "link-short": (json.dumps(ui_load_save(links=[[1, 1, 0]])), "links\\[0\\]"),
    "link-not-list": (json.dumps(ui_load_save(links=[7])), "links\\[0\\]"),
    "link-wrong-types": (json.dumps(ui_load_save(links=[[1, "a", "b", 2, 0, "IMAGE"]])), "links\\[0\\]"),
    "link-slot-null": (json.dumps(ui_load_save(links=[[1, 1, None, 2, 0, "IMAGE"]])), "links\\[0\\]"),
    "link-dict-partial": (json.dumps(ui_load_save(links=[{"id": 1, "origin_id": 1}])), "links\\[0\\]"),
    "link-duplicate-id": (json.dumps(ui_load_save(links=[[1, 1, 0, 2, 0, "IMAGE"]] * 2)), "links\\[1\\].*1"),
    "definitions-list": (json.dumps(ui_load_save(definitions=[1])), "definitions"),
    "subgraphs-not-list": (json.dumps(ui_load_save(definitions={"subgraphs": 5})), "subgraphs"),
    "primitive-widgets-int": (
        json.dumps(
            ui_load_save(
                nodes=[
                    ui_node(1, "LoadImage", widgets=["a.png", "image"]),
                    ui_node(3, "PrimitiveNode") | {"widgets_values": 5},
                    ui_node(
                        2,
                        "SaveImage",
                        [
                            {"name": "images", "type": "IMAGE", "link": 1},
                            {
                                "name": "filename_prefix",
                                "type": "STRING",
                                "widget": {"name": "filename_prefix"},
                                "link": 2,
                            },
                        ],
                        ["x"],
                    ),
                ],
                links=[[1, 1, 0, 2, 0, "IMAGE"], [2, 3, 0, 2, 1, "STRING"]],
            )
        ),
        "Node 3.*widgets_values",
    ),
    "too-many-nodes": (
        json.dumps({str(i): {"class_type": "LoadImage", "inputs": {}} for i in range(20_001)}),
        "20001 nodes",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_workflow_is_one_line_and_exit_status_2(folders, case):
    text, match = MALFORMED[case]
    code, err = run_cli(folders, text)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert len(lines[0]) < 400
    import re

    assert re.search(match, lines[0]), lines[0]


def test_a_missing_workflow_file_is_exit_status_2(folders):
    argv = ["run", str(folders / "nope.json"), "--models", str(folders / "models")]
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(argv) == 2
    assert "nope.json" in err.getvalue() and len(err.getvalue().strip().splitlines()) == 1


def test_the_runner_refuses_the_same_in_process(folders):
    runner = WorkflowRunner(NODES)
    for bad in (
        [],
        None,
        "x",
        {"1": 5},
        {"2": {"class_type": ["x"]}},
        {"2": {"class_type": "SaveImage", "inputs": []}},
    ):
        with pytest.raises(WorkflowError, match="workflow|Node"):
            runner.run(bad)
    with pytest.raises(WorkflowError, match="nodes\\[0\\]"):
        ui_to_api(ui([{"type": "SaveImage"}], []), NODES)
    # a later valid run works
    assert runner.run(load_save())["2"]["ui"]["images"][0]["filename"] == "x_00001_.png"


def test_names_with_line_breaks_or_controls_stay_on_one_line(folders):
    """Node ids, types and input names come from the file: the hypothesis fuzz found a node id "\\n"
    and an input named "\\n" printed raw, splitting the one-line message."""
    runner = WorkflowRunner(NODES)
    cases = {
        "Node \\n is a null": {"\n": None},
        "input '\\n' is a bad link": {"2": {"class_type": "SaveImage", "inputs": {"\n": []}}},
        "Node a\\x00b": {"a\x00b": {"class_type": "SaveImage"}},
        "unknown node type": {"9": {"class_type": "No\u2028Such", "inputs": {}}},
    }
    for expected, bad in cases.items():
        with pytest.raises(WorkflowError) as caught:
            runner.run(bad)
        text = str(caught.value)
        assert expected in text and text.isprintable() or text.startswith("The workflow is not valid:\n")
        for line in text.splitlines():
            assert line.isprintable(), repr(line)


def test_a_validation_error_pickles_with_its_problems():
    """A Ray worker's error crosses to the driver pickled: the problems must survive, not its text."""
    error = WorkflowValidationError(["Node 3: first\nproblem", "Node 4: second"])
    again = pickle.loads(pickle.dumps(error))
    assert again.problems == ["Node 3: first\\nproblem", "Node 4: second"] == error.problems
    expected = "The workflow is not valid:\n- Node 3: first\\nproblem\n- Node 4: second"
    assert str(again) == str(error) == expected


def test_integer_node_ids_in_process_are_names(folders):
    prompt = {
        1: {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        2: {"class_type": "SaveImage", "inputs": {"images": [1, 0], "filename_prefix": "x"}},
    }
    assert "2" in WorkflowRunner(NODES).run(prompt)


# ---------------------------------------------------------------- long valid chains
CHAIN = 1500


def api_chain(n: int = CHAIN) -> dict:
    prompt = {"0": {"class_type": "LoadImage", "inputs": {"image": "a.png"}}}
    for i in range(1, n + 1):
        prompt[str(i)] = {"class_type": "Pass", "inputs": {"images": [str(i - 1), 0]}}
    prompt["out"] = {"class_type": "SaveImage", "inputs": {"images": [str(n), 0], "filename_prefix": "c"}}
    return prompt


def test_a_long_api_chain_runs_and_reruns_from_cache(folders):
    runner = WorkflowRunner(NODES)
    results = runner.run(api_chain())
    assert results["out"]["ui"]["images"][0]["filename"] == "c_00001_.png"
    assert len(runner.executed) == CHAIN + 2
    runner.run(api_chain())
    assert runner.executed == []  # everything cached, as in ComfyUI


def test_a_long_chain_with_a_cycle_is_refused(folders):
    prompt = api_chain()
    prompt["0"] = {"class_type": "Pass", "inputs": {"images": [str(CHAIN), 0]}}
    with pytest.raises(WorkflowError, match="cycle"):
        WorkflowRunner(NODES).run(prompt)


def ui_reroute_chain(n: int = CHAIN) -> dict:
    nodes = [ui_node(1, "LoadImage", widgets=["a.png", "image"])]
    links = []
    for i in range(n):
        node_id = 100 + i
        nodes.append(ui_node(node_id, "Reroute", [{"name": "", "type": "*", "link": i + 1}]))
        links.append([i + 1, 1 if i == 0 else node_id - 1, 0, node_id, 0, "IMAGE"])
    nodes.append(ui_node(2, "SaveImage", [{"name": "images", "type": "IMAGE", "link": n + 1}], ["r"]))
    links.append([n + 1, 100 + n - 1, 0, 2, 0, "IMAGE"])
    return ui(nodes, links)


def test_a_long_reroute_chain_converts(folders):
    prompt = ui_to_api(ui_reroute_chain(), NODES)
    assert prompt["2"]["inputs"]["images"] == ["1", 0]


@pytest.mark.slow
def test_cli_subprocess_malformed_and_long_chains(folders):
    env = {**os.environ, "DIFFUSERS_ADAPTERS_QUIET": "1"}

    def run(workflow_text: str):
        path = folders / "wf.json"
        path.write_text(workflow_text)
        command = [
            sys.executable,
            str(ROOT / "cli.py"),
            "run",
            str(path),
            "--models",
            str(folders / "models"),
        ]
        command += ["--input", str(folders / "input"), "--output", str(folders / "output")]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)

    for case in ("not-json", "top-level-list", "deep-nesting", "node-without-id", "link-arity-3"):
        done = run(MALFORMED[case][0] if isinstance(MALFORMED[case][0], str) else "")
        assert done.returncode == 2, (case, done.stderr)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr  # (library warnings aside)
    done = run(json.dumps(ui_reroute_chain()))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("r_00001_.png")


# ---------------------------------------------------------------- fuzz: cases nobody listed
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def _paths(value, prefix=()):
    """Every (container path, key) of a JSON value."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for key, child in items:
        yield prefix + (key,)
        yield from _paths(child, prefix + (key,))


def _mutated(workflow, data):
    import copy

    workflow = copy.deepcopy(workflow)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(workflow))
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = workflow
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[data.draw(st.text(max_size=6))] = data.draw(_JSON)
        elif action == "add":
            parent.append(data.draw(_JSON))
        else:
            parent[path[-1]] = data.draw(_JSON)
    return workflow


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))


def _runs_or_refuses(runner, workflow):
    try:
        runner.run(workflow)
    except (WorkflowError, NotImplementedError) as exc:
        assert "\n" not in str(exc) or str(exc).startswith("The workflow is not valid:"), str(exc)


@pytest.mark.fuzz
@FUZZ
@given(data=st.data())
def test_fuzzed_ui_workflows_run_or_are_refused(folders, data):
    workflow = ui_load_save()
    workflow["nodes"].insert(1, ui_node(5, "Reroute", [{"name": "", "type": "*", "link": 9}]))
    workflow["links"].append([9, 1, 0, 5, 0, "IMAGE"])
    _runs_or_refuses(WorkflowRunner(NODES), _mutated(workflow, data))


@pytest.mark.fuzz
@FUZZ
@given(data=st.data())
def test_fuzzed_api_workflows_run_or_are_refused(folders, data):
    _runs_or_refuses(WorkflowRunner(NODES), _mutated(load_save(), data))


MEMORY_SCRIPT = r"""
import json, os, resource, sys
sys.path.insert(0, sys.argv[1])
import importlib.util
spec = importlib.util.spec_from_file_location("_cli", os.path.join(sys.argv[1], "cli.py"))
cli = importlib.util.module_from_spec(spec); spec.loader.exec_module(cli)
pack = cli.load_pack()
import torch
from comfyui_diffusers_adapters.loaders.images import ImageInputError, as_rgb_images
from comfyui_diffusers_adapters.nodes import comfy_host

work = sys.argv[2]
vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
limit = vm + 512 * 2**20  # what is mapped now (torch, the pack) plus 512 MB for all the cases
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))

cases = {
    "deep": b"[" * 5_000_000,
    "wide": json.dumps({"nodes": list(range(3_000_000)), "links": []}).encode(),
    "many-nodes": json.dumps({str(i): {"class_type": "SaveImage"} for i in range(100_000)}).encode(),
}
codes = {}
for name, data in cases.items():
    path = os.path.join(work, name + ".json")
    open(path, "wb").write(data)
    codes[name] = cli.main(["run", path, "--models", os.path.join(work, "models")])
huge_view = torch.zeros(1, 1, 1, 3).expand(100, 16000, 16000, 3)
for images in (torch.rand(1, 1, 4000, 3), torch.rand(1000, 1, 1, 3), torch.zeros(0, 64, 64, 3), huge_view):
    try:
        as_rgb_images(images, "image")
        codes[str(tuple(images.shape))] = "accepted"
    except ImageInputError:
        codes[str(tuple(images.shape))] = "refused"
comfy_host.set_models_root(os.path.join(work, "models"))
loras = os.path.join(work, "models", "loras")
os.makedirs(loras)
for name in "abcd":
    os.symlink(loras, os.path.join(loras, name))
codes["loop-listing"] = comfy_host.list_model_files("loras")
print(json.dumps(codes))
"""


@pytest.mark.slow
def test_hostile_workflows_images_and_folders_under_a_memory_limit(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(ROOT), str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "DIFFUSERS_ADAPTERS_QUIET": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    assert codes == {
        "deep": 2,
        "wide": 2,
        "many-nodes": 2,
        "(1, 1, 4000, 3)": "refused",
        "(1000, 1, 1, 3)": "refused",
        "(0, 64, 64, 3)": "refused",
        "(100, 16000, 16000, 3)": "refused",
        "loop-listing": [],
    }, done.stderr[-2000:]


def test_many_problems_and_huge_names_stay_a_few_short_lines(folders):
    prompt = {str(i): {"class_type": "SaveImage", "inputs": {}} for i in range(500)}
    code, err = run_cli(folders, json.dumps(prompt))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 21 and lines[-1] == "error: ... and 980 more problems."
    code, err = run_cli(folders, json.dumps({"x" * 100_000: {"class_type": "y" * 100_000, "inputs": {}}}))
    assert code == 2 and len(err) < 400
    code, err = run_cli(folders, json.dumps({"x" * 100_000: 5}))
    assert code == 2 and len(err) < 400


def test_input_types_is_asked_once_per_class_per_run(folders, monkeypatch):
    calls = []
    real = Pass.INPUT_TYPES.__func__
    monkeypatch.setattr(Pass, "INPUT_TYPES", classmethod(lambda cls: calls.append(1) or real(cls)))
    WorkflowRunner(NODES).run(api_chain())
    assert len(calls) == 1
    calls.clear()
    ui_to_api(ui([ui_node(i, "Pass") for i in range(1, 300)], []), NODES)
    assert len(calls) == 1
