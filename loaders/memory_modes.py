"""Memory for Flux on a 24 GB card: fp8 weights kept fp8 (layerwise casting), and where a pipeline's
weights live on a GPU (all resident, model CPU offload, or one layer at a time), chosen from free VRAM
the way ComfyUI's low-VRAM mode chooses.

Storage: diffusers' layerwise-casting hook (the one `ModelMixin.enable_layerwise_casting` attaches)
keeps a layer's weights in fp8 and casts them to the compute dtype for its forward only. It is put on
exactly the Linear/Conv layers whose weights the file holds in fp8, after they were assigned as read
(no upcast copy of the model). diffusers' default skip patterns (norms, embeddings, proj_out) are not
used: they exist to protect bf16 weights from rounding to fp8, and a layer read from an fp8 file has
nothing to lose (fp8 -> bf16/fp32 is exact, so each forward sees the values an upcast load would
hold). At full size those patterns would keep the modulation Linears (`norm1.linear`, 3.2 B of Flux's
11.9 B weights) upcast, 1.27x the file. A layer with any non-fp8 tensor (a bf16 bias) is not hooked
and computes as loaded (its fp8 tensors upcast), because the hook would round that tensor to fp8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.hooks import apply_layerwise_casting_hook
from diffusers.hooks.group_offloading import _is_group_offload_enabled

GIB = 1024**3
# Working memory kept free beside the resident weights, from ComfyUI's own estimates for Flux at
# 1024x1024 (the size it is made for; the loader cannot know the run's size): the VAE decode is the
# largest step, 2178 x 128 x 128 x 64 x 2 bytes = 4.3 GiB (comfy.sd.VAE's memory_used_decode in bf16);
# sampling needs 0.9 GiB (Flux's memory_usage_factor 2.8) plus ComfyUI's 0.8 GiB minimum. One layer
# upcast from fp8 (single_blocks.linear1, 3072 x 21504 in bf16) is 132 MB more.
WORKING_RESERVE = int(4.5 * GIB)

GPU, MODEL_OFFLOAD, SEQUENTIAL_OFFLOAD = "gpu", "model offload", "sequential offload"


# ---------------------------------------------------------------- fp8 storage
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_CAST_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def stored_dtype(tensor: torch.Tensor, compute_dtype: torch.dtype) -> torch.dtype:
    """What a tensor read from a file is kept as when fp8 is kept: fp8 as is, the rest in compute."""
    return tensor.dtype if tensor.dtype in FP8_DTYPES else compute_dtype


def keep_fp8_layers(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Hook every Linear/Conv of `model` whose tensors are all fp8 (layerwise casting); fp8 tensors
    elsewhere (a norm's scale, a layer with a bf16 bias) are upcast to `compute_dtype`. Returns the
    number of layers kept fp8."""
    kept = 0
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not own or not any(p.dtype in FP8_DTYPES for p in own):
            continue
        dtypes = {p.dtype for p in own}
        if isinstance(module, _CAST_LAYERS) and len(dtypes) == 1:
            apply_layerwise_casting_hook(module, dtypes.pop(), compute_dtype, non_blocking=False)
            kept += 1
        else:
            module.to(dtype=compute_dtype)
    return kept


def has_fp8_storage(model: torch.nn.Module) -> bool:
    return any(p.dtype in FP8_DTYPES for p in model.parameters())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------- offload modes
def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's weights as stored (fp8 weights count one byte each)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class MemoryPlan:
    mode: str
    reason: str  # the numbers behind the choice, for the node's info


def choose_mode(free: int, parts: dict[str, int], reserve: int = WORKING_RESERVE) -> MemoryPlan:
    """ComfyUI's low-VRAM logic for a diffusers pipeline, from numbers alone (bytes):
    everything resident when all parts plus the working reserve fit in free VRAM; else model CPU
    offload (each part moves to the GPU for its turn) when the largest part plus the reserve fits;
    else sequential offload (one layer at a time on the GPU, the slowest)."""
    total, largest = sum(parts.values()), max(parts.values(), default=0)
    name = max(parts, key=parts.__getitem__) if parts else "none"
    numbers = (
        f"{_gib(free)} free; weights {_gib(total)} (largest: {name} {_gib(largest)}); reserve {_gib(reserve)}"
    )
    if total + reserve <= free:
        return MemoryPlan(GPU, f"all weights fit: {numbers}")
    if largest + reserve <= free:
        return MemoryPlan(MODEL_OFFLOAD, f"the largest part fits but not all: {numbers}")
    return MemoryPlan(SEQUENTIAL_OFFLOAD, f"even the largest part does not fit: {numbers}")


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def pipeline_parts(pipe: DiffusionPipeline) -> dict[str, int]:
    return {
        name: module_bytes(module)
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }


def apply_mode(pipe: DiffusionPipeline, mode: str, device: torch.device) -> None:
    """Put a pipeline (on the CPU) where `mode` says; offloaded weights stay real CPU tensors, so the
    LoRA patcher merges into them as into resident ones."""
    if mode == GPU:
        pipe.to(device)
    elif mode == MODEL_OFFLOAD:
        pipe.enable_model_cpu_offload(device=device)
    elif mode == SEQUENTIAL_OFFLOAD:
        # diffusers' leaf-level group offloading, not enable_sequential_cpu_offload: accelerate's
        # sequential offload leaves meta tensors in the modules, which the LoRA patcher cannot merge into.
        pipe.enable_group_offload(
            onload_device=device, offload_device=torch.device("cpu"), offload_type="leaf_level"
        )
    else:
        raise ValueError(
            f"Unknown memory mode {mode!r}; choose one of {GPU}, {MODEL_OFFLOAD}, {SEQUENTIAL_OFFLOAD}."
        )


def place(pipe: DiffusionPipeline, device: torch.device) -> str:
    """Move a freshly loaded pipeline to `device`; on CUDA choose the mode from free VRAM. Returns the
    info line naming the mode and why ("" off CUDA, where nothing changes)."""
    if device.type != "cuda":
        pipe.to(device)
        return ""
    torch.cuda.empty_cache()  # blocks torch holds but no tensor uses count as free
    free, _ = torch.cuda.mem_get_info(device)
    plan = choose_mode(free, pipeline_parts(pipe))
    apply_mode(pipe, plan.mode, device)
    return f"memory: {plan.mode} ({plan.reason})"


def offloaded(pipe: DiffusionPipeline) -> bool:
    """Whether diffusers moves the pipeline's weights itself (model or group offload): then moving the
    pipeline with .to() would undo the offload (diffusers warns and loads everything on the GPU)."""
    for module in pipe.components.values():
        if not isinstance(module, torch.nn.Module):
            continue
        if hasattr(module, "_hf_hook") or _is_group_offload_enabled(module):
            return True
    return False
