"""LoadTextualInversion: an embedding (positive or negative) on the pipeline socket."""

from __future__ import annotations

from ..loaders.embedding_files import read_embedding
from ..loaders.lora_files import file_identity
from ..loaders.pipeline_handle import PipelineHandle
from ..loaders.textual_inversion import (
    EMBEDDING_PREFIX,
    check_token_unique,
    embedding_file,
    embedding_names,
    make_spec,
)
from . import comfy_host
from .common import CATEGORY, PIPELINE


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
            return file_identity(comfy_host.resolve_model_path("embeddings", embedding))
        except (OSError, ValueError):
            return embedding

    def load(self, pipeline: PipelineHandle, embedding: str, token: str = ""):
        path = comfy_host.resolve_model_path("embeddings", embedding)
        emb = read_embedding(path)
        token = token.strip() or emb.name or path.stem
        spec = make_spec(emb, token, pipeline.base, file_identity(path), embedding)
        check_token_unique(pipeline.adapters, spec)
        handle = pipeline if spec in pipeline.adapters else pipeline.with_adapter(spec)
        vectors = next(iter(emb.vectors.values())).shape[0]
        info = f"{embedding}: token {token!r}, {vectors} vector(s), {emb.format} format"
        return {"ui": {"text": [info]}, "result": (handle, info)}


def with_prompt_embeddings(handle: PipelineHandle, *prompts: str) -> PipelineHandle:
    """The handle plus every embedding a prompt names as `embedding:name` (ComfyUI's syntax), loaded
    from models/embeddings under the token `embedding:name`. An unknown name is an error naming it."""
    for name in embedding_names(" ".join(prompts)):
        path = embedding_file(name, lambda n: comfy_host.resolve_model_path("embeddings", n))
        label = EMBEDDING_PREFIX + name
        spec = make_spec(read_embedding(path), label, handle.base, file_identity(path), label)
        if spec not in handle.adapters:
            check_token_unique(handle.adapters, spec)
            handle = handle.with_adapter(spec)
    return handle
