"""The denoised estimate (x0) of each sampling step, for previews.

ComfyUI's samplers preview x0, the image the model currently predicts, not the noisy latent: mid-run
the noisy latent is mostly noise where x0 already shows the picture. diffusers' step callbacks get
only the noisy latent, so the run's own scheduler is wrapped to keep the x0 of its latest step.
Keeping a reference costs nothing: the tensor is read only when a preview is drawn.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin


class DenoisedEstimate:
    """Wraps `scheduler.step` (a scheduler made for one run) to keep its latest x0 in `latest`."""

    def __init__(self, scheduler: SchedulerMixin) -> None:
        self.latest: torch.Tensor | None = None
        step = scheduler.step

        def tracked(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args, **kwargs):
            out = step(model_output, timestep, sample, *args, **kwargs)
            self.latest = denoised(scheduler, out, model_output, sample)
            return out

        scheduler.step = tracked

    def or_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The latest x0, or `latents` when the scheduler gives none."""
        return latents if self.latest is None else self.latest


def denoised(scheduler: SchedulerMixin, out: Any, model_output: torch.Tensor, sample: torch.Tensor):
    """x0 after one `scheduler.step` that returned `out`, or None when it cannot be had."""
    # Euler, Euler ancestral, Heun, DPM2, LMS, DDIM, DPM-SDE return it beside the next sample.
    x0 = out[1] if isinstance(out, tuple) and len(out) > 1 else getattr(out, "pred_original_sample", None)
    if x0 is not None:
        return x0
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        # Flow matching: sample = (1 - sigma) x0 + sigma noise and the model predicts noise - x0.
        sigma = scheduler.sigmas[scheduler.step_index - 1]
        return sample - sigma.to(sample.device, sample.dtype) * model_output
    # DPM-Solver++ (multistep, singlestep) and UniPC keep their x0 predictions.
    outputs = getattr(scheduler, "model_outputs", None)
    return outputs[-1] if outputs and outputs[-1] is not None else None
