"""ComfyUI sampler and scheduler names mapped to diffusers schedulers.

The mapping follows diffusers' own table of A1111/k-diffusion equivalents
(docs: "Schedulers" → "Mapping A1111/k-diffusion samplers to diffusers").
"""

from __future__ import annotations

import inspect

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# The noise schedule every SD1.x, SD2.x and SDXL base model was trained with.
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "set_alpha_to_one": False,
}

# ComfyUI sampler name → (diffusers class, extra config)
SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm_2": (KDPM2DiscreteScheduler, {}),
    "dpm_2_ancestral": (KDPM2AncestralDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_sde": (DPMSolverSinglestepScheduler, {"algorithm_type": "dpmsolver++"}),
    "ddim": (DDIMScheduler, {}),
    "uni_pc": (UniPCMultistepScheduler, {}),
}
SCHEDULES = ("normal", "karras")
# Flux.1 samples with diffusers' flow-matching Euler (FlowMatchEulerDiscreteScheduler), under the
# two schedules Flux workflows use (loaders/flux_sampling.py says what each is).
FLUX_SAMPLERS = ("euler",)
FLUX_SCHEDULES = ("simple", "normal")
# What the Sampler's scheduler widget offers: "simple" is Flux's (SD models refuse it).
SCHEDULE_CHOICES = (*SCHEDULES, "simple")


class SchedulerChoiceError(ValueError):
    pass


def supports_karras(sampler_name: str) -> bool:
    cls, _ = SAMPLERS[sampler_name]
    return "use_karras_sigmas" in inspect.signature(cls.__init__).parameters


def make_scheduler(sampler_name: str, schedule: str, base_config: dict) -> SchedulerMixin:
    """A fresh scheduler for one run; `base_config` is the pipeline's own scheduler config."""
    if sampler_name not in SAMPLERS:
        raise SchedulerChoiceError(f"Unknown sampler {sampler_name!r}; choose one of {', '.join(SAMPLERS)}.")
    if schedule not in SCHEDULES:
        flux_only = " ('simple' is for Flux models here)" if schedule in FLUX_SCHEDULES else ""
        raise SchedulerChoiceError(
            f"Unknown scheduler {schedule!r}{flux_only}; choose one of {', '.join(SCHEDULES)}."
        )
    cls, extra = SAMPLERS[sampler_name]
    # Private keys such as `_use_default_values` would make from_config drop our settings.
    config = {k: v for k, v in base_config.items() if not k.startswith("_")} | extra
    if schedule == "karras":
        if not supports_karras(sampler_name):
            raise SchedulerChoiceError(
                f"The karras schedule is not available for {sampler_name}; use 'normal' or another sampler."
            )
        config["use_karras_sigmas"] = True
    else:
        config["use_karras_sigmas"] = False
    return cls.from_config(config)


def default_scheduler(family: str, prediction: str) -> SchedulerMixin:
    """The scheduler a single-file pipeline starts with (diffusers' defaults for each family)."""
    cls = EulerDiscreteScheduler if family == "sdxl" else PNDMScheduler
    extra = {"skip_prk_steps": True} if cls is PNDMScheduler else {}
    return cls.from_config({**SD_SCHEDULE, **extra, "prediction_type": prediction})


def check_flux_choice(sampler_name: str, schedule: str) -> None:
    """Refuse a sampler or schedule that Flux sampling does not have, naming what it has."""
    if sampler_name not in FLUX_SAMPLERS or schedule not in FLUX_SCHEDULES:
        raise SchedulerChoiceError(
            f"Flux models sample with sampler_name {' or '.join(FLUX_SAMPLERS)} and scheduler "
            f"{' or '.join(FLUX_SCHEDULES)} (diffusers' flow-matching Euler); got {sampler_name!r} with "
            f"{schedule!r}."
        )
