"""img2img, hires fix and inpainting through the headless runner with the core-node stand-ins,
a LoRA in the chain; the VAE socket against the pack's own decode and ComfyUI's VAE conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfyui_diffusers_adapters import NODE_CLASS_MAPPINGS
from comfyui_diffusers_adapters.headless import demo
from comfyui_diffusers_adapters.headless.runner import WorkflowRunner
from comfyui_diffusers_adapters.headless.standin_nodes import STANDIN_NODE_CLASS_MAPPINGS
from comfyui_diffusers_adapters.loaders.latents import to_model_space
from comfyui_diffusers_adapters.loaders.sampling import decode_latents
from comfyui_diffusers_adapters.nodes.common import node_id

NODES = {**STANDIN_NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS}
LOADER, LORA, SAMPLER = node_id("LoadDreamBooth"), node_id("LoadLoRA"), node_id("Sampler")


@pytest.fixture
def demo_models(models_root):
    demo.write_demo_checkpoint(models_root)
    demo.write_demo_lora(models_root)
    return models_root


def sampler(pipeline, seed, denoise=1.0, latent=None, steps=4):
    inputs = {
        "pipeline": pipeline,
        "positive": "a red apple",
        "negative": "",
        "seed": seed,
        "steps": steps,
        "cfg": 5.0,
        "width": 64,
        "height": 64,
        "batch_size": 1,
        "sampler_name": "euler",
        "scheduler": "normal",
        "clip_skip": -1,
        "denoise": denoise,
    }
    if latent is not None:
        inputs["latent_image"] = latent
    return {"class_type": SAMPLER, "inputs": inputs}


def chain(strength: float, tail: dict) -> dict:
    """Checkpoint -> LoRA at `strength` -> first sampler ("3"), then `tail`."""
    return {
        "1": {
            "class_type": LOADER,
            "inputs": {"checkpoint": demo.DEMO_CHECKPOINT, "dtype": "fp32", "device": "cpu"},
        },
        "2": {
            "class_type": LORA,
            "inputs": {
                "pipeline": ["1", 0],
                "lora_name": demo.DEMO_LORA,
                "strength_model": strength,
                "strength_clip": strength,
                "apply_to": "unet and text encoders",
                "block_weights": "",
            },
        },
        "3": sampler(["2", 0], seed=1),
        **tail,
    }


def hires_fix(strength: float) -> dict:
    return chain(
        strength,
        {
            "4": {
                "class_type": "LatentUpscaleBy",
                "inputs": {"samples": ["3", 1], "upscale_method": "nearest-exact", "scale_by": 1.5},
            },
            "5": sampler(["2", 0], seed=2, denoise=0.5, latent=["4", 0]),
            "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 1], "vae": ["1", 2]}},
        },
    )


def img2img(strength: float, mask: torch.Tensor | None = None) -> dict:
    tail = {
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 2]}},
        "5": sampler(["2", 0], seed=2, denoise=0.6, latent=["4", 0]),
    }
    if mask is not None:
        tail["7"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["4", 0], "mask": ["8", 0]}}
        tail["8"] = {"class_type": "MaskStandIn", "inputs": {}}
        tail["5"] = sampler(["2", 0], seed=2, denoise=1.0, latent=["7", 0])
    return chain(strength, tail)


def run(workflow: dict, extra_nodes: dict | None = None) -> WorkflowRunner:
    """Run with a Preview Image of the last image-making node (the runner runs what outputs need)."""
    last = max(
        (n for n, node in workflow.items() if node["class_type"] in (SAMPLER, "VAEDecode", "VAEDecodeTiled")),
        key=int,
    )
    workflow = {**workflow, "99": {"class_type": "PreviewImage", "inputs": {"images": [last, 0]}}}
    runner = WorkflowRunner({**NODES, **(extra_nodes or {})})
    runner.run(workflow)
    return runner


def test_hires_fix_runs_and_a_lora_at_0_equals_no_lora(demo_models):
    with_lora = run(hires_fix(0.8))
    image = with_lora.outputs["6"][0]
    assert image.shape == (1, 96, 96, 3)  # 64 px x 1.5
    off = run(hires_fix(0.0)).outputs["6"][0]
    assert not torch.equal(image, off)
    without = hires_fix(0.0)
    del without["2"]
    for n in ("3", "5"):
        without[n]["inputs"]["pipeline"] = ["1", 0]
    torch.testing.assert_close(off, run(without).outputs["6"][0], atol=1e-6, rtol=0)


def test_img2img_keeps_the_picture_and_the_lora_acts(demo_models):
    runner = run(img2img(0.8))
    assert runner.outputs["5"][0].shape == runner.outputs["3"][0].shape
    # In latent space (the tiny VAE is random, so pixels say little): denoise 0.6 stays nearer the
    # encoded input than a run from noise does.
    encoded, second = runner.outputs["4"][0]["samples"], runner.outputs["5"][1]["samples"]
    fresh = run(chain(0.8, {"5": sampler(["2", 0], seed=2)})).outputs["5"][1]["samples"]
    assert (second - encoded).abs().mean() < 0.5 * (fresh - encoded).abs().mean()
    assert not torch.equal(second, run(img2img(0.0)).outputs["5"][0])


def test_inpainting_keeps_the_unmasked_half(demo_models):
    mask = torch.zeros(1, 64, 64)
    mask[:, :, 32:] = 1.0

    class MaskStandIn:
        RETURN_TYPES = ("MASK",)
        FUNCTION = "make"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def make(self):
            return (mask,)

    runner = run(img2img(0.8, mask), {"MaskStandIn": MaskStandIn})
    before, after = runner.outputs["4"][0]["samples"], runner.outputs["5"][1]["samples"]
    torch.testing.assert_close(after[..., :3], before[..., :3], atol=1e-5, rtol=0)
    assert (after[..., 5:] - before[..., 5:]).abs().mean() > 0.05


def test_vae_socket_decodes_as_the_sampler_and_encodes_the_mode(demo_models):
    runner = run(
        chain(1.0, {"6": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 1], "vae": ["1", 2]}}})
    )
    images, latent = runner.outputs["3"]
    vae = runner.outputs["1"][2]
    torch.testing.assert_close(runner.outputs["6"][0], images, atol=1e-5, rtol=0)
    pipe = runner.outputs["1"][0].base.pipe
    assert torch.equal(
        vae.decode(latent["samples"]),
        decode_latents(pipe, to_model_space(latent["samples"], pipe.vae.config)),
    )
    pixels = torch.rand(1, 67, 70, 3)  # cropped to 64 x 64 around the centre, as ComfyUI does
    encoded = vae.encode(pixels)
    with torch.no_grad():
        expected = pipe.vae.encode(pixels[:, 1:65, 3:67].movedim(-1, 1) * 2 - 1).latent_dist.mean
    assert encoded.shape == (1, 4, 8, 8) and torch.allclose(encoded, expected, atol=1e-6)
    tiled = run(
        chain(
            1.0,
            {
                "6": {
                    "class_type": "VAEDecodeTiled",
                    "inputs": {
                        "samples": ["3", 1],
                        "vae": ["1", 2],
                        "tile_size": 64,
                        "overlap": 0,
                        "temporal_size": 64,
                        "temporal_overlap": 8,
                    },
                }
            },
        )
    ).outputs["6"][0]
    assert tiled.shape == images.shape


def test_load_image_mask_and_image_scale_as_comfyui(tmp_path):
    from PIL import Image

    from comfyui_diffusers_adapters.headless.standin_nodes import ImageScale, LoadImageMask
    from comfyui_diffusers_adapters.nodes import comfy_host

    comfy_host.set_io_directories(tmp_path, tmp_path / "out")
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[:10, :, 3] = 0  # the top half transparent: to be repainted
    Image.fromarray(rgba).save(tmp_path / "masked.png")
    (alpha,) = LoadImageMask().load_image("masked.png", "alpha")
    (red,) = LoadImageMask().load_image("masked.png", "red")
    assert alpha.shape == (1, 20, 30) and torch.all(alpha[:, :10] == 1) and torch.all(alpha[:, 10:] == 0)
    assert torch.allclose(red, torch.full((1, 20, 30), 200 / 255))
    image = torch.rand(1, 20, 30, 3)
    assert ImageScale().upscale(image, "bilinear", 60, 0, "disabled")[0].shape == (
        1,
        40,
        60,
        3,
    )  # keeps aspect
    (square,) = ImageScale().upscale(image, "nearest-exact", 16, 16, "center")
    assert square.shape == (1, 16, 16, 3)
    expected = torch.nn.functional.interpolate(
        image[:, :, 5:25].movedim(-1, 1), size=(16, 16), mode="nearest-exact"
    )
    assert torch.equal(square, expected.movedim(1, -1))  # the centre 20 x 20 of the 20 x 30 image
