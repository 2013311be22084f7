"""The ComfyUI node contract (V1 dict API) and how the pack imports."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import comfyui_diffusers_adapters as pack
from comfyui_diffusers_adapters.nodes.common import PACK, PIPELINE

ROOT = Path(__file__).resolve().parents[1]
CORE_TYPES = {"IMAGE", "MASK", "STRING", "INT", "FLOAT", "BOOLEAN", "LATENT", "CONDITIONING", "VAE"}
NODES = sorted(pack.NODE_CLASS_MAPPINGS.items())


def test_nodes_are_registered_with_prefixed_ids_and_display_names():
    assert {cls.__name__ for _, cls in NODES} >= {"LoadDreamBooth", "Sampler"}
    for node_id, cls in NODES:
        assert node_id == PACK + cls.__name__
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[node_id].strip()


@pytest.mark.parametrize("node_id,cls", NODES)
def test_node_contract(node_id, cls):
    types = cls.INPUT_TYPES()
    assert set(types) <= {"required", "optional", "hidden"} and "required" in types
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 else {}
            assert isinstance(kind, (str, list)), (name, kind)
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
            if isinstance(kind, str) and kind not in CORE_TYPES:
                assert kind.startswith("DIFFUSERS_ADAPTERS_"), f"unprefixed socket type {kind}"
            if "default" in options and isinstance(kind, list):
                assert options["default"] in kind
    assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES
    assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
    assert len(getattr(cls, "OUTPUT_TOOLTIPS", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
    assert isinstance(cls.CATEGORY, str) and cls.CATEGORY
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40
    function = getattr(cls, cls.FUNCTION)
    params = inspect.signature(function).parameters
    inputs = set(types["required"]) | set(types.get("optional", {}))
    assert inputs == set(params) - {"self"}, "FUNCTION parameters must match INPUT_TYPES"
    for name in types.get("optional", {}):
        assert params[name].default is not inspect.Parameter.empty, f"optional {name} needs a default"


def test_input_types_are_json_serializable_for_object_info():
    for _, cls in NODES:
        json.dumps(cls.INPUT_TYPES())


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd="/", timeout=600
    )


def test_import_like_comfyui_under_an_absolute_path_module_name():
    """ComfyUI names a folder pack's module after its absolute path; relative imports must work,
    no ComfyUI module may be imported, and the pack's folders must not become top-level modules."""
    result = _run_python(f"""
        import importlib.util, sys
        root = {str(ROOT)!r}
        name = root.replace(".", "_x_")
        spec = importlib.util.spec_from_file_location(name, root + "/__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        assert len(module.NODE_CLASS_MAPPINGS) >= 2
        banned = [m for m in ("comfy", "folder_paths", "nodes", "loaders", "converters") if m in sys.modules]
        assert not banned, banned
        print("ok")
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_host_module_uses_comfyui_when_present(tmp_path):
    """With stub ComfyUI modules on the path, folders come from folder_paths and the pack's own
    folders are registered, merged with existing entries."""
    stub = tmp_path / "stub"
    (stub / "comfy").mkdir(parents=True)
    (stub / "comfy" / "__init__.py").write_text("")
    (stub / "comfy" / "utils.py").write_text(
        "class ProgressBar:\n    def __init__(self, total): self.total = total\n"
    )
    (stub / "comfy" / "model_management.py").write_text(
        "def throw_exception_if_processing_interrupted(): pass\n"
    )
    (stub / "folder_paths.py").write_text(
        textwrap.dedent(f"""
        models_dir = {str(tmp_path / "models")!r}
        folder_names_and_paths = {{"checkpoints": ([models_dir + "/checkpoints", "/extra/ckpts"], set()),
                                   "ipadapter": (["/elsewhere/ipadapter"], {{".bin"}})}}
        def get_folder_paths(name): return folder_names_and_paths[name][0][:]
        def add_model_folder_path(name, path, is_default=False):
            if name in folder_names_and_paths:
                if path not in folder_names_and_paths[name][0]: folder_names_and_paths[name][0].append(path)
            else:
                folder_names_and_paths[name] = ([path], set())
        def get_output_directory(): return "/out"
        def get_input_directory(): return "/in"
        """)
    )
    result = _run_python(f"""
        import sys, importlib.util
        sys.path.insert(0, {str(stub)!r})
        spec = importlib.util.spec_from_file_location("pack_x", {str(ROOT)!r} + "/__init__.py",
                                                      submodule_search_locations=[{str(ROOT)!r}])
        m = importlib.util.module_from_spec(spec); sys.modules["pack_x"] = m; spec.loader.exec_module(m)
        from pack_x.nodes import comfy_host
        import folder_paths
        assert comfy_host.IN_COMFYUI
        assert [str(p) for p in comfy_host.folder_roots("checkpoints")][1] == "/extra/ckpts"
        assert folder_paths.folder_names_and_paths["ipadapter"][0][0] == "/elsewhere/ipadapter"
        assert folder_paths.folder_names_and_paths["ipadapter"][0][1].endswith("models/ipadapter")
        assert ".safetensors" in folder_paths.folder_names_and_paths["insightface"][1]
        print("ok")
    """)
    assert result.returncode == 0, result.stderr[-2000:]


def test_example_workflows_use_only_known_nodes():
    core = {"SaveImage", "PreviewImage", "LoadImage", "Note", "MarkdownNote", "LatentUpscaleBy"}
    known = set(pack.NODE_CLASS_MAPPINGS) | core | {"VAEDecode", "VAEEncode", "VAEEncodeForInpaint"}
    files = sorted((ROOT / "example_workflows").glob("*.json"))
    assert files
    for path in files:
        workflow = json.loads(path.read_text())
        assert {n["type"] for n in workflow["nodes"]} <= known, path.name
        for link in workflow["links"]:
            if link[5] not in CORE_TYPES:
                assert link[5] == PIPELINE or link[5].startswith("DIFFUSERS_ADAPTERS_")


def test_example_workflows_convert_to_complete_api_prompts():
    from comfyui_diffusers_adapters.headless.standin_nodes import STANDIN_NODE_CLASS_MAPPINGS
    from comfyui_diffusers_adapters.headless.ui_workflow import ui_to_api

    classes = {**STANDIN_NODE_CLASS_MAPPINGS, **pack.NODE_CLASS_MAPPINGS}
    for path in sorted((ROOT / "example_workflows").glob("*.json")):
        api = ui_to_api(json.loads(path.read_text()), classes)
        for node_id, node in api.items():
            required = classes[node["class_type"]].INPUT_TYPES()["required"]
            assert set(required) <= set(node["inputs"]), (
                path.name,
                node_id,
                set(required) - set(node["inputs"]),
            )
