"""Loading base pipelines (single-file checkpoints and diffusers folders), fully offline, cached.

Single files: the configs come from the weights (converters.checkpoint_layout), the key renaming
from diffusers' own single-file converters, the tokenizers from the vocabulary the pack ships.
Modules are built on the meta device and take the converted tensors by assignment, one component
at a time, so peak memory stays near the checkpoint's size.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..converters import checkpoint_layout
from ..converters.families import FAMILY_BY_CROSS_ATTENTION, FAMILY_NAMES
from ..converters.training_metadata import summarize
from . import flux_files
from .attention_calls import skip_signature_lookups
from .file_stamps import source_stamp
from .memory_modes import place
from .model_files import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    ModelFile,
    check_safetensors_header,
    load_pickle_state_dict,
    open_model_file,
)
from .model_folders import check_shard_indexes
from .pipeline_layout import PipelineLayout, layout_of, module_shapes
from .schedulers import default_scheduler
from .stamp_cache import StampCache
from .tokenizers import END_OF_TEXT, OPEN_CLIP_PAD, clip_tokenizer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PREDICTIONS = ("auto", "epsilon", "v_prediction")
CACHE_SIZE = 2


class BaseModelError(ValueError):
    """A base model that cannot be loaded (wrong kind of file, unsupported family)."""


@dataclass(eq=False, repr=False)
class BaseModel:
    """One loaded base pipeline, shared by every handle that refers to it.

    Only the sampler touches `pipe`, under `lock`; `applied` records which adapters it carries.
    Nodes read `layout`, the pipeline's frozen layout recorded when it was made, never `pipe`.
    """

    pipe: DiffusionPipeline
    family: str
    source: str
    dtype: torch.dtype
    device: torch.device
    prediction: str
    info: str = ""
    lock: threading.RLock = field(default_factory=threading.RLock)
    applied: tuple = ()  # adapter specs currently applied to `pipe`, in order
    kind_state: dict = field(default_factory=dict)  # adapter kind name -> what it needs to undo itself
    vae_socket: Any = None  # the VAE output's value, made once by nodes/comfy_host.vae_for

    def __repr__(self) -> str:  # short: ComfyUI prints a failed node's inputs (see KeyedSpec)
        return f"BaseModel({self.family}, {Path(self.source).name}, {self.dtype}, {self.device})"

    layout: PipelineLayout = field(init=False)

    def __post_init__(self) -> None:
        self.layout = layout_of(self.pipe, self.family)

    @property
    def family_name(self) -> str:
        return FAMILY_NAMES[self.family]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BaseModelError("device 'cuda' was chosen but no CUDA GPU is available; choose 'auto' or 'cpu'.")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BaseModelError(
            "device 'mps' was chosen but Apple MPS is not available; choose 'auto' or 'cpu'."
        )
    return torch.device(device)


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same; "cuda" (no index) matches the current "cuda:N"."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


def vae_dtype(family: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The VAE's dtype: the model's, except SDXL in fp16 on a GPU with bf16, where it is bf16.

    SDXL's VAE overflows in fp16, so diffusers upcasts it to fp32 for every decode; bf16 has fp32's
    range at fp16's speed, which is ComfyUI's choice too (measured on an H200 at 1024x1024: 85 ms per
    decode in bf16, 113 ms in fp32)."""
    if (
        family == "sdxl"
        and dtype == torch.float16
        and device.type == "cuda"
        and torch.cuda.is_bf16_supported()
    ):
        return torch.bfloat16
    return dtype


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if dtype not in DTYPES:
        raise BaseModelError(f"Unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


# ---------------------------------------------------------------- single-file checkpoints
def _build(
    cls: type,
    config: Any,
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype,
    module: torch.nn.Module | None = None,
) -> torch.nn.Module:
    """Build `cls` on the meta device (or take `module`, already there) and assign the converted
    tensors (no second copy)."""
    if module is None:
        with init_empty_weights(include_buffers=False):
            module = cls(config) if isinstance(config, CLIPTextConfig) else cls(**config)
    state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    missing, unexpected = module.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise BaseModelError(
            f"The checkpoint's {cls.__name__} weights do not match its layout: "
            f"{len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})."
        )
    return module.eval().requires_grad_(False)


def _clip_state(converted: dict[str, torch.Tensor], model: torch.nn.Module, layers: int) -> dict:
    """Adapt diffusers' converted CLIP keys to the module at hand: transformers 5's CLIPTextModel has
    no `text_model.` level, older versions and CLIPTextModelWithProjection do. Drops what the module
    does not have (logit scale, SD2's unused last layer, a projection on a plain text model)."""
    wanted = set(model.state_dict())
    nested = any(k.startswith("text_model.") for k in wanted)
    out = {}
    for k, v in converted.items():
        if not k.startswith(("text_model.", "text_projection.")):
            k = "text_model." + k
        parts = k.split(".")
        if parts[1:3] == ["encoder", "layers"] and int(parts[3]) >= layers:
            continue  # SD2: the last OpenCLIP layer is not used
        if not nested and k.startswith("text_model."):
            k = k[len("text_model.") :]
        if k in wanted:
            out[k] = v
    return out


def _text_encoder(file: ModelFile, config: dict, prefix: str, open_clip: bool, dtype: torch.dtype):
    cls = CLIPTextModelWithProjection if prefix == checkpoint_layout.SDXL_CLIP_G else CLIPTextModel
    te_config = CLIPTextConfig(**config)
    with init_empty_weights(include_buffers=False):
        meta_model = cls(te_config)
    sub = file.read(k for k in file.shapes if k.startswith(prefix))
    if open_clip:
        converted = convert_open_clip_checkpoint(meta_model, sub, prefix=prefix)
    else:
        converted = convert_ldm_clip_checkpoint(sub, remove_prefix=prefix)
    del sub
    state = _clip_state(converted, meta_model, config["num_hidden_layers"])
    return _build(cls, te_config, state, dtype, module=meta_model)


def checkpoint_targets(path: Path) -> tuple[str, dict[str, dict[str, tuple[int, ...]]]]:
    """(family, module path -> weight shape per part) of a single-file checkpoint, from its header
    alone: the modules are built on the meta device, no weight is read."""
    configs = checkpoint_layout.infer_configs(open_model_file(path).shapes)
    with init_empty_weights(include_buffers=False):
        parts = {
            "unet": UNet2DConditionModel(**configs.unet),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs.text_encoder)),
        }
        if configs.text_encoder_2:
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**configs.text_encoder_2))
    return configs.family, {part: module_shapes(model) for part, model in parts.items()}


def _detect_prediction(file: ModelFile, family: str) -> str:
    if "v_pred" in file.shapes:
        return "v_prediction"
    # ComfyUI's heuristic for SD2: v-prediction models have a wide spread in this bias.
    if family == "sd2" and checkpoint_layout.V_PREDICTION_PROBE in file.shapes:
        probe = file.read([checkpoint_layout.V_PREDICTION_PROBE])[
            checkpoint_layout.V_PREDICTION_PROBE
        ].float()
        return "v_prediction" if torch.std(probe, unbiased=False) > 0.09 else "epsilon"
    return "epsilon"


def load_single_file(
    path: Path, dtype: torch.dtype, prediction: str = "auto"
) -> tuple[DiffusionPipeline, str, str, str]:
    """A diffusers pipeline from an original-layout checkpoint: (pipe, family, prediction, info)."""
    file = open_model_file(path)
    try:
        configs = checkpoint_layout.infer_configs(file.shapes)
    except checkpoint_layout.CheckpointFormatError as e:
        raise BaseModelError(f"{path.name}: {e}") from e
    family = configs.family
    if prediction == "auto":
        prediction = _detect_prediction(file, family)

    unet_sd = file.read(k for k in file.shapes if k.startswith(checkpoint_layout.UNET))
    unet = _build(
        UNet2DConditionModel, configs.unet, convert_ldm_unet_checkpoint(unet_sd, configs.unet), dtype
    )
    del unet_sd
    vae_sd = file.read(k for k in file.shapes if k.startswith(checkpoint_layout.VAE))
    vae = _build(AutoencoderKL, configs.vae, convert_ldm_vae_checkpoint(vae_sd, configs.vae), dtype)
    del vae_sd
    scheduler = default_scheduler(family, prediction)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=_text_encoder(
                file, configs.text_encoder, checkpoint_layout.SDXL_CLIP_L, False, dtype
            ),
            text_encoder_2=_text_encoder(
                file, configs.text_encoder_2, checkpoint_layout.SDXL_CLIP_G, True, dtype
            ),
            tokenizer=clip_tokenizer(END_OF_TEXT),
            tokenizer_2=clip_tokenizer(OPEN_CLIP_PAD),
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    else:
        open_clip = family == "sd2"
        prefix = checkpoint_layout.SD2_CLIP if open_clip else checkpoint_layout.SD1_CLIP
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=_text_encoder(file, configs.text_encoder, prefix, open_clip, dtype),
            tokenizer=clip_tokenizer(OPEN_CLIP_PAD if open_clip else END_OF_TEXT),
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe, family, prediction, summarize(file.metadata)


# ---------------------------------------------------------------- diffusers folders
def _text_to_image(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """An inpainting folder's pipeline as its text-to-image class on the same components: the
    sampler picks the inpaint pipeline from the UNet's input channels, as for single files."""
    if isinstance(pipe, StableDiffusionXLInpaintPipeline):
        return StableDiffusionXLPipeline(
            **pipe.components, force_zeros_for_empty_prompt=True, add_watermarker=False
        )
    if isinstance(pipe, StableDiffusionInpaintPipeline):
        return StableDiffusionPipeline(**pipe.components, requires_safety_checker=False)
    return pipe


def family_of_pipeline(pipe: DiffusionPipeline) -> str:
    if type(pipe).__name__ == "FluxPipeline":
        return "flux"
    if isinstance(pipe, StableDiffusionXLPipeline):
        return "sdxl"
    if isinstance(pipe, StableDiffusionPipeline):
        # SD1 unless the width says SD2: tiny test models have widths of their own.
        return (
            "sd2" if FAMILY_BY_CROSS_ATTENTION.get(pipe.unet.config.cross_attention_dim) == "sd2" else "sd1"
        )
    raise BaseModelError(
        f"{type(pipe).__name__} folders are not supported; use a Stable Diffusion 1.x, 2.x or SDXL model."
    )


def check_folder_files(folder: Path) -> None:
    """Check a diffusers folder's weight files the way single files are checked, before diffusers and
    transformers read them (their errors name no cause): safetensors headers, and pickles with
    `weights_only` where a component has no safetensors file (else diffusers prefers that one)."""
    for sub in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        files = sorted(p for p in sub.iterdir() if p.is_file())
        safetensors = [p for p in files if p.suffix.lower() in SAFETENSORS_SUFFIXES]
        for path in safetensors:
            check_safetensors_header(path)
        if not safetensors:
            for path in files:
                if path.suffix.lower() in PICKLE_SUFFIXES:
                    load_pickle_state_dict(path)


def load_diffusers_folder(folder: Path, dtype: torch.dtype, prediction: str = "auto"):
    if not (folder / "model_index.json").is_file():
        raise BaseModelError(f"{folder.name} is not a diffusers model folder (no model_index.json).")
    check_folder_files(folder)
    check_shard_indexes(folder)  # transformers follows '../' in a shard index
    try:
        pipe = DiffusionPipeline.from_pretrained(
            folder, dtype=dtype, local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError, TypeError) as e:
        raise BaseModelError(f"Could not load the diffusers folder {folder.name}: {e}") from e
    pipe = _text_to_image(pipe)
    family = family_of_pipeline(pipe)
    if prediction != "auto":
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction)
    pipe.set_progress_bar_config(disable=True)
    return pipe, family, pipe.scheduler.config.get("prediction_type", "epsilon"), ""


# ---------------------------------------------------------------- cache
# Pipelines are large: built under the cache's lock, so two nodes asking for one load it once.
_cache: StampCache[BaseModel] = StampCache(CACHE_SIZE, build_under_lock=True)


def _source_key(path: Path) -> tuple:
    """Identity of a file or folder on disk: a changed or replaced file reloads."""
    return source_stamp(path)


def load_base_model(
    path: Path, dtype: str = "auto", device: str = "auto", prediction: str = "auto"
) -> BaseModel:
    """The cached base model for (file, dtype, device, prediction), loading it on a miss."""
    if prediction not in PREDICTIONS:
        raise BaseModelError(
            f"Unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}."
        )
    dev = resolve_device(device)
    flux = dtype == "auto" and flux_files.is_flux_source(path)  # Flux: bf16 on a GPU (T5 overflows in fp16)
    torch_dtype = flux_files.auto_dtype(dev) if flux else resolve_dtype(dtype, dev)
    stamp = _source_key(path)
    # A file changed on disk: forget its stale entries (every dtype and device) before loading it.
    _cache.discard(lambda key, old: key[0] == str(path) and old != stamp)
    # 'auto' on Flux also keeps an fp8 transformer fp8 in memory (layerwise casting): part of the key.
    return _cache.get(
        (str(path), torch_dtype, str(dev), prediction, flux),
        stamp,
        lambda: _load(path, torch_dtype, dev, prediction, keep_fp8=flux),
    )


def _load(
    path: Path, torch_dtype: torch.dtype, dev: torch.device, prediction: str, keep_fp8: bool = False
) -> BaseModel:
    flux = flux_files.is_flux_source(path)
    loader = load_diffusers_folder if path.is_dir() else load_single_file
    if flux and not path.is_dir():
        pipe, family, pred, info = flux_files.load_single_file(path, torch_dtype, keep_fp8=keep_fp8)
    else:
        pipe, family, pred, info = loader(path, torch_dtype, "auto" if flux else prediction)
    pred = flux_files.PREDICTION if flux else pred
    pipe.vae.to(dtype=vae_dtype(family, torch_dtype, dev))  # before placing: offload hooks hold modules
    if flux:  # Flux is 20-30 GB at full size: on CUDA, offload chosen from free VRAM (memory_modes)
        info = "\n".join(line for line in (info, place(pipe, dev)) if line)
    else:
        pipe.to(dev)
    for model in (getattr(pipe, "unet", None) or pipe.transformer, pipe.vae):
        skip_signature_lookups(model)
    return BaseModel(pipe, family, str(path), torch_dtype, dev, pred, info)


def clear_cache() -> None:
    _cache.clear()
