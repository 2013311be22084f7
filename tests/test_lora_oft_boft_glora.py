"""OFT, BOFT and GLoRA (lora_algorithms/oft.py, boft.py, glora.py) against lycoris-lora 4.1.3's own modules.

Each case wraps a layer of a real SD1 or SDXL shape (Linear and Conv2d) in the LyCORIS module,
randomizes its parameters, reads its state dict under LyCORIS's key names, and checks at several
multipliers that the pack's merged weight, whole (`merged_weight`) and by blocks of rows (`merge`, what
the patcher runs), equals LyCORIS's own merged weight (the one its forward uses) within 1e-6 of the
weight's largest value, and that a layer holding it gives the LyCORIS-wrapped layer's output. Files of
the older LyCORIS 2.0 OFT layout (`oft_diag`) and GLoRA's Tucker core, which lycoris-lora 4.1.3 cannot
build, are checked against the math LyCORIS writes for them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from comfyui_diffusers_adapters.converters.lora_algorithms import merge_layer as merge
from comfyui_diffusers_adapters.converters.lora_algorithms import merged_weight, weight_delta
from comfyui_diffusers_adapters.converters.lora_form import LayerPatch, LoraFormatError

lycoris = pytest.importorskip("lycoris")

MULTIPLIERS = (1.0, 0.6, -0.4)
WEIGHT_RTOL = 1e-6  # of the merged weight's largest value, fp32
# Layer shapes of the real models: SD1 attention / resnet, SDXL attention / cross-attention / resnet.
LAYERS = {
    "sd1-linear": lambda: nn.Linear(320, 320),
    "sd1-conv3x3": lambda: nn.Conv2d(320, 320, 3, padding=1),
    "sdxl-linear": lambda: nn.Linear(2048, 640),
    "sdxl-conv3x3": lambda: nn.Conv2d(640, 640, 3, padding=1),
}
KEYMAP = {
    "oft": {"oft_blocks": "blocks", "rescale": "rescale"},
    "boft": {"oft_blocks": "blocks", "rescale": "rescale"},
    "glora": {"a1.weight": "a1", "a2.weight": "a2", "b1.weight": "b1", "b2.weight": "b2"},
}


def make_layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return LAYERS[kind]()


def make_input(layer: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if isinstance(layer, nn.Linear):
        return torch.randn(2, 3, layer.in_features, generator=g)
    return torch.randn(1, layer.in_channels, 6, 6, generator=g)


def wrap(algorithm: str, layer: nn.Module, **kwargs):
    classes = {
        "oft": lycoris.modules.diag_oft.DiagOFTModule,
        "boft": lycoris.modules.boft.ButterflyOFTModule,
        "glora": lycoris.modules.glora.GLoRAModule,
    }
    module = classes[algorithm]("test", layer, multiplier=1.0, **kwargs)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # every parameter random and away from its (identity) initialisation
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if name == "rescale" else 0.05 * noise)
    module.apply_to()
    return module


def to_patch(algorithm: str, module) -> LayerPatch:
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    alpha = float(state.pop("alpha"))
    tensors = {KEYMAP[algorithm][k]: v for k, v in state.items()}  # an unknown key fails the test
    return LayerPatch(
        algorithm, tensors, alpha=alpha or None, rank=tensors["a2"].shape[0] if "a2" in tensors else None
    )


def lycoris_weight(module, multiplier: float) -> torch.Tensor:
    """The weight LyCORIS's forward applies at `multiplier` (its merged weight)."""
    return module.get_merged_weight(multiplier=multiplier)[0].detach()


def assert_weights_close(ours: torch.Tensor, ref: torch.Tensor, base: torch.Tensor, what: str) -> None:
    scale = float(ref.abs().max())
    assert float((ref - base).abs().max()) > 0.05 * scale, f"{what}: the adapter must matter"
    err = float((ours.float() - ref).abs().max())
    assert err <= WEIGHT_RTOL * scale, f"{what}: {err / scale:.2e} of the weight"


def assert_matches_lycoris(algorithm: str, kind: str, **kwargs) -> LayerPatch:
    base = make_layer(kind)
    module = wrap(algorithm, copy.deepcopy(base), **kwargs)
    patch = to_patch(algorithm, module)
    w0 = base.weight.detach()
    x = make_input(base)
    for m in MULTIPLIERS:
        module.multiplier = m
        with torch.no_grad():
            ref = lycoris_weight(module, m)
            assert_weights_close(merged_weight(w0, patch, m), ref, w0, f"{algorithm} {kind} x{m}")
            assert_weights_close(merge(w0, [(patch, m)]), ref, w0, f"{algorithm} {kind} x{m} by blocks")
            layer = copy.deepcopy(base)
            layer.weight.copy_(merged_weight(w0, patch, m))
            want = module(x)  # LyCORIS's forward: the wrapped copy of the layer
            torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    return patch


# --- OFT -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lora_dim=4),
        dict(lora_dim=4, rescaled=True),
        dict(lora_dim=8, constraint=1e-4, rescaled=True),  # the norm bound alpha · out is active
        dict(lora_dim=4, constraint=1.0),  # a bound far above the norm changes nothing
    ],
    ids=["plain", "rescaled", "constrained", "loose-constraint"],
)
def test_oft(kind, kwargs):
    patch = assert_matches_lycoris("oft", kind, **kwargs)
    assert patch.tensors["blocks"].dim() == 3
    assert ("rescale" in patch.tensors) == kwargs.get("rescaled", False)


def test_oft_constraint_is_alpha_times_out():
    """The bound is alpha · out (LyCORIS), not alpha (ComfyUI): the same blocks under alpha 1e-4 give a
    smaller rotation than without a bound, and that rotation has the norm alpha · out."""
    base = make_layer("sd1-linear")
    module = wrap("oft", copy.deepcopy(base), lora_dim=4, constraint=1e-4)
    patch = to_patch("oft", module)
    q = patch.tensors["blocks"] - patch.tensors["blocks"].transpose(1, 2)
    assert float(q.norm()) > 1e-4 * 320 > 1e-4  # active under either reading
    w0 = base.weight.detach()
    loose = LayerPatch("oft", patch.tensors, alpha=None)
    bounded = merged_weight(w0, patch) - w0
    free = merged_weight(w0, loose) - w0
    assert float(bounded.norm()) < 0.5 * float(free.norm())
    # alpha read as the bound itself would be 320 times tighter still
    tight = merged_weight(w0, LayerPatch("oft", patch.tensors, alpha=1e-4 / 320)) - w0
    assert float(tight.norm()) < 0.1 * float(bounded.norm())


def test_oft_diag_layout_of_lycoris_2():
    """LyCORIS 2.0 (late 2023) saved the rotation itself as `oft_diag` (rescale folded in) and merged
    W' = einsum("k n m, k n ... -> k m ...", m·R + (1 − m)·I, W) (lycoris/modules/diag_oft.py of
    2.0.1, make_weight): written out here as that einsum."""
    g = torch.Generator().manual_seed(3)
    w0 = make_layer("sd1-conv3x3").weight.detach()
    rotation = torch.eye(4) + 0.1 * torch.randn(80, 4, 4, generator=g)
    patch = LayerPatch("oft", {"rotation": rotation})
    for m in MULTIPLIERS:
        blend = rotation * m + (1 - m) * torch.eye(4)
        want = torch.einsum("knm,kn...->km...", blend, w0.view(80, 4, 320, 3, 3)).reshape(w0.shape)
        assert_weights_close(merged_weight(w0, patch, m), want, w0, f"oft_diag x{m}")
        assert_weights_close(merge(w0, [(patch, m)]), want, w0, f"oft_diag x{m} by blocks")


# --- BOFT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize(
    "kwargs",
    [dict(lora_dim=16), dict(lora_dim=16, rescaled=True, constraint=1e-4), dict(lora_dim=32, rescaled=True)],
    ids=["plain", "rescaled-constrained", "larger-blocks"],
)
def test_boft(kind, kwargs):
    patch = assert_matches_lycoris("boft", kind, **kwargs)
    assert patch.tensors["blocks"].dim() == 4 and patch.tensors["blocks"].shape[0] > 1  # several stages


# --- GLoRA -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize(
    "kwargs", [dict(lora_dim=4, alpha=2), dict(lora_dim=8, alpha=0)], ids=["alpha", "no-alpha"]
)
def test_glora(kind, kwargs):
    patch = assert_matches_lycoris("glora", kind, **kwargs)
    assert patch.rank == kwargs["lora_dim"]


def test_glora_tucker_core():
    """A Tucker core "bm" (b2 [r, in, 1, 1]): lycoris-lora 4.1.3's module never builds one and cannot
    load one, so the reference is its own weight function, lycoris.modules.glora._glora_weight."""
    from lycoris.modules.glora import _glora_weight

    g = torch.Generator().manual_seed(4)
    w0 = make_layer("sdxl-conv3x3").weight.detach()
    t = {
        "a1": torch.randn(640, 4, 1, 1, generator=g) * 0.05,
        "a2": torch.randn(4, 640, 1, 1, generator=g) * 0.05,
        "b1": torch.randn(640, 4, 1, 1, generator=g) * 0.05,
        "b2": torch.randn(4, 640, 1, 1, generator=g) * 0.05,
        "bm": torch.randn(4, 4, 3, 3, generator=g),
    }
    patch = LayerPatch("glora", t, alpha=2.0, rank=4)
    for m in MULTIPLIERS:
        with torch.no_grad():
            want = w0 + _glora_weight(w0, t["a1"], t["a2"], t["b1"], t["b2"], t["bm"], 2.0 / 4) * m
        assert_weights_close(merged_weight(w0, patch, m), want, w0, f"glora tucker x{m}")
        assert_weights_close(merge(w0, [(patch, m)]), want, w0, f"glora tucker x{m} by blocks")


# --- what the three have in common -----------------------------------------------------------------


def test_their_change_has_no_delta_without_a_weight():
    t = {"blocks": torch.zeros(80, 4, 4)}
    with pytest.raises(LoraFormatError, match="depends on the weight"):
        weight_delta(LayerPatch("oft", t), (320, 320))


@pytest.mark.parametrize(
    "patch, shape, match",
    [
        (LayerPatch("oft", {"blocks": torch.zeros(10, 4, 4)}), (320, 320), "rows"),
        (LayerPatch("boft", {"blocks": torch.zeros(3, 32, 10, 10)}), (330, 320), "butterfly"),
        (LayerPatch("boft", {"blocks": torch.zeros(3, 32, 9, 9)}), (288, 320), "butterfly"),
        (
            LayerPatch("oft", {"blocks": torch.zeros(80, 4, 4), "rescale": torch.ones(10)}),
            (320, 320),
            "rescale",
        ),
        (
            LayerPatch("glora", {k: torch.zeros(4, 320) for k in ("a1", "a2", "b1", "b2")}),
            (320, 320),
            "do not fit",
        ),
        (
            LayerPatch("oft", {"blocks": torch.zeros(80, 4, 4), "dora_scale": torch.ones(320, 1)}),
            (320, 320),
            "dora",
        ),
    ],
)
def test_shape_errors(patch, shape, match):
    with pytest.raises(LoraFormatError, match=match):
        merged_weight(torch.zeros(shape), patch)


def test_kohya_oft_files():
    """Kohya sd-scripts' networks.oft: `oft_unet_<module>` keys, `oft_blocks` [dim, out/dim, out/dim] and
    `alpha` (the constraint, bound alpha · out). Its merge_to, written out: R = block_diag(m·R_k +
    (1 − m)·I) from the Cayley blocks, W' = einsum("oi, op -> pi", W, R)."""
    from lora_fixtures import pipeline_targets

    from comfyui_diffusers_adapters.converters.lora_keys import parse_lora
    from testlib import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w0 = pipe.unet.get_submodule(path).weight.detach()
    out = w0.shape[0]
    g = torch.Generator().manual_seed(7)
    blocks = torch.randn(4, out // 4, out // 4, generator=g) * 0.1
    stem = "oft_unet_" + path.replace(".", "_")
    lora = parse_lora(
        {f"{stem}.oft_blocks": blocks, f"{stem}.alpha": torch.tensor(0.05)}, pipeline_targets(pipe)
    )
    assert lora.unmatched == () and lora.format == "kohya"
    patch = lora.patches["unet"][path]
    assert patch.algorithm == "oft"
    for m in MULTIPLIERS:
        q = blocks - blocks.transpose(1, 2)  # Kohya's get_weight, with its clamp of the norm
        norm = torch.norm(q.flatten())
        q = q * ((torch.clamp(norm, max=0.05 * out) + 1e-8) / (norm + 1e-8))
        eye = torch.eye(out // 4).expand(4, -1, -1)
        r = torch.matmul(eye + q, (eye - q).inverse())
        big = torch.block_diag(*(m * r + (1 - m) * eye))
        want = torch.einsum("oi, op -> pi", w0, big)
        assert_weights_close(merged_weight(w0, patch, m), want, w0, f"kohya oft x{m}")
