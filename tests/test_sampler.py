"""The sampler node and whole workflows: seeds, prompts, branches, interruption, progress, runner."""

from __future__ import annotations

import copy

import pytest
import torch

from comfyui_diffusers_adapters import NODE_CLASS_MAPPINGS
from comfyui_diffusers_adapters.headless import demo
from comfyui_diffusers_adapters.headless.runner import WorkflowError, WorkflowRunner
from comfyui_diffusers_adapters.headless.standin_nodes import STANDIN_NODE_CLASS_MAPPINGS
from comfyui_diffusers_adapters.loaders import base_models
from comfyui_diffusers_adapters.loaders.pipeline_handle import PipelineHandle
from comfyui_diffusers_adapters.loaders.sampling import SamplingSettings, encode_conditioning
from comfyui_diffusers_adapters.nodes import comfy_host
from comfyui_diffusers_adapters.nodes.common import node_id
from comfyui_diffusers_adapters.nodes.sampler import Sampler
from testlib import tiny_pipeline, write_single_file

LOADER, SAMPLER = node_id("LoadDreamBooth"), node_id("Sampler")
ALL_NODES = {**STANDIN_NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS}


@pytest.fixture
def sd1_handle():
    base = base_models.BaseModel(
        tiny_pipeline("sd1"), "sd1", "tiny", torch.float32, torch.device("cpu"), "epsilon"
    )
    return PipelineHandle(base)


def sample(handle, positive="a red apple", negative="", seed=1, steps=3, size=64, **kw):
    args = dict(
        cfg=5.0, width=size, height=size, batch_size=1, sampler_name="euler", scheduler="normal", clip_skip=-1
    )
    args.update(kw)
    return Sampler().sample(handle, positive, negative, seed, steps, **args)[0]


def test_same_seed_same_image_other_seed_other_image(sd1_handle):
    a, b, c = sample(sd1_handle, seed=5), sample(sd1_handle, seed=5), sample(sd1_handle, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    batch = sample(sd1_handle, seed=5, batch_size=2)
    assert batch.shape == (2, 64, 64, 3) and not torch.equal(batch[0], batch[1])


def test_long_prompts_are_chunked_not_truncated(sd1_handle):
    pipe = sd1_handle.base.pipe
    long_prompt = ", ".join(f"detail {i}" for i in range(60))  # 230 tokens: digits are single tokens
    kwargs = encode_conditioning(pipe, SamplingSettings(long_prompt, "blurry"))
    assert kwargs["prompt_embeds"].shape[1] == 77 * 4
    assert kwargs["negative_prompt_embeds"].shape == kwargs["prompt_embeds"].shape  # repeated to match
    tail_changed = long_prompt.replace("detail 59", "ocean 59")
    assert not torch.equal(sample(sd1_handle, long_prompt), sample(sd1_handle, tail_changed))


def test_comfyui_weighting_changes_the_image(sd1_handle):
    plain = sample(sd1_handle, "a red apple on a table")
    assert torch.equal(plain, sample(sd1_handle, "a red apple on a (table:1.0)"))
    assert not torch.equal(plain, sample(sd1_handle, "a red apple on a (table:1.4)"))


def test_clip_skip_and_samplers(sd1_handle):
    base = sample(sd1_handle)
    assert not torch.equal(base, sample(sd1_handle, clip_skip=-2))
    for name in ("euler_ancestral", "heun", "dpm_2", "dpmpp_2m_sde", "dpmpp_sde", "ddim", "uni_pc", "lms"):
        out = sample(sd1_handle, sampler_name=name, steps=2)
        assert out.shape == (1, 64, 64, 3) and torch.isfinite(out).all(), name
    with pytest.raises(ValueError, match="karras"):
        sample(sd1_handle, sampler_name="ddim", scheduler="karras")


def test_size_must_be_a_multiple_of_8(sd1_handle):
    with pytest.raises(ValueError, match="multiples of 8"):
        sample(sd1_handle, size=100)  # within the widget's 64..8192 (below it is refused earlier)


class _Bar:
    def __init__(self, log, interrupt_at=None):
        self.log, self.interrupt_at = log, interrupt_at

    def update_absolute(self, value, total=None, preview=None):
        self.log.append((value, total))
        if value == self.interrupt_at:
            comfy_host.request_interrupt()


def test_progress_every_step_and_interruption_leaves_the_pipeline_ready(sd1_handle, monkeypatch):
    log = []
    monkeypatch.setattr(comfy_host, "progress_bar", lambda total, label="": _Bar(log))
    expected = sample(sd1_handle, steps=4)
    assert log == [(1, 4), (2, 4), (3, 4), (4, 4)]

    scheduler_before = sd1_handle.base.pipe.scheduler
    monkeypatch.setattr(comfy_host, "progress_bar", lambda total, label="": _Bar(log, interrupt_at=2))
    with pytest.raises(comfy_host.Interrupted):
        sample(sd1_handle, steps=4)
    assert sd1_handle.base.pipe.scheduler is scheduler_before
    assert not sd1_handle.base.lock._is_owned()

    monkeypatch.setattr(comfy_host, "progress_bar", lambda total, label="": _Bar([]))
    assert torch.equal(sample(sd1_handle, steps=4), expected)


def _api_workflow(checkpoint: str) -> dict:
    def sampler(seed, positive, sampler_name, schedule, clip_skip):
        return {
            "class_type": SAMPLER,
            "inputs": {
                "pipeline": ["1", 0],
                "positive": positive,
                "negative": "blurry",
                "seed": seed,
                "steps": 3,
                "cfg": 5.0,
                "width": 64,
                "height": 64,
                "batch_size": 1,
                "sampler_name": sampler_name,
                "scheduler": schedule,
                "clip_skip": clip_skip,
            },
        }

    return {
        "1": {"class_type": LOADER, "inputs": {"checkpoint": checkpoint, "dtype": "fp32", "device": "cpu"}},
        "2": sampler(1, "a castle", "euler", "normal", -1),
        "3": sampler(2, "a (forest:1.3) at night", "dpmpp_2m", "karras", -2),
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def _branch_only(workflow: dict, keep: str) -> dict:
    drop = {"2": ("3", "5"), "3": ("2", "4")}[keep]
    return {k: v for k, v in workflow.items() if k not in drop}


def test_two_branches_from_one_checkpoint_do_not_affect_each_other(models_root):
    write_single_file(models_root / "checkpoints" / "m.safetensors", "sd1")
    workflow = _api_workflow("m.safetensors")
    runner = WorkflowRunner(ALL_NODES)
    runner.run(workflow)
    both = {k: runner.outputs[k][0] for k in ("2", "3")}
    assert not torch.equal(both["2"], both["3"])
    for branch in ("2", "3"):
        base_models.clear_cache()  # a fresh load, as in a fresh process
        alone = WorkflowRunner(ALL_NODES)
        alone.run(_branch_only(workflow, branch))
        assert torch.equal(alone.outputs[branch][0], both[branch]), branch


def test_runner_ui_and_api_formats_give_the_same_image(models_root, tmp_path):
    demo.write_demo_checkpoint(models_root)
    comfy_host.set_io_directories(tmp_path / "in", tmp_path / "out")
    ui = demo.demo_workflow(size=64, steps=3)
    from comfyui_diffusers_adapters.headless.ui_workflow import ui_to_api

    api = ui_to_api(ui, ALL_NODES)
    assert api["2"]["inputs"]["seed"] == 42 and api["2"]["inputs"]["sampler_name"] == "dpmpp_2m"
    ui_runner, api_runner = WorkflowRunner(ALL_NODES), WorkflowRunner(ALL_NODES)
    ui_runner.run(copy.deepcopy(ui))
    api_runner.run(api)
    assert torch.equal(ui_runner.outputs["2"][0], api_runner.outputs["2"][0])
    assert len(list((tmp_path / "out").glob("diffusers_adapters_*.png"))) == 2


def test_runner_errors_name_the_node(models_root):
    workflow = _api_workflow("missing.safetensors")
    with pytest.raises(WorkflowError, match=f"1.*{LOADER}"):
        WorkflowRunner(ALL_NODES).run(workflow)
    write_single_file(models_root / "checkpoints" / "m.safetensors", "sd1")
    workflow = _api_workflow("m.safetensors")
    workflow["2"]["inputs"]["width"] = 100
    with pytest.raises(WorkflowError, match=f"Node 2 \\({SAMPLER}\\).*multiples of 8"):
        WorkflowRunner(ALL_NODES).run(workflow)


def test_demo_runs_end_to_end(tmp_path):
    paths = demo.run_demo(tmp_path / "out", size=64, steps=3)
    assert len(paths) == len(demo.DEMO_WORKFLOWS)  # one image each
    assert all(p.exists() and p.stat().st_size > 1000 for p in paths)
