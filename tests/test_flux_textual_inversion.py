"""Textual inversion on Flux.1: CLIP-L embeddings work (diffusers feeds them to CLIP-L only); a T5- or
other-width file is refused naming what Flux supports; removal restores the image exactly."""

from __future__ import annotations

import pytest
import torch
from embedding_files_lib import random_vectors, write_a1111_pt

from comfyui_diffusers_adapters.devtools.tiny_flux import CLIP_WIDTH, T5_WIDTH, build_tiny_flux
from comfyui_diffusers_adapters.loaders.base_models import BaseModel
from comfyui_diffusers_adapters.loaders.pipeline_handle import PipelineHandle
from comfyui_diffusers_adapters.loaders.sampling import SamplingSettings, run
from comfyui_diffusers_adapters.loaders.textual_inversion import TextualInversionError, with_embedding

SETTINGS = SamplingSettings(
    "a photo of zqxconcept", steps=2, width=64, height=64, cfg=1.0, sampler_name="euler", scheduler="simple"
)


@pytest.fixture(scope="module")
def handle():
    base = BaseModel(build_tiny_flux(), "flux", "tiny-flux", torch.float32, torch.device("cpu"), "flow")
    return PipelineHandle(base, ())


def test_clip_l_embedding_changes_the_image_and_goes_away(handle, tmp_path):
    write_a1111_pt(tmp_path / "zqxconcept.pt", "zqxconcept", random_vectors(2, CLIP_WIDTH))
    plain = run(handle, SETTINGS).images
    with_ti, _ = with_embedding(handle, tmp_path / "zqxconcept.pt", "zqxconcept", "node 3")
    changed = run(with_ti, SETTINGS).images
    assert (changed - plain).abs().max() > 1e-3  # the pooled CLIP-L vector sees the token
    torch.testing.assert_close(run(handle, SETTINGS).images, plain, rtol=0, atol=0)


@pytest.mark.parametrize("width, label", [(T5_WIDTH, "T5"), (1280, "SDXL")])
def test_other_widths_are_refused_naming_what_flux_takes(handle, tmp_path, width, label):
    write_a1111_pt(tmp_path / "other.pt", "other", random_vectors(2, width))
    with pytest.raises(TextualInversionError, match="CLIP-L text encoder only") as e:
        with_embedding(handle, tmp_path / "other.pt", "other", "node 3")
    assert f"{width}" in str(e.value) and "None" not in str(e.value)
