"""Flux.1 pipelines from the files Flux users have, fully offline: one all-in-one checkpoint, or the
split transformer / clip_l / t5xxl / ae files, plus a T5 tokenizer folder (never downloaded).

Configs come from the weights (converters.flux_checkpoint). Each module is built on the meta device
and takes its tensors by assignment, the transformer one block at a time, so peak memory stays near
the files' size even when fp8 weights are upcast to the compute dtype.

base_models routes Flux single files and folders here; loaders.flux_models adds the cached
split-file loader (kept apart: it needs base_models' BaseModel, and base_models needs this module).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

from ..converters import flux_checkpoint as fc
from ..converters.json_text import JsonTextError, parse_bounded_json
from .file_errors import ModelFileError
from .memory_modes import dtype_name, has_fp8_storage, keep_fp8_layers, stored_dtype
from .model_files import SAFETENSORS_SUFFIXES, ModelFile, check_safetensors_header, open_model_file
from .tokenizers import clip_tokenizer

FAMILY = "flux"
PREDICTION = "flow"  # Flux predicts a flow-matching velocity; there is no epsilon / v choice
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
T5_TOKENIZER_ENV = "DIFFUSERS_ADAPTERS_T5_TOKENIZER"
T5_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
# A model_index.json is a few hundred bytes; anything past this is not one.
MAX_INDEX_CHARS = 1_000_000

_host_tokenizer_folder: Path | None = None


class FluxModelError(ValueError):
    """A Flux model that cannot be loaded; the message names the input and the fix."""


# ---------------------------------------------------------------- what a source is
def _header_keys(path: Path) -> dict:
    return {k: tuple(v["shape"]) for k, v in check_safetensors_header(path).items() if k != "__metadata__"}


def is_flux_source(path: Path) -> bool:
    """Whether a checkpoint file or diffusers folder is Flux.1, from its header or model_index.json
    alone. Pickled checkpoints are not read here (Flux ships as safetensors only)."""
    if path.is_dir():
        index = path / "model_index.json"
        try:
            text = index.read_text(encoding="utf-8")[:MAX_INDEX_CHARS]
            data = parse_bounded_json(text, index.name, max_chars=MAX_INDEX_CHARS, max_depth=8)
        except (OSError, UnicodeError, JsonTextError):
            return False  # the folder loader reports a broken folder with its own message
        return isinstance(data, dict) and data.get("_class_name") == "FluxPipeline"
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return False
    try:
        return fc.is_flux(_header_keys(path))
    except ModelFileError:
        return False  # the single-file loader reports the broken file


def auto_dtype(device: torch.device) -> torch.dtype:
    """Flux's compute dtype for 'auto': bf16 on a GPU (T5 overflows in fp16), fp32 on the CPU."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


# ---------------------------------------------------------------- T5 tokenizer
def set_host_tokenizer_folder(folder: Path | None) -> None:
    """The T5 tokenizer folder the host ships (ComfyUI's own), used when nothing else names one."""
    global _host_tokenizer_folder
    _host_tokenizer_folder = folder


def t5_tokenizer_folder(folder: Path | None = None) -> Path:
    """The T5 tokenizer folder to use: the one given, else $DIFFUSERS_ADAPTERS_T5_TOKENIZER, else the
    host's. Nothing is downloaded: without one the error says where to get the files."""
    env = os.environ.get(T5_TOKENIZER_ENV)
    chosen = folder or (Path(env) if env else None) or _host_tokenizer_folder
    if chosen is None:
        raise FluxModelError(
            "Flux needs the T5 tokenizer and none was found (nothing is downloaded). Put tokenizer.json "
            "(with tokenizer_config.json) from ComfyUI's comfy/text_encoders/t5_tokenizer folder or the "
            f"FLUX.1 repository's tokenizer_2 folder into a folder and set {T5_TOKENIZER_ENV} to it."
        )
    if not any((chosen / name).is_file() for name in T5_TOKENIZER_FILES):
        raise FluxModelError(
            f"The T5 tokenizer folder {chosen} has no tokenizer.json or spiece.model. Put tokenizer.json "
            "(with tokenizer_config.json) from ComfyUI's comfy/text_encoders/t5_tokenizer folder or the "
            "FLUX.1 repository's tokenizer_2 folder into it."
        )
    return chosen


def load_t5_tokenizer(folder: Path | None = None) -> T5TokenizerFast:
    chosen = t5_tokenizer_folder(folder)
    try:
        return T5TokenizerFast.from_pretrained(str(chosen), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise FluxModelError(f"Could not read the T5 tokenizer in {chosen}: {str(e)[:300]}") from e


# ---------------------------------------------------------------- building modules
class _Loaded:
    """Tensors read from files, with what the loader needs to tell the user (fp8 sources)."""

    def __init__(self) -> None:
        self.fp8_parts: list[str] = []

    def read(self, file: ModelFile, keys: Iterable[str], part: str) -> dict[str, torch.Tensor]:
        tensors = file.read(keys)
        if part not in self.fp8_parts and any(t.dtype in FP8_DTYPES for t in tensors.values()):
            self.fp8_parts.append(part)
        return tensors


def _meta(make):
    with init_empty_weights(include_buffers=False):
        return make()


def _assign(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    what: str,
    keep_fp8: bool = False,
) -> None:
    """Assign converted tensors (cast to `dtype`; with `keep_fp8`, fp8 tensors stay as read, not
    copied) to the meta module; names must all be known."""
    for key in list(state):  # in place: the file's copy of each tensor is dropped as it is cast
        state[key] = state[key].to(stored_dtype(state[key], dtype) if keep_fp8 else dtype)
    _, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise FluxModelError(f"{what} has weights its model does not have (e.g. {unexpected[:3]}).")


def _finish(module: torch.nn.Module, what: str) -> torch.nn.Module:
    """Every parameter must have been assigned: a meta tensor left means the file lacked it."""
    missing = [n for n, p in module.named_parameters() if p.is_meta]
    if missing:
        raise FluxModelError(f"{what} is missing {len(missing)} weights (e.g. {missing[:3]}).")
    return module.eval().requires_grad_(False)


def _layer_groups(keys: Iterable[str]) -> list[list[str]]:
    """Keys grouped by layer (up to their first number: `encoder.block.3`), the rest in one group:
    a text encoder is read and cast one layer at a time, so an fp8 or fp16 file upcast to the compute
    dtype never holds two copies of itself."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        parts = key.split(".")
        cut = next((i for i, part in enumerate(parts) if part.isdigit()), len(parts))
        groups.setdefault(".".join(parts[: cut + 1]) if cut < len(parts) else "", []).append(key)
    return list(groups.values())


def _assign_by_layer(module, file: ModelFile, prefix: str, convert, dtype, what: str, part: str, loaded):
    for keys in _layer_groups(k for k in file.shapes if k.startswith(prefix)):
        _assign(module, convert(loaded.read(file, keys, part)), dtype, what)


def _format_error(file: ModelFile, part: str, e: Exception) -> FluxModelError:
    return FluxModelError(f"{file.path.name} (the {part}): {e}")


def build_transformer(
    file: ModelFile, prefix: str, dtype: torch.dtype, loaded: _Loaded, keep_fp8: bool = False
) -> FluxTransformer2DModel:
    """The transformer, block by block. With `keep_fp8`, the file's fp8 tensors are assigned as read
    (1 byte each) and their layers compute in `dtype` through layerwise casting (memory_modes)."""
    try:
        config = fc.transformer_config(file.shapes, prefix)
        table = fc.check_transformer_keys(file.shapes, config, prefix)
    except fc.FluxFormatError as e:
        raise _format_error(file, "Flux transformer", e) from e
    model = _meta(lambda: FluxTransformer2DModel(**config))
    groups: dict[str, list[fc.KeyMap]] = {}
    for entry in table:  # one block at a time: an fp8 file upcast never holds two copies of itself
        head = entry.source.split(".")
        groups.setdefault(".".join(head[:2]) if head[0].endswith("_blocks") else "top", []).append(entry)
    for entries in groups.values():
        tensors = loaded.read(file, (prefix + e.source for e in entries), "transformer")
        state: dict[str, torch.Tensor] = {}
        for entry in entries:
            state.update(fc.convert(entry, tensors.pop(prefix + entry.source)))
        _assign(model, state, dtype, f"{file.path.name} (the Flux transformer)", keep_fp8)
    model = _finish(model, f"{file.path.name} (the Flux transformer)")
    if keep_fp8:
        keep_fp8_layers(model, dtype)
    return model


def load_transformer(path: Path, dtype: torch.dtype, keep_fp8: bool = False) -> FluxTransformer2DModel:
    """A Flux transformer file alone (BFL layout, no prefix), as Load Flux loads it."""
    file = open_model_file(path)
    _refuse_scaled(file, "transformer")
    return build_transformer(file, fc.transformer_prefix(file.shapes) or "", dtype, _Loaded(), keep_fp8)


def _clip_state(tensors: dict[str, torch.Tensor], model: torch.nn.Module, prefix: str) -> dict:
    """clip_l files keep `text_model.*` (transformers 4's layout); transformers 5's CLIPTextModel has no
    `text_model.` level. Its projection, logit scale and position ids are not part of the model."""
    wanted = set(model.state_dict())
    out = {}
    for key, tensor in tensors.items():
        name = key[len(prefix) :]
        if name.startswith("text_projection.") or name in (
            "logit_scale",
            "text_model.embeddings.position_ids",
        ):
            continue
        if name not in wanted and name.startswith("text_model."):
            name = name[len("text_model.") :]
        out[name] = tensor
    return out


def build_clip(file: ModelFile, prefix: str, dtype: torch.dtype, loaded: _Loaded) -> CLIPTextModel:
    what = f"{file.path.name} (the CLIP-L text encoder)"
    try:
        config = CLIPTextConfig(**fc.clip_l_config(file.shapes, prefix))
    except fc.FluxFormatError as e:
        raise FluxModelError(f"{what}: {e} It looks like {fc.describe(file.shapes)}.") from e
    model = _meta(lambda: CLIPTextModel(config))
    convert = lambda tensors: _clip_state(tensors, model, prefix)  # noqa: E731
    _assign_by_layer(model, file, prefix, convert, dtype, what, "CLIP-L", loaded)
    return _finish(model, what)


def _t5_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """T5 keys without the prefix; the input embedding under `shared.weight` only (files keep it once,
    under either name; build_t5 ties the encoder's copy to it)."""
    state = {k[len(prefix) :]: v for k, v in tensors.items()}
    if "encoder.embed_tokens.weight" in state:
        embedding = state.pop("encoder.embed_tokens.weight")
        state.setdefault("shared.weight", embedding)
    return state


def build_t5(file: ModelFile, prefix: str, dtype: torch.dtype, loaded: _Loaded) -> T5EncoderModel:
    what = f"{file.path.name} (the T5 text encoder)"
    try:
        config = T5Config(**fc.t5_config(file.shapes, prefix))
    except fc.FluxFormatError as e:
        raise FluxModelError(f"{what}: {e} It looks like {fc.describe(file.shapes)}.") from e
    model = _meta(lambda: T5EncoderModel(config))
    _assign_by_layer(model, file, prefix, lambda t: _t5_state(t, prefix), dtype, what, "T5", loaded)
    if not model.shared.weight.is_meta:
        model.encoder.embed_tokens.weight = model.shared.weight  # tied, as T5EncoderModel ties them
    return _finish(model, what)


def build_vae(file: ModelFile, prefix: str, dtype: torch.dtype, loaded: _Loaded) -> AutoencoderKL:
    what = f"{file.path.name} (the VAE)"
    try:
        config = fc.vae_config(file.shapes, prefix)
    except fc.FluxFormatError as e:
        raise FluxModelError(f"{what}: {e} It looks like {fc.describe(file.shapes)}.") from e
    if config["latent_channels"] != 16:
        raise FluxModelError(
            f"{what} has {config['latent_channels']} latent channels; Flux's VAE (ae.safetensors) has 16. "
            "An SD or SDXL VAE does not work with Flux."
        )
    model = _meta(lambda: AutoencoderKL(**config))
    tensors = loaded.read(file, (k for k in file.shapes if k.startswith(prefix)), "VAE")
    ldm = {k[len(prefix) :]: v for k, v in tensors.items()}
    _assign(model, convert_ldm_vae_checkpoint(ldm, config), dtype, what)
    return _finish(model, what)


# ---------------------------------------------------------------- pipelines
def flux_scheduler(guidance_embeds: bool) -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler (resolution-dependent shift) for guidance-distilled models, else
    FLUX.1-schnell's (no shift): the configs of the two official repositories."""
    if not guidance_embeds:
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False
        )
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def assemble(transformer, vae, clip, t5, t5_tokenizer) -> FluxPipeline:
    if clip.config.hidden_size != transformer.config.pooled_projection_dim:
        raise FluxModelError(
            f"The CLIP text encoder is {clip.config.hidden_size} wide but the transformer reads "
            f"{transformer.config.pooled_projection_dim}-wide pooled features: use Flux's clip_l."
        )
    if t5.config.d_model != transformer.config.joint_attention_dim:
        raise FluxModelError(
            f"The T5 text encoder is {t5.config.d_model} wide but the transformer reads "
            f"{transformer.config.joint_attention_dim}-wide text features: use Flux's t5xxl."
        )
    pipe = FluxPipeline(
        scheduler=flux_scheduler(transformer.config.guidance_embeds),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def describe_pipeline(pipe: FluxPipeline, fp8_parts: list[str], dtype: torch.dtype) -> str:
    """Variant, size, and how fp8 weights are held: stored fp8 (layerwise casting) or upcast."""
    config = pipe.transformer.config
    variant = "dev (guidance-distilled)" if config.guidance_embeds else "schnell-style (no guidance input)"
    width = config.num_attention_heads * config.attention_head_dim
    blocks = f"{config.num_layers} double + {config.num_single_layers} single blocks"
    info = f"Flux.1 {variant}: {blocks}, {width} wide"
    compute = dtype_name(dtype)
    if has_fp8_storage(pipe.transformer):
        info += f"\ntransformer: float8_e4m3fn storage, {compute} compute (layerwise casting)"
    upcast = [part for part in fp8_parts if part != "transformer" or not has_fp8_storage(pipe.transformer)]
    if upcast:
        info += f"\nfp8 weights ({', '.join(upcast)}) upcast to {compute}"
    return info


def load_all_in_one(
    path: Path, dtype: torch.dtype, t5_tokenizer_dir: Path | None = None, keep_fp8: bool = False
):
    """(pipe, info) from ComfyUI's all-in-one Flux checkpoint; `keep_fp8`: an fp8 transformer stays
    fp8 in memory, computing in `dtype`."""
    file = open_model_file(path)
    if fc.transformer_prefix(file.shapes) != fc.TRANSFORMER_PREFIX:
        raise FluxModelError(
            f"{path.name} is {fc.describe(file.shapes)}, not an all-in-one Flux checkpoint: put a Flux "
            "transformer in models/diffusion_models and load it with Load Flux (with clip_l, t5xxl and ae)."
        )
    parts = {"CLIP-L": fc.CLIP_L_PREFIX, "T5-XXL": fc.T5_PREFIX, "VAE": fc.VAE_PREFIX}
    absent = [name for name, prefix in parts.items() if not any(k.startswith(prefix) for k in file.shapes)]
    if absent:
        raise FluxModelError(
            f"{path.name} holds a Flux transformer without its {', '.join(absent)} "
            f"({', '.join(parts[a] + '*' for a in absent)}): load it with Load Flux, naming the clip_l, "
            "t5xxl and ae files."
        )
    _refuse_scaled(file, "checkpoint")
    tokenizer = load_t5_tokenizer(t5_tokenizer_dir)
    loaded = _Loaded()
    pipe = assemble(
        build_transformer(file, fc.TRANSFORMER_PREFIX, dtype, loaded, keep_fp8),
        build_vae(file, fc.VAE_PREFIX, dtype, loaded),
        build_clip(file, fc.CLIP_L_PREFIX, dtype, loaded),
        build_t5(file, fc.T5_PREFIX, dtype, loaded),
        tokenizer,
    )
    return pipe, describe_pipeline(pipe, loaded.fp8_parts, dtype)


def _refuse_scaled(file: ModelFile, input_name: str) -> None:
    scaled = fc.scaled_keys(file.shapes)
    if scaled:
        raise FluxModelError(
            f"The {input_name} input {file.path.name} is a scaled-fp8 or quantized file ({scaled[0]!r}), "
            "which is not supported yet; use the plain fp8_e4m3fn, fp16 or bf16 file "
            "(e.g. t5xxl_fp8_e4m3fn.safetensors rather than t5xxl_fp8_e4m3fn_scaled.safetensors)."
        )


def _expect(file: ModelFile, input_name: str, kind: str, ok: bool) -> None:
    _refuse_scaled(file, input_name)
    if not ok:
        raise FluxModelError(
            f"The {input_name} input {file.path.name} is {fc.describe(file.shapes)}, not {kind}; "
            f"choose {kind} there."
        )


def load_split(
    transformer: Path,
    clip_l: Path,
    t5: Path,
    vae: Path,
    dtype: torch.dtype,
    t5_tokenizer_dir: Path | None = None,
    keep_fp8: bool = False,
):
    """(pipe, info) from the split layout: a transformer, clip_l, t5xxl and ae file; `keep_fp8`: an
    fp8 transformer stays fp8 in memory, computing in `dtype`."""
    files = {
        name: open_model_file(p)
        for name, p in (("transformer", transformer), ("clip_l", clip_l), ("t5", t5), ("vae", vae))
    }
    _expect(
        files["transformer"],
        "transformer",
        "a Flux transformer",
        fc.transformer_prefix(files["transformer"].shapes) == "",
    )
    _expect(
        files["clip_l"],
        "clip_l",
        "a CLIP text encoder",
        fc.describe(files["clip_l"].shapes) == "a CLIP text encoder",
    )
    _expect(files["t5"], "t5", "a T5 text encoder", fc.describe(files["t5"].shapes) == "a T5 text encoder")
    _expect(files["vae"], "vae", "a VAE", fc.describe(files["vae"].shapes) == "a VAE")
    tokenizer = load_t5_tokenizer(t5_tokenizer_dir)
    loaded = _Loaded()
    pipe = assemble(
        build_transformer(files["transformer"], "", dtype, loaded, keep_fp8),
        build_vae(files["vae"], "", dtype, loaded),
        build_clip(files["clip_l"], "", dtype, loaded),
        build_t5(files["t5"], "", dtype, loaded),
        tokenizer,
    )
    return pipe, describe_pipeline(pipe, loaded.fp8_parts, dtype)


def load_single_file(path: Path, dtype: torch.dtype, prediction: str = "auto", keep_fp8: bool = False):
    """base_models' single-file loader signature: (pipe, family, prediction, info)."""
    pipe, info = load_all_in_one(path, dtype, keep_fp8=keep_fp8)
    return pipe, FAMILY, PREDICTION, info
