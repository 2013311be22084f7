"""Headless runner: UI-to-API conversion, validation, execution, cache, stand-in image nodes, CLI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_diffusers_adapters.headless.runner import WorkflowError, WorkflowRunner, WorkflowValidationError
from comfyui_diffusers_adapters.headless.standin_nodes import STANDIN_NODE_CLASS_MAPPINGS
from comfyui_diffusers_adapters.headless.ui_workflow import ui_to_api

ROOT = Path(__file__).resolve().parents[1]
CALLS: list[tuple[str, dict]] = []


# ---------------------------------------------------------------- fake node classes
class Number:
    RETURN_TYPES = ("TEST_NUMBER",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 1, "min": 0, "max": 1000})}}

    def make(self, value):
        CALLS.append(("Number", {"value": value}))
        return (value,)


class Count:
    RETURN_TYPES = ("INT",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"n": ("INT", {"default": 3})}}

    def make(self, n):
        CALLS.append(("Count", {"n": n}))
        return (n,)


class Combine:
    RETURN_TYPES = ("TEST_NUMBER",)
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "a": ("TEST_NUMBER",),
                "op": (["add", "mul"],),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF}),
                "offset": ("INT", {"default": 0, "min": -100, "max": 100}),
            },
            "optional": {"b": ("TEST_NUMBER",)},
        }

    def combine(self, a, op, seed, offset, b=None):
        CALLS.append(("Combine", {"a": a, "op": op, "seed": seed, "offset": offset, "b": b}))
        value = a + (b or 0) if op == "add" else a * (1 if b is None else b)
        return (value + offset + seed,)


class Show:
    RETURN_TYPES = ("TEST_NUMBER",)
    FUNCTION = "show"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"number": ("TEST_NUMBER",), "label": ("STRING", {"default": "x"})}}

    def show(self, number, label):
        CALLS.append(("Show", {"number": number, "label": label}))
        return {"ui": {"text": [f"{label}={number}"]}, "result": (number,)}


class Boom:
    RETURN_TYPES = ("TEST_NUMBER",)
    FUNCTION = "go"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("TEST_NUMBER",)}}

    def go(self, a):
        raise ValueError("boom")


class Checked:
    RETURN_TYPES = ("TEST_NUMBER",)
    FUNCTION = "go"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("TEST_NUMBER",), "name": ("STRING", {"default": ""})}}

    @classmethod
    def VALIDATE_INPUTS(cls, name):
        return True if name else "name must not be empty"

    def go(self, a, name):
        return (a,)


class ListNode:
    RETURN_TYPES = ("TEST_NUMBER",)
    FUNCTION = "go"
    INPUT_IS_LIST = True
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def go(self):
        return (0,)


NODES = {
    "Number": Number,
    "Count": Count,
    "Combine": Combine,
    "Show": Show,
    "Boom": Boom,
    "Checked": Checked,
    "ListNode": ListNode,
    **STANDIN_NODE_CLASS_MAPPINGS,
}


@pytest.fixture(autouse=True)
def _clean(tmp_path, monkeypatch):
    CALLS.clear()
    for name, sub in (("INPUT", "input"), ("OUTPUT", "output"), ("TEMP", "temp")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(f"DIFFUSERS_ADAPTERS_{name}", str(tmp_path / sub))
    yield


def api_prompt() -> dict:
    return {
        "1": {"class_type": "Number", "inputs": {"value": 5}},
        "2": {"class_type": "Number", "inputs": {"value": 3}},
        "3": {
            "class_type": "Combine",
            "inputs": {"a": ["1", 0], "b": ["2", 0], "op": "add", "seed": 1, "offset": 0},
        },
        "4": {"class_type": "Show", "inputs": {"number": ["3", 0], "label": "sum"}},
        "9": {"class_type": "Number", "inputs": {"value": 77}},  # nothing depends on it
    }


# ---------------------------------------------------------------- API format
def test_api_run_executes_only_what_outputs_need_in_order():
    results = WorkflowRunner(NODES).run(api_prompt())
    assert results == {"4": {"ui": {"text": ["sum=9"]}, "result": (9,)}}
    assert [c[0] for c in CALLS] == ["Number", "Number", "Combine", "Show"]
    assert CALLS[2][1] == {"a": 5, "op": "add", "seed": 1, "offset": 0, "b": 3}


def test_outputs_are_shared_by_reference():
    seen = []

    class MakeList:
        RETURN_TYPES = ("THING",)
        FUNCTION = "f"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def f(self):
            return ([1, 2],)

    class Take:
        RETURN_TYPES = ()
        FUNCTION = "f"
        OUTPUT_NODE = True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"thing": ("THING",), "tag": ("STRING",)}}

        def f(self, thing, tag):
            seen.append(thing)
            return {}

    prompt = {
        "1": {"class_type": "MakeList", "inputs": {}},
        "2": {"class_type": "Take", "inputs": {"thing": ["1", 0], "tag": "a"}},
        "3": {"class_type": "Take", "inputs": {"thing": ["1", 0], "tag": "b"}},
    }
    results = WorkflowRunner({"MakeList": MakeList, "Take": Take}).run(prompt)
    assert seen[0] is seen[1]
    assert results == {"2": {"ui": {}, "result": ()}, "3": {"ui": {}, "result": ()}}


# ---------------------------------------------------------------- UI format
def ui_workflow() -> dict:
    """As the ComfyUI frontend saves it: Number -> Reroute -> Combine (seed widget with its
    control value, `offset` widget converted to an input fed by Count) -> Show, plus a muted
    Show and a Note."""
    return {
        "id": "0a1b2c3d-0000-4000-8000-000000000000",
        "revision": 0,
        "last_node_id": 8,
        "last_link_id": 6,
        "nodes": [
            {
                "id": 1,
                "type": "Number",
                "pos": [0, 0],
                "size": [270, 60],
                "flags": {},
                "order": 0,
                "mode": 0,
                "inputs": [],
                "outputs": [{"name": "TEST_NUMBER", "type": "TEST_NUMBER", "links": [1]}],
                "properties": {"Node name for S&R": "Number"},
                "widgets_values": [5],
            },
            {
                "id": 2,
                "type": "Reroute",
                "pos": [300, 0],
                "size": [75, 26],
                "flags": {},
                "order": 2,
                "mode": 0,
                "inputs": [{"name": "", "type": "*", "link": 1}],
                "outputs": [{"name": "", "type": "TEST_NUMBER", "links": [2]}],
                "properties": {"showOutputText": False, "horizontal": False},
            },
            {
                "id": 3,
                "type": "Combine",
                "pos": [400, 0],
                "size": [270, 130],
                "flags": {},
                "order": 3,
                "mode": 0,
                "inputs": [
                    {"localized_name": "a", "name": "a", "type": "TEST_NUMBER", "link": 2},
                    {"localized_name": "b", "name": "b", "shape": 7, "type": "TEST_NUMBER", "link": None},
                    {
                        "localized_name": "offset",
                        "name": "offset",
                        "type": "INT",
                        "widget": {"name": "offset"},
                        "link": 4,
                    },
                ],
                "outputs": [
                    {
                        "localized_name": "TEST_NUMBER",
                        "name": "TEST_NUMBER",
                        "type": "TEST_NUMBER",
                        "links": [5, 6],
                    }
                ],
                "properties": {"Node name for S&R": "Combine"},
                "widgets_values": ["mul", 7, "randomize", 99],
            },
            {
                "id": 4,
                "type": "Count",
                "pos": [0, 200],
                "size": [270, 60],
                "flags": {},
                "order": 1,
                "mode": 0,
                "inputs": [],
                "outputs": [{"name": "INT", "type": "INT", "links": [4]}],
                "properties": {"Node name for S&R": "Count"},
                "widgets_values": [2],
            },
            {
                "id": 5,
                "type": "Show",
                "pos": [700, 0],
                "size": [270, 60],
                "flags": {},
                "order": 4,
                "mode": 0,
                "inputs": [{"name": "number", "type": "TEST_NUMBER", "link": 5}],
                "outputs": [{"name": "TEST_NUMBER", "type": "TEST_NUMBER", "links": None}],
                "properties": {"Node name for S&R": "Show"},
                "widgets_values": ["result"],
            },
            {
                "id": 6,
                "type": "Show",
                "pos": [700, 200],
                "size": [270, 60],
                "flags": {},
                "order": 5,
                "mode": 2,
                "inputs": [{"name": "number", "type": "TEST_NUMBER", "link": 6}],
                "outputs": [{"name": "TEST_NUMBER", "type": "TEST_NUMBER", "links": None}],
                "properties": {"Node name for S&R": "Show"},
                "widgets_values": ["muted"],
            },
            {
                "id": 8,
                "type": "Note",
                "pos": [0, 400],
                "size": [300, 100],
                "flags": {},
                "order": 6,
                "mode": 0,
                "inputs": [],
                "outputs": [],
                "properties": {},
                "widgets_values": ["Reads like a README."],
                "color": "#432",
                "bgcolor": "#653",
            },
        ],
        "links": [
            [1, 1, 0, 2, 0, "*"],
            [2, 2, 0, 3, 0, "TEST_NUMBER"],
            [4, 4, 0, 3, 2, "INT"],
            [5, 3, 0, 5, 0, "TEST_NUMBER"],
            [6, 3, 0, 6, 0, "TEST_NUMBER"],
        ],
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1, "offset": [0, 0]}, "frontendVersion": "1.35.9"},
        "version": 0.4,
    }


def _strip_meta(prompt: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


EXPECTED_API = {
    "1": {"class_type": "Number", "inputs": {"value": 5}},
    "3": {"class_type": "Combine", "inputs": {"op": "mul", "seed": 7, "offset": ["4", 0], "a": ["1", 0]}},
    "4": {"class_type": "Count", "inputs": {"n": 2}},
    "5": {"class_type": "Show", "inputs": {"label": "result", "number": ["3", 0]}},
}


def test_ui_to_api_matches_the_frontend():
    prompt = ui_to_api(ui_workflow(), NODES)
    assert _strip_meta(prompt) == EXPECTED_API
    assert prompt["3"]["_meta"] == {"title": "Combine"}


def test_ui_to_api_without_values_for_linked_widgets_and_with_dict_values():
    workflow = ui_workflow()
    workflow["nodes"][2]["widgets_values"] = ["mul", 7, "fixed"]  # offset left out: it is linked
    assert _strip_meta(ui_to_api(workflow, NODES)) == EXPECTED_API
    workflow["nodes"][2]["widgets_values"] = {"op": "mul", "seed": 7, "offset": 99}
    assert _strip_meta(ui_to_api(workflow, NODES)) == EXPECTED_API


def test_ui_run():
    results = WorkflowRunner(NODES).run(ui_workflow())
    # (5 * 1) + offset 2 (from Count, not the stale widget value 99) + seed 7
    assert results == {"5": {"ui": {"text": ["result=14"]}, "result": (14,)}}
    assert sorted(c[0] for c in CALLS) == ["Combine", "Count", "Number", "Show"]


def test_ui_bypass_routes_input_to_output_of_same_type():
    workflow = ui_workflow()
    workflow["nodes"][2]["mode"] = 4  # bypass Combine
    prompt = _strip_meta(ui_to_api(workflow, NODES))
    assert "3" not in prompt
    assert prompt["5"]["inputs"]["number"] == ["1", 0]
    assert WorkflowRunner(NODES).run(workflow)["5"]["result"] == (5,)


def test_ui_primitive_node_feeds_its_widget():
    workflow = ui_workflow()
    combine = workflow["nodes"][2]
    combine["inputs"].append({"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 10})
    workflow["nodes"].append(
        {
            "id": 10,
            "type": "PrimitiveNode",
            "mode": 0,
            "inputs": [],
            "outputs": [{"name": "INT", "type": "INT", "links": [10], "widget": {"name": "seed"}}],
            "properties": {"Run widget replace on values": False},
            "widgets_values": [123, "fixed"],
        }
    )
    workflow["links"].append([10, 10, 0, 3, 3, "INT"])
    prompt = _strip_meta(ui_to_api(workflow, NODES))
    assert prompt["3"]["inputs"]["seed"] == 123
    assert "10" not in prompt


def test_ui_muted_source_drops_the_input():
    workflow = ui_workflow()
    workflow["nodes"][0]["mode"] = 2  # mute Number: Combine loses its required input `a`
    prompt = ui_to_api(workflow, NODES)
    assert "a" not in prompt["3"]["inputs"]
    with pytest.raises(WorkflowValidationError, match=r"Node 3 \(Combine\): required input 'a' is missing"):
        WorkflowRunner(NODES).run(workflow)


def test_ui_load_image_skips_upload_value_and_unknown_type_is_named(tmp_path):
    workflow = {
        "nodes": [
            {
                "id": 1,
                "type": "LoadImage",
                "mode": 0,
                "inputs": [],
                "widgets_values": ["example.png", "image"],
            },
            {"id": 2, "type": "Mystery", "mode": 0, "inputs": [], "widgets_values": []},
        ],
        "links": [],
    }
    with pytest.raises(WorkflowError, match=r"Node 2: unknown node type 'Mystery'"):
        ui_to_api(workflow, NODES)
    workflow["nodes"][1]["mode"] = 2  # muted: not needed, not an error
    assert _strip_meta(ui_to_api(workflow, NODES)) == {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}}
    }


# ---------------------------------------------------------------- validation and errors
def test_validation_lists_every_problem_with_node_ids():
    prompt = {
        "1": {"class_type": "Number", "inputs": {"value": 5000}},
        "3": {"class_type": "Combine", "inputs": {"a": ["1", 0], "op": "div", "seed": -1}},
        "4": {"class_type": "Checked", "inputs": {"a": ["3", 0], "name": ""}},
        "5": {"class_type": "Show", "inputs": {"number": ["4", 0], "label": "x"}},
        "6": {"class_type": "Show", "inputs": {"number": ["1", 0], "label": 3}},  # STRING: converted
    }
    with pytest.raises(WorkflowValidationError) as info:
        WorkflowRunner(NODES).run(prompt)
    message = str(info.value)
    for expected in (
        "Node 1 (Number): input 'value': value 5000 is bigger than the maximum 1000",
        "Node 3 (Combine): input 'op': 'div' is not one of ['add', 'mul']",
        "Node 3 (Combine): input 'seed': value -1 is smaller than the minimum 0",
        "Node 3 (Combine): required input 'offset' is missing",
        "Node 4 (Checked): name must not be empty",
    ):
        assert expected in message
    assert len(info.value.problems) == 5
    assert CALLS == []


def test_validate_checks_without_running():
    runner = WorkflowRunner(NODES)
    prompt = api_prompt()
    prompt["6"] = {"class_type": "Show", "inputs": {"number": ["1", 0], "label": 3}}
    assert runner.validate(prompt) == ["1", "2", "3", "4", "6"]  # what a run would execute, in order
    assert prompt["6"]["inputs"]["label"] == "3"  # converted in place, as a run does
    assert CALLS == [] and runner.executed == []
    prompt["1"]["inputs"]["value"] = 5000
    assert runner.validate_node(prompt, "1") == [
        "Node 1 (Number): input 'value': value 5000 is bigger than the maximum 1000."
    ]
    with pytest.raises(WorkflowValidationError, match="bigger than the maximum"):
        runner.validate(prompt)


def test_validation_of_links_and_outputs():
    runner = WorkflowRunner(NODES)
    with pytest.raises(WorkflowValidationError, match="no output node"):
        runner.run({"1": {"class_type": "Number", "inputs": {"value": 1}}})
    bad = {
        "1": {"class_type": "Count", "inputs": {"n": 1}},
        "2": {"class_type": "Show", "inputs": {"number": ["1", 0], "label": "x"}},
        "3": {"class_type": "Show", "inputs": {"number": ["42", 0], "label": "x"}},
    }
    with pytest.raises(WorkflowValidationError) as info:
        runner.run(bad)
    assert "Node 2 (Show): input 'number' expects TEST_NUMBER but node 1 (Count) output 0 is INT" in str(
        info.value
    )
    assert "Node 3 (Show): input 'number' links to node 42, which is not in the workflow" in str(info.value)
    with pytest.raises(NotImplementedError, match="INPUT_IS_LIST"):
        runner.run({"1": {"class_type": "ListNode", "inputs": {}}})


def test_node_error_is_wrapped_with_node_id_and_class():
    prompt = {
        "1": {"class_type": "Number", "inputs": {"value": 1}},
        "7": {"class_type": "Boom", "inputs": {"a": ["1", 0]}},
        "8": {"class_type": "Show", "inputs": {"number": ["7", 0], "label": "x"}},
    }
    with pytest.raises(WorkflowError) as info:
        WorkflowRunner(NODES).run(prompt)
    assert str(info.value) == "Node 7 (Boom): boom"
    assert isinstance(info.value.__cause__, ValueError)


# ---------------------------------------------------------------- cache
def test_cache_reruns_only_changed_nodes_and_their_downstream():
    runner = WorkflowRunner(NODES)
    prompt = api_prompt()
    first = runner.run(prompt)
    assert runner.executed == ["1", "2", "3", "4"]
    CALLS.clear()
    assert runner.run(copy.deepcopy(prompt)) == first  # cached outputs and ui come back
    assert runner.executed == [] and CALLS == []

    prompt["3"]["inputs"]["seed"] = 2
    assert runner.run(prompt)["4"]["result"] == (10,)
    assert runner.executed == ["3", "4"]
    assert [c[0] for c in CALLS] == ["Combine", "Show"]

    prompt["2"]["inputs"]["value"] = 4
    runner.run(prompt)
    assert runner.executed == ["2", "3", "4"]
    assert WorkflowRunner(NODES).run(prompt) == runner.run(prompt)  # a new runner has its own cache


# ---------------------------------------------------------------- stand-in image nodes
def _write_png(path: Path, mode: str = "RGB", size=(5, 4)) -> np.ndarray:
    rng = np.random.default_rng(0)
    channels = 4 if mode == "RGBA" else 3
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path)
    return pixels


def _load_save_prompt(image: str = "a.png", prefix: str = "sub/test") -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def test_load_image_to_save_image_round_trip(tmp_path):
    pixels = _write_png(tmp_path / "input" / "a.png")
    runner = WorkflowRunner(NODES)
    prompt = _load_save_prompt()
    results = runner.run(prompt)
    entry = {"filename": "test_00001_.png", "subfolder": "sub", "type": "output"}
    assert results == {"2": {"ui": {"images": [entry]}, "result": ()}}
    saved = tmp_path / "output" / "sub" / "test_00001_.png"
    with Image.open(saved) as img:
        assert np.array_equal(np.array(img.convert("RGB")), pixels)
        assert json.loads(img.text["prompt"]) == prompt

    assert runner.run(prompt) == results and runner.executed == []  # IS_CHANGED: same file
    _write_png(tmp_path / "input" / "a.png", size=(6, 4))
    results = runner.run(prompt)
    assert runner.executed == ["1", "2"]
    assert results["2"]["ui"]["images"][0]["filename"] == "test_00002_.png"


def test_load_image_tensor_and_mask(tmp_path):
    pixels = _write_png(tmp_path / "input" / "rgba.png", "RGBA")
    image, mask = STANDIN_NODE_CLASS_MAPPINGS["LoadImage"]().load_image("rgba.png")
    assert image.dtype == torch.float32 and image.shape == (1, 4, 5, 3)
    assert torch.equal(image[0], torch.from_numpy(pixels[..., :3].astype(np.float32) / 255.0))
    assert torch.equal(mask[0], 1.0 - torch.from_numpy(pixels[..., 3].astype(np.float32) / 255.0))
    _write_png(tmp_path / "input" / "rgb.png")
    _, mask = STANDIN_NODE_CLASS_MAPPINGS["LoadImage"]().load_image("rgb.png")
    assert mask.shape == (1, 64, 64) and not mask.any()
    assert STANDIN_NODE_CLASS_MAPPINGS["LoadImage"].INPUT_TYPES()["required"]["image"][0] == [
        "rgb.png",
        "rgba.png",
    ]


def test_save_image_refuses_prefix_outside_output(tmp_path):
    _write_png(tmp_path / "input" / "a.png")
    for prefix in ("../x", "/tmp/x", "sub/../../x"):
        with pytest.raises(
            WorkflowError, match=r"Node 2 \(SaveImage\): Saving images outside the output folder"
        ):
            WorkflowRunner(NODES).run(_load_save_prompt(prefix=prefix))
    assert not (tmp_path / "x_00001_.png").exists()


def test_load_image_missing_file_fails_validation():
    with pytest.raises(WorkflowValidationError, match=r"Node 1 \(LoadImage\): Invalid image file: nope.png"):
        WorkflowRunner(NODES).run(_load_save_prompt("nope.png"))
    with pytest.raises(WorkflowValidationError, match="Invalid image file"):
        WorkflowRunner(NODES).run(_load_save_prompt("../escape.png"))


def test_preview_image_writes_to_temp(tmp_path):
    _write_png(tmp_path / "input" / "a.png")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    (entry,) = WorkflowRunner(NODES).run(prompt)["2"]["ui"]["images"]
    assert entry["type"] == "temp" and entry["filename"].startswith("ComfyUI_temp_")
    assert (tmp_path / "temp" / entry["filename"]).is_file()


# ---------------------------------------------------------------- command line
def test_cli_run(tmp_path):
    _write_png(tmp_path / "input" / "a.png")
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps(_load_save_prompt(prefix="cli")))
    command = [
        sys.executable,
        str(ROOT / "cli.py"),
        "run",
        str(workflow),
        "--models",
        str(tmp_path / "models"),
    ]
    command += ["--input", str(tmp_path / "input"), "--output", str(tmp_path / "out")]
    env = {**os.environ, "DIFFUSERS_ADAPTERS_QUIET": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "out" / "cli_00001_.png")

    workflow.write_text(json.dumps(_load_save_prompt(prefix="../cli")))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1
    assert "Node 2 (SaveImage)" in done.stderr


def test_ui_load_save_embeds_prompt_and_workflow(tmp_path):
    _write_png(tmp_path / "input" / "a.png")
    workflow = {
        "nodes": [
            {
                "id": 1,
                "type": "LoadImage",
                "mode": 0,
                "inputs": [],
                "outputs": [
                    {"name": "IMAGE", "type": "IMAGE", "links": [1]},
                    {"name": "MASK", "type": "MASK", "links": None},
                ],
                "widgets_values": ["a.png", "image"],
            },
            {
                "id": 2,
                "type": "SaveImage",
                "mode": 0,
                "inputs": [{"name": "images", "type": "IMAGE", "link": 1}],
                "outputs": [],
                "widgets_values": ["ui"],
            },
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"]],
        "version": 0.4,
    }
    WorkflowRunner(NODES).run(workflow)
    with Image.open(tmp_path / "output" / "ui_00001_.png") as img:
        assert json.loads(img.text["workflow"]) == workflow
        assert json.loads(img.text["prompt"])["2"]["inputs"] == {"filename_prefix": "ui", "images": ["1", 0]}


def test_interrupt_stops_before_the_next_node():
    from comfyui_diffusers_adapters.nodes import comfy_host

    comfy_host.request_interrupt()
    with pytest.raises(comfy_host.Interrupted):
        WorkflowRunner(NODES).run(api_prompt())
    assert CALLS == []
    assert WorkflowRunner(NODES).run(api_prompt())["4"]["result"] == (9,)
