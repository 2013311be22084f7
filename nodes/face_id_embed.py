"""FaceIDEmbed: insightface face embeddings (and aligned face crops) for FaceID IP-Adapters."""

from __future__ import annotations

from pathlib import Path

from ..loaders.face_analysis import (
    CROP_SIZES,
    PROVIDERS,
    FaceAnalysisError,
    FaceEmbeddings,
    analyze_faces,
    load_face_analysis,
)
from ..loaders.file_stamps import file_stamp
from ..loaders.images import as_rgb_images
from . import comfy_host
from .common import CATEGORY, FACEID, checks_numbers

MODELS_SUBFOLDER = "models"  # insightface's layout: <insightface folder>/models/<name>/*.onnx


def insightface_models() -> list[str]:
    """Names of the model folders (buffalo_l, antelopev2...) under models/insightface/models."""
    names: set[str] = set()
    for root in comfy_host.folder_roots("insightface"):
        folder = root / MODELS_SUBFOLDER
        if folder.is_dir():
            names.update(d.name for d in folder.iterdir() if d.is_dir() and any(d.glob("*.onnx")))
    # Never an empty list: with none installed the node still loads, and running it says where the
    # model files go.
    return sorted(names, key=str.lower) or ["buffalo_l"]


def _model_dir(name: str) -> Path:
    """The model folder `models/<name>` inside the insightface model folders (never outside them)."""
    return comfy_host.resolve_model_path("insightface", name, want_dir=True, subfolder=MODELS_SUBFOLDER)


@checks_numbers
class FaceIDEmbed:
    DESCRIPTION = (
        "Finds the face in each image with insightface (models/insightface/models/<name>, e.g. buffalo_l "
        "or antelopev2; detection is retried at smaller sizes) and returns its ArcFace embedding (normed, "
        "and raw for SDXL Portrait unnorm) and the aligned face crop, for FaceID IP-Adapters (Apply "
        "IP-Adapter's faceid input). Needs `pip install insightface onnxruntime` (onnxruntime-gpu for "
        "CUDA). The insightface models are licensed for non-commercial research only."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (FACEID, "IMAGE")
    RETURN_NAMES = ("faceid", "face_crops")
    OUTPUT_TOOLTIPS = (
        "One face embedding per image (with its aligned crop), for Apply IP-Adapter's faceid input.",
        "The aligned face crops, to check what was detected (FaceID Plus gives these to the image encoder).",
    )
    FUNCTION = "embed"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "One or several photos; the largest face of each is used."}),
                "insightface_model": (
                    insightface_models(),
                    {"tooltip": "A model folder in models/insightface/models (buffalo_l, antelopev2)."},
                ),
                "provider": (
                    list(PROVIDERS),
                    {
                        "default": "auto",
                        "tooltip": "Where insightface runs: auto takes CUDA when onnxruntime-gpu and a GPU "
                        "are there, else the CPU.",
                    },
                ),
            },
            "optional": {
                "crop_size": (
                    [str(s) for s in CROP_SIZES],
                    {
                        "default": str(CROP_SIZES[0]),
                        "tooltip": "Size of the aligned face crop: 224 for SD1.5, 256 for SDXL FaceID Plus "
                        "(as ComfyUI_IPAdapter_plus does).",
                    },
                ),
            },
        }

    @classmethod
    def IS_CHANGED(cls, insightface_model, **_):
        # Re-run when the model files change on disk (the image and widgets ComfyUI compares itself).
        try:
            folder = _model_dir(insightface_model)
            return tuple(file_stamp(p) for p in sorted(folder.glob("*.onnx")))
        except (OSError, ValueError):
            return insightface_model

    def embed(self, image, insightface_model: str, provider: str, crop_size: str = str(CROP_SIZES[0])):
        image = as_rgb_images(image, "image")
        try:
            model_dir = _model_dir(insightface_model)
        except FileNotFoundError:
            name = comfy_host.clean_model_name(insightface_model)  # checked above: a relative name
            expected = comfy_host.folder_roots("insightface")[0] / MODELS_SUBFOLDER / name
            raise FaceAnalysisError(
                f"The insightface model folder {expected} was not found. Put the {insightface_model} .onnx "
                "files there (models/insightface/models/<name>/, as ComfyUI_IPAdapter_plus expects)."
            ) from None
        analyzer = load_face_analysis(model_dir, provider)
        faces: FaceEmbeddings = analyze_faces(analyzer, image, int(crop_size), model=insightface_model)
        return (faces, faces.crops)
