"""How the embeddings of several reference images (or faces) are combined before an IP-Adapter's image
projection: ComfyUI_IPAdapter_plus's `combine_embeds` (IPAdapterPlus.py, `ipadapter_execute`)."""

from __future__ import annotations

import torch

COMBINE_EMBEDS = ("concat", "add", "subtract", "average", "norm average")


def combine_embeds(
    positive: torch.Tensor, negative: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) embeddings [1, n_images, ...] combined over the images axis (dim 1) as
    ComfyUI_IPAdapter_plus does: "concat" keeps every image's tokens side by side (diffusers' way);
    "add" sums, "subtract" takes the first minus the mean of the others, "average" the mean, "norm
    average" the mean after dividing by the norm over the images axis. The negative becomes the first
    image's negative, [1, 1, ...] like the positive. One image, or "concat": returned as given."""
    if mode not in COMBINE_EMBEDS:
        raise ValueError(f"combine_embeds must be one of {', '.join(COMBINE_EMBEDS)}, not {mode!r}.")
    if mode == "concat" or positive.shape[1] < 2:
        return positive, negative
    if mode == "add":
        combined = torch.sum(positive, dim=1)
    elif mode == "subtract":
        combined = positive[:, 0] - torch.mean(positive[:, 1:], dim=1)
    elif mode == "average":
        combined = torch.mean(positive, dim=1)
    else:
        # ComfyUI_IPAdapter_plus's definition: the norm is taken across the images, per feature (not
        # per image embedding), then the normalised embeddings are averaged.
        combined = torch.mean(positive / torch.norm(positive, dim=1, keepdim=True), dim=1)
    return combined.unsqueeze(1), negative[:, :1]
