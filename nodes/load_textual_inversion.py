"""LoadTextualInversion: an embedding (positive or negative) on the pipeline socket."""

from __future__ import annotations

from ..loaders.file_stamps import file_stamp
from ..loaders.pipeline_handle import PipelineHandle
from ..loaders.textual_inversion import with_embedding
from . import comfy_host
from .common import CATEGORY, PIPELINE, checks_numbers


@checks_numbers
class LoadTextualInversion:
    DESCRIPTION = (
        "Adds a textual inversion embedding from models/embeddings (diffusers learned_embeds, A1111 .pt or "
        ".safetensors, SDXL clip_l/clip_g, multi-vector) under a token you then write in a prompt. "
        "A negative "
        "embedding such as EasyNegative works by putting its token in the negative prompt. Writing "
        "embedding:name in a prompt loads an embedding without this node, as in ComfyUI."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (PIPELINE, "STRING")
    RETURN_NAMES = ("pipeline", "info")
    OUTPUT_TOOLTIPS = ("The pipeline with the embedding's token.", "The token, vector count and format.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipeline": (PIPELINE, {"tooltip": "The pipeline to add the embedding to."}),
                "embedding": (
                    comfy_host.list_model_files("embeddings"),
                    {"tooltip": "A file in models/embeddings."},
                ),
            },
            "optional": {
                "token": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "The word that stands for the embedding in prompts. "
                        "Empty: the name stored "
                        "in the file, else the file name (e.g. EasyNegative).",
                    },
                ),
            },
        }

    @classmethod
    def IS_CHANGED(cls, embedding, **_):
        try:
            return file_stamp(comfy_host.resolve_model_path("embeddings", embedding))
        except (OSError, ValueError):
            return embedding

    def load(self, pipeline: PipelineHandle, embedding: str, token: str = ""):
        path = comfy_host.resolve_model_path("embeddings", embedding)
        handle, info = with_embedding(pipeline, path, token, embedding)
        return {"ui": {"text": [info]}, "result": (handle, info)}
