"""Two threads running workflows through the headless runner on one cached base pipeline: the base
model's lock serializes their use of the pipeline, and each gets the image a sequential run gives."""

from __future__ import annotations

import threading

import pytest
import torch
from ip_adapter_lib import flatten, ip_adapter_nested, write_vision_files
from lora_fixtures import write_kohya
from PIL import Image
from safetensors.torch import save_file

from comfyui_diffusers_adapters.headless.demo import DEMO_CHECKPOINT, write_demo_checkpoint
from comfyui_diffusers_adapters.headless.runner import WorkflowRunner
from comfyui_diffusers_adapters.headless.standin_nodes import STANDIN_NODE_CLASS_MAPPINGS
from comfyui_diffusers_adapters.loaders import base_models, embedding_files, lora_files, sampling
from comfyui_diffusers_adapters.loaders.pipeline_handle import materialized
from comfyui_diffusers_adapters.nodes import NODE_CLASS_MAPPINGS, comfy_host
from comfyui_diffusers_adapters.nodes.apply_ip_adapter import ApplyIPAdapter
from comfyui_diffusers_adapters.nodes.common import node_id
from comfyui_diffusers_adapters.nodes.load_dreambooth import LoadDreamBooth
from testlib import QUICK_SAMPLER, tiny_pipeline

ROUNDS = 3


class Keep:
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    FUNCTION = "keep"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    def keep(self, images):
        return {"ui": {}, "result": ()}


NODES = {**STANDIN_NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS, "Keep": Keep}


@pytest.fixture
def models(models_root, tmp_path):
    write_demo_checkpoint(models_root)
    write_kohya(models_root, "a.safetensors")
    write_kohya(models_root, "b.safetensors", seed=1)
    save_file({"emb_params": torch.randn(2, 64) * 0.5}, str(models_root / "embeddings" / "emb.safetensors"))
    unet = tiny_pipeline("sd1").unet
    save_file(flatten(ip_adapter_nested(unet, "base")), str(models_root / "ipadapter" / "ip.safetensors"))
    save_file(flatten(ip_adapter_nested(unet, "plus")), str(models_root / "ipadapter" / "plus.safetensors"))
    write_vision_files(models_root / "clip_vision")
    (tmp_path / "input").mkdir()
    pixels = (torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()
    Image.fromarray(pixels).save(tmp_path / "input" / "ref.png")
    comfy_host.set_io_directories(tmp_path / "input", tmp_path / "output")
    base_models.clear_cache()
    yield models_root
    base_models.clear_cache()


def node(cls: str, **inputs) -> dict:
    return {"class_type": node_id(cls) if cls != "LoadImage" else cls, "inputs": inputs}


def workflow(which: str) -> dict:
    """A: two LoRAs and an embedding. B: another LoRA and an IP-Adapter. Same checkpoint."""
    wf = {"1": node("LoadDreamBooth", checkpoint=DEMO_CHECKPOINT, dtype="fp32", device="cpu")}
    lora = {"strength_clip": 0.8, "apply_to": "unet and text encoders", "block_weights": ""}
    if which == "a":
        wf["2"] = node("LoadLoRA", pipeline=["1", 0], lora_name="a.safetensors", strength_model=0.8, **lora)
        wf["3"] = node("LoadLoRA", pipeline=["2", 0], lora_name="b.safetensors", strength_model=0.8, **lora)
        wf["4"] = node("LoadTextualInversion", pipeline=["3", 0], embedding="emb.safetensors", token="<e>")
        prompt, seed = "a photo of <e>", 1
    else:
        wf["2"] = node("LoadLoRA", pipeline=["1", 0], lora_name="b.safetensors", strength_model=-0.5, **lora)
        wf["3"] = node("LoadImage", image="ref.png")
        wf["4"] = node(
            "ApplyIPAdapter",
            pipeline=["2", 0],
            ipadapter="ip.safetensors",
            clip_vision="tiny_vit_transformers.safetensors",
            image=["3", 0],
            scale=0.7,
            start_at=0.0,
            end_at=0.6,
        )
        prompt, seed = "a red house", 2
    wf["9"] = node(
        "Sampler",
        pipeline=["4", 0],
        positive=prompt,
        negative="blurry",
        **(QUICK_SAMPLER | {"seed": seed}),
    )
    wf["10"] = {"class_type": "Keep", "inputs": {"images": ["9", 0]}}
    return wf


def run(runner: WorkflowRunner, which: str) -> torch.Tensor:
    runner.run(workflow(which))
    return runner.outputs["9"][0]


def sequential_references() -> dict[str, torch.Tensor]:
    refs = {}
    for which in ("a", "b"):
        base_models.clear_cache()
        lora_files._cache.clear()
        embedding_files.clear_embedding_cache()
        refs[which] = run(WorkflowRunner(NODES), which)
    base_models.clear_cache()
    return refs


def test_two_threads_sharing_a_base_pipeline_are_serialized_and_match_sequential_runs(models, monkeypatch):
    refs = sequential_references()
    assert not torch.equal(refs["a"], refs["b"])

    sections: list[tuple[str, str]] = []  # ("enter"/"leave", thread) around every sampling run
    bases = set()
    real_sample = sampling.sample
    barrier = threading.Barrier(2)

    def sample(pipe, settings, *args):
        base = next(iter(base_models._cache.values()))
        bases.add(id(base))
        assert base.lock._is_owned(), "sampling without the base model's lock"
        sections.append(("enter", threading.current_thread().name))
        threading.Event().wait(0.02)  # give the other thread every chance to get in
        out = real_sample(pipe, settings, *args)
        sections.append(("leave", threading.current_thread().name))
        return out

    monkeypatch.setattr("comfyui_diffusers_adapters.loaders.sampling.sample", sample)
    results: dict[str, list] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def worker(which: str) -> None:
        try:
            barrier.wait()
            for _ in range(ROUNDS):  # a new runner each round: no node output cached, every node runs
                results[which].append(run(WorkflowRunner(NODES), which))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,), name=w) for w in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(bases) == 1, "both threads used the one cached base model"
    assert len(sections) == 4 * ROUNDS
    for i in range(0, len(sections), 2):  # every enter is followed by the same thread's leave
        assert sections[i][0] == "enter" and sections[i + 1] == ("leave", sections[i][1]), sections
    assert {name for _, name in sections} == {"a", "b"}
    for which in ("a", "b"):
        assert len(results[which]) == ROUNDS
        for image in results[which]:
            assert torch.equal(image, refs[which])


def test_apply_ip_adapter_does_not_depend_on_the_adapters_the_pipeline_carries(models):
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    handle = LoadDreamBooth().load(DEMO_CHECKPOINT, dtype="fp32", device="cpu")["result"][0]
    plus = ApplyIPAdapter().apply(handle, "plus.safetensors", "tiny_vit_transformers.safetensors", image, 1.0)
    with materialized(plus["result"][0]):  # a run with the Plus adapter: the pipeline now carries it
        pass
    ApplyIPAdapter().apply(handle, "ip.safetensors", "tiny_vit_transformers.safetensors", image, 1.0)
