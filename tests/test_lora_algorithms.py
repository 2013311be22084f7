"""converters/lora_algorithms against an independent reference: lycoris-lora 4.1.3's own modules.

Each case wraps a small layer in a LyCORIS module (LoCon, LoHa, LoKr, full, norm, DoRA), fills every
parameter with random values, reads the module's state dict under its real key names, turns it into a
`LayerPatch`, and checks that a copy of the layer with `merged_weight(...)` assigned gives the same
output as the LyCORIS-wrapped layer's forward at several multipliers. (LyCORIS's get_diff_weight() is
not reliable for every algorithm, measured with lycoris-lora 4.1.3; its forward pass is.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from comfyui_diffusers_adapters.converters.lora_algorithms import (
    bias_delta,
    merged_weight,
    scale,
    weight_delta,
)
from comfyui_diffusers_adapters.converters.lora_form import LayerPatch, LoraFormatError

MULTIPLIERS = (1.0, 0.5, -0.7)

# LyCORIS state-dict key -> canonical tensor name, per algorithm.
KEYMAP = {
    "lora": {"lora_up.weight": "up", "lora_down.weight": "down", "lora_mid.weight": "mid"},
    "loha": {
        "hada_w1_a": "w1a",
        "hada_w1_b": "w1b",
        "hada_w2_a": "w2a",
        "hada_w2_b": "w2b",
        "hada_t1": "t1",
        "hada_t2": "t2",
    },
    "lokr": {
        "lokr_w1": "w1",
        "lokr_w1_a": "w1a",
        "lokr_w1_b": "w1b",
        "lokr_w2": "w2",
        "lokr_w2_a": "w2a",
        "lokr_w2_b": "w2b",
        "lokr_t2": "t2",
    },
    "full": {"diff": "diff", "diff_b": "diff_b"},
    "norm": {"w_norm": "w_norm", "b_norm": "b_norm"},
}
RANK_OF = {"lora": ("down", 0), "loha": ("w1b", 0), "lokr": ("w1b", 0)}


def lycoris_to_patch(algorithm: str, state: dict[str, torch.Tensor]) -> LayerPatch:
    """What a converter does with one LyCORIS layer: rename keys, read alpha, rank and the DoRA axis."""
    state = dict(state)
    alpha = state.pop("alpha", None)
    tensors = {}
    dora_axis = 1
    for key, value in state.items():
        if key == "dora_scale":
            # [out, 1, ...]: norm over axis 1 (wd_on_out, the default); [1, in, ...]: over axis 0
            dora_axis = 0 if value.shape[0] == 1 and value.shape[1] > 1 else 1
            tensors["dora_scale"] = value
        else:
            tensors[KEYMAP[algorithm][key]] = value  # an unknown key fails the test
    rank = None
    if algorithm in RANK_OF:
        name, axis = RANK_OF[algorithm]
        if name not in tensors and algorithm == "lokr":
            name = "w2b"
        if name in tensors:
            rank = tensors[name].shape[axis]
    return LayerPatch(
        algorithm, tensors, alpha=None if alpha is None else float(alpha), rank=rank, dora_axis=dora_axis
    )


# --- layers and inputs -------------------------------------------------------------------------------


def make_layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    layers = {
        "linear": lambda: nn.Linear(16, 24),
        "conv3x3": lambda: nn.Conv2d(8, 12, 3, padding=1),
        "conv1x1": lambda: nn.Conv2d(8, 12, 1),
        "layernorm": lambda: nn.LayerNorm(16),
        "groupnorm": lambda: nn.GroupNorm(4, 12),
    }
    layer = layers[kind]()
    with torch.no_grad():  # norms start at weight 1, bias 0: make them non-trivial too
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return layer


def make_input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind in ("linear", "layernorm"):
        return torch.randn(3, 5, 16, generator=g)
    channels = 12 if kind == "groupnorm" else 8
    return torch.randn(2, channels, 6, 6, generator=g)


def randomize(module: nn.Module, std: float) -> None:
    """All LyCORIS parameters random and non-zero (up weights are zero-initialised)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "dora_scale":
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g))  # a magnitude away from the base norm
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def wrap(algorithm: str, layer: nn.Module, std: float, **kwargs):
    """The LyCORIS module of `algorithm` applied to `layer`, randomized; returns (module, state dict)."""
    lycoris = pytest.importorskip("lycoris")
    classes = {
        "lora": lycoris.LoConModule,
        "loha": lycoris.LohaModule,
        "lokr": lycoris.LokrModule,
        "full": lycoris.FullModule,
        "norm": lycoris.NormModule,
    }
    module = classes[algorithm]("test", layer, multiplier=1.0, **kwargs)
    if algorithm == "full":
        module.apply_to()  # folds the original into module.weight; the state dict holds weight - original
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            module.weight.add_(torch.randn(module.weight.shape, generator=g) * std)
            if module.bias is not None:
                module.bias.add_(torch.randn(module.bias.shape, generator=g) * std)
    else:
        randomize(module, std)
        module.apply_to()
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return module, state


def patched_copy(base: nn.Module, patch: LayerPatch, strength: float) -> nn.Module:
    layer = copy.deepcopy(base)
    with torch.no_grad():
        layer.weight.copy_(merged_weight(base.weight, patch, strength))
        bias = bias_delta(patch)
        if bias is not None:
            layer.bias.add_(strength * bias)
    return layer


def assert_matches_lycoris(algorithm: str, kind: str, std: float = 0.5, expect=None, **kwargs) -> LayerPatch:
    base = make_layer(kind)
    wrapped_layer = copy.deepcopy(base)
    module, state = wrap(algorithm, wrapped_layer, std, **kwargs)
    if expect is not None:
        assert set(state) == set(expect), sorted(state)
    patch = lycoris_to_patch(algorithm, state)
    x = make_input(kind)
    with torch.no_grad():
        base_out = base(x)
        for m in MULTIPLIERS:
            module.multiplier = m
            ref = wrapped_layer(x)
            ours = patched_copy(base, patch, m)(x)
            scale = ref.abs().max().item()
            # the adapter must matter, or the comparison proves nothing
            assert (ref - base_out).abs().max().item() > 0.05 * scale, (algorithm, kind, m)
            torch.testing.assert_close(
                ours, ref, rtol=1e-5, atol=1e-5 * scale, msg=f"{algorithm} {kind} x{m}"
            )
    return patch


# --- LoCon / LoRA ------------------------------------------------------------------------------------

LORA_KEYS = {"lora_up.weight", "lora_down.weight", "alpha"}


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1x1"])
@pytest.mark.parametrize("alpha", [4, 1.5, 8])
def test_locon(kind, alpha):
    patch = assert_matches_lycoris("lora", kind, lora_dim=4, alpha=alpha, expect=LORA_KEYS)
    assert scale(patch) == pytest.approx(alpha / 4)


def test_locon_tucker():
    patch = assert_matches_lycoris(
        "lora", "conv3x3", lora_dim=4, alpha=2, use_tucker=True, expect=LORA_KEYS | {"lora_mid.weight"}
    )
    assert patch.tensors["mid"].shape == (4, 4, 3, 3) and patch.tensors["down"].shape == (4, 8, 1, 1)


def test_locon_tucker_on_1x1_is_plain():
    # LyCORIS only builds a mid for kernels larger than 1x1
    assert_matches_lycoris("lora", "conv1x1", lora_dim=4, alpha=2, use_tucker=True, expect=LORA_KEYS)


def test_locon_rs_lora_and_scalar():
    # rs-LoRA stores alpha·sqrt(r) so that alpha/r in the file is its alpha/sqrt(r); use_scalar folds
    # the scalar into lora_up in the state dict
    assert_matches_lycoris("lora", "linear", lora_dim=4, alpha=2, rs_lora=True)
    assert_matches_lycoris("lora", "conv3x3", lora_dim=4, alpha=2, use_scalar=True)


def test_alpha_zero_means_rank():
    lycoris = pytest.importorskip("lycoris")
    assert lycoris.LoConModule("t", make_layer("linear"), lora_dim=4, alpha=0).scale == 1.0
    up, down = torch.randn(24, 4), torch.randn(4, 16)
    for alpha in (0, None, 4):
        delta = weight_delta(LayerPatch("lora", {"up": up, "down": down}, alpha=alpha, rank=4), (24, 16))
        torch.testing.assert_close(delta, up @ down)


def test_alpha_scales_delta_linearly():
    g = torch.Generator().manual_seed(0)
    tensors = {"up": torch.randn(24, 4, generator=g), "down": torch.randn(4, 16, generator=g)}
    d2 = weight_delta(LayerPatch("lora", tensors, alpha=2, rank=4), (24, 16))
    d8 = weight_delta(LayerPatch("lora", tensors, alpha=8, rank=4), (24, 16))
    torch.testing.assert_close(d8, 4 * d2)
    torch.testing.assert_close(d2, tensors["up"] @ tensors["down"] / 2)


# --- LoHa --------------------------------------------------------------------------------------------

LOHA_KEYS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1x1"])
@pytest.mark.parametrize("alpha", [4, 2])
def test_loha(kind, alpha):
    assert_matches_lycoris("loha", kind, lora_dim=4, alpha=alpha, expect=LOHA_KEYS)


def test_loha_tucker():
    patch = assert_matches_lycoris(
        "loha", "conv3x3", lora_dim=4, alpha=3, use_tucker=True, expect=LOHA_KEYS | {"hada_t1", "hada_t2"}
    )
    assert patch.tensors["t1"].shape == (4, 4, 3, 3) and patch.tensors["w1a"].shape == (4, 12)


# --- LoKr --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, kwargs, keys",
    [
        # 24x16 -> (4, 6) x (4, 4); rank 2 < 6/2: w1 full, w2 = w2a @ w2b
        ("linear", dict(lora_dim=2, alpha=1), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
        # decompose_both with rank 1 < 4/2: both halves factored
        (
            "linear",
            dict(lora_dim=1, alpha=3, decompose_both=True),
            {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"},
        ),
        # unbalanced: w1 (6, 4) factored, w2 (4, 4) full; the scale still applies
        (
            "linear",
            dict(lora_dim=2, alpha=1, decompose_both=True, unbalanced_factorization=True),
            {"lokr_w1_a", "lokr_w1_b", "lokr_w2"},
        ),
        # rank too large for the factors: LyCORIS falls back to full w1 and w2 and ignores alpha
        ("linear", dict(lora_dim=4, alpha=1), {"lokr_w1", "lokr_w2"}),
        ("linear", dict(lora_dim=2, alpha=1, full_matrix=True), {"lokr_w1", "lokr_w2"}),
        # conv 12x8 with factor 2 -> (2, 6) x (2, 4): w2a [6, r] @ w2b [r, 4*k*k]
        ("conv3x3", dict(lora_dim=2, alpha=1, factor=2), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
        (
            "conv3x3",
            dict(lora_dim=2, alpha=1, factor=2, use_tucker=True),
            {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
        ),
        ("conv3x3", dict(lora_dim=4, alpha=1, factor=2, full_matrix=True), {"lokr_w1", "lokr_w2"}),
        ("conv1x1", dict(lora_dim=2, alpha=1, factor=2), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ],
)
def test_lokr(kind, kwargs, keys):
    assert_matches_lycoris("lokr", kind, expect=keys | {"alpha"}, **kwargs)


def test_lokr_full_matrix_ignores_alpha():
    lycoris = pytest.importorskip("lycoris")
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(4, 4, generator=g), torch.randn(6, 4, generator=g)
    base = make_layer("linear")
    wrapped = copy.deepcopy(base)
    # LyCORIS's own file loader, given a stored alpha of 7 with full matrices
    with torch.no_grad():
        module = lycoris.LokrModule.make_module_from_state_dict(
            "t", wrapped, w1, None, None, w2, None, None, None, None, torch.tensor(7.0), None
        )
    module.apply_to()
    patch = LayerPatch("lokr", {"w1": w1, "w2": w2}, alpha=7.0, rank=None)
    torch.testing.assert_close(weight_delta(patch, (24, 16)), torch.kron(w1, w2))
    assert scale(patch) == 1.0  # one definition of the scale: a full-matrix LoKr ignores alpha
    x = make_input("linear")
    with torch.no_grad():
        torch.testing.assert_close(patched_copy(base, patch, 1.0)(x), wrapped(x), rtol=1e-5, atol=1e-5)


# --- full and norm -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_full(kind):
    patch = assert_matches_lycoris("full", kind, std=0.2, expect={"diff", "diff_b"})
    assert bias_delta(patch) is not None


def test_full_without_bias():
    diff = torch.randn(24, 16)
    patch = LayerPatch("full", {"diff": diff})
    assert bias_delta(patch) is None
    torch.testing.assert_close(weight_delta(patch, (24, 16)), diff)


@pytest.mark.parametrize("kind", ["layernorm", "groupnorm"])
def test_norm(kind):
    patch = assert_matches_lycoris("norm", kind, std=0.3, expect={"w_norm", "b_norm"})
    assert bias_delta(patch).shape == patch.tensors["b_norm"].shape


# --- DoRA (weight_decompose) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "algorithm, kind, kwargs",
    [
        ("lora", "linear", dict(lora_dim=4, alpha=2)),
        ("lora", "conv3x3", dict(lora_dim=4, alpha=2)),
        ("lora", "conv3x3", dict(lora_dim=4, alpha=2, use_tucker=True)),
        ("loha", "linear", dict(lora_dim=4, alpha=2)),
        ("loha", "conv3x3", dict(lora_dim=4, alpha=4, use_tucker=True)),
        ("lokr", "linear", dict(lora_dim=2, alpha=1)),
    ],
)
@pytest.mark.parametrize("wd_on_out", [True, False])
def test_dora(algorithm, kind, kwargs, wd_on_out):
    patch = assert_matches_lycoris(algorithm, kind, weight_decompose=True, wd_on_out=wd_on_out, **kwargs)
    assert patch.dora_axis == (1 if wd_on_out else 0)


def test_dora_strength_zero_keeps_direction():
    # LyCORIS blends only the magnitude: strength 0 gives W + ΔW, not W
    g = torch.Generator().manual_seed(0)
    base = torch.randn(24, 16, generator=g)
    tensors = {"up": torch.randn(24, 4, generator=g), "down": torch.randn(4, 16, generator=g)}
    plain = LayerPatch("lora", tensors, alpha=4, rank=4)
    dora = LayerPatch("lora", {**tensors, "dora_scale": torch.rand(24, 1, generator=g) + 1}, alpha=4, rank=4)
    torch.testing.assert_close(merged_weight(base, dora, 0.0), merged_weight(base, plain, 1.0))


# --- dtypes, devices, bias -----------------------------------------------------------------------------


def test_float32_from_half_inputs():
    g = torch.Generator().manual_seed(0)
    tensors = {"up": torch.randn(24, 4, generator=g), "down": torch.randn(4, 16, generator=g)}
    base = torch.randn(24, 16, generator=g)
    half = LayerPatch("lora", {k: v.half() for k, v in tensors.items()}, alpha=2, rank=4)
    out = merged_weight(base.half(), half, 0.5)
    assert out.dtype == torch.float32 and weight_delta(half, (24, 16)).dtype == torch.float32
    expected = base.half().float() + 0.25 * (tensors["up"].half().float() @ tensors["down"].half().float())
    torch.testing.assert_close(out, expected)


def test_lora_bias_delta_is_unscaled():
    bias = torch.randn(24)
    patch = LayerPatch(
        "lora", {"up": torch.randn(24, 4), "down": torch.randn(4, 16), "bias": bias}, alpha=1, rank=4
    )
    torch.testing.assert_close(bias_delta(patch), bias)
    assert bias_delta(LayerPatch("lora", {"up": torch.randn(24, 4), "down": torch.randn(4, 16)})) is None


def test_2d_lora_on_1x1_conv_and_4d_on_linear():
    up, down = torch.randn(12, 4), torch.randn(4, 8)
    as_conv = weight_delta(LayerPatch("lora", {"up": up, "down": down}), (12, 8, 1, 1))
    as_linear = weight_delta(
        LayerPatch("lora", {"up": up[..., None, None], "down": down[..., None, None]}), (12, 8)
    )
    torch.testing.assert_close(as_conv.reshape(12, 8), as_linear)


# --- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "patch, shape, match",
    [
        (
            LayerPatch("lora", {"up": torch.randn(24, 4), "down": torch.randn(3, 16)}),
            (24, 16),
            "ranks differ",
        ),
        (
            LayerPatch("lora", {"up": torch.randn(24, 4), "down": torch.randn(4, 16)}),
            (16, 24),
            "layer's weight",
        ),
        (
            LayerPatch("lora", {"up": torch.randn(24, 4), "down": torch.randn(4, 16)}),
            (24, 8),
            "layer's weight",
        ),
        (
            LayerPatch("lora", {"up": torch.randn(24, 4), "down": torch.randn(4, 16)}, rank=8),
            (24, 16),
            "rank 8",
        ),
        (
            LayerPatch("lora", {"up": torch.randn(24, 4, 3, 3), "down": torch.randn(4, 16)}),
            (24, 16),
            "up must",
        ),
        (
            LayerPatch(
                "lora",
                {"up": torch.randn(12, 4), "down": torch.randn(4, 8, 1, 1), "mid": torch.randn(2, 4, 3, 3)},
            ),
            (12, 8, 3, 3),
            "mid",
        ),
        (LayerPatch("lora", {"up": torch.randn(24, 4)}), (24, 16), "lacks down"),
        (
            LayerPatch(
                "loha",
                {
                    "w1a": torch.randn(24, 4),
                    "w1b": torch.randn(4, 16),
                    "w2a": torch.randn(24, 4),
                    "w2b": torch.randn(4, 8),
                },
            ),
            (24, 16),
            "products? .* differ|w2 product",
        ),
        (
            LayerPatch(
                "loha",
                {
                    "w1a": torch.randn(4, 12),
                    "w1b": torch.randn(4, 8),
                    "w2a": torch.randn(4, 12),
                    "w2b": torch.randn(4, 8),
                    "t1": torch.randn(4, 4, 3, 3),
                },
            ),
            (12, 8, 3, 3),
            "t1 and t2",
        ),
        (
            LayerPatch("lokr", {"w1": torch.randn(4, 4), "w1a": torch.randn(4, 1), "w2": torch.randn(6, 4)}),
            (24, 16),
            "either w1",
        ),
        (LayerPatch("lokr", {"w1": torch.randn(4, 4), "w2": torch.randn(6, 5)}), (24, 16), "layer's weight"),
        (
            LayerPatch(
                "lokr",
                {
                    "w1a": torch.randn(4, 1),
                    "w1b": torch.randn(1, 4),
                    "w2a": torch.randn(6, 2),
                    "w2b": torch.randn(2, 4),
                },
            ),
            (24, 16),
            "different ranks",
        ),
        (LayerPatch("full", {"diff": torch.randn(24, 15)}), (24, 16), "layer's weight"),
        (LayerPatch("norm", {"w_norm": torch.randn(12)}), (16,), "layer's weight"),
        (LayerPatch("ia3", {"x": torch.randn(1)}), (24, 16), "unknown LoRA algorithm"),
    ],
)
def test_shape_errors(patch, shape, match):
    with pytest.raises(LoraFormatError, match=match):
        weight_delta(patch, shape)


def test_dora_errors():
    tensors = {"up": torch.randn(24, 4), "down": torch.randn(4, 16)}
    base = torch.randn(24, 16)
    with pytest.raises(LoraFormatError, match="dora_scale"):
        merged_weight(base, LayerPatch("lora", {**tensors, "dora_scale": torch.rand(16, 1)}), 1.0)
    with pytest.raises(LoraFormatError, match="dora_scale"):  # [1, 24] is per input column, not dora_axis=1
        merged_weight(base, LayerPatch("lora", {**tensors, "dora_scale": torch.rand(1, 24)}), 1.0)
    with pytest.raises(LoraFormatError, match="dora_axis"):
        merged_weight(
            base, LayerPatch("lora", {**tensors, "dora_scale": torch.rand(24, 1)}, dora_axis=2), 1.0
        )


def test_two_bias_deltas_is_an_error():
    patch = LayerPatch(
        "full", {"diff": torch.randn(24, 16), "diff_b": torch.randn(24), "bias": torch.randn(24)}
    )
    with pytest.raises(LoraFormatError, match="two bias"):
        bias_delta(patch)


# --- the merge by blocks (merge.py) ------------------------------------------------------------------


def _examples() -> dict[str, tuple[LayerPatch, tuple[int, ...]]]:
    """One patch of every algorithm (DoRA on both axes too) for a conv 3x3 or its norm layer."""
    g = torch.Generator().manual_seed(5)

    def r(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    conv = (24, 16, 3, 3)
    return {
        "lora": (LayerPatch("lora", {"up": r(24, 4, 1, 1), "down": r(4, 16, 3, 3)}, alpha=2), conv),
        "lora-tucker": (
            LayerPatch("lora", {"up": r(24, 4, 1, 1), "down": r(4, 16, 1, 1), "mid": r(4, 4, 3, 3)}, alpha=2),
            conv,
        ),
        "loha": (
            LayerPatch("loha", {"w1a": r(24, 4), "w1b": r(4, 144), "w2a": r(24, 4), "w2b": r(4, 144)}),
            conv,
        ),
        "lokr": (LayerPatch("lokr", {"w1": r(4, 4), "w2a": r(6, 2), "w2b": r(2, 36)}, alpha=1), conv),
        "full": (LayerPatch("full", {"diff": r(*conv, std=0.01).half()}), conv),
        "norm": (LayerPatch("norm", {"w_norm": r(24)}), (24,)),
        "dora": (
            LayerPatch(
                "lora", {"up": r(24, 4, 1, 1), "down": r(4, 16, 3, 3), "dora_scale": r(24, 1, 1, 1) + 2}
            ),
            conv,
        ),
        "dora-input-axis": (
            LayerPatch(
                "loha",
                {
                    "w1a": r(24, 4),
                    "w1b": r(4, 144),
                    "w2a": r(24, 4),
                    "w2b": r(4, 144),
                    "dora_scale": r(1, 16, 1, 1) + 2,
                },
                dora_axis=0,
            ),
            conv,
        ),
        "oft": (LayerPatch("oft", {"blocks": r(6, 4, 4), "rescale": r(24, 1, 1, 1) + 1}), conv),
        "boft": (LayerPatch("boft", {"blocks": r(2, 6, 4, 4)}), conv),
        "glora": (
            LayerPatch(
                "glora",
                {"a1": r(16, 4, 1, 1), "a2": r(4, 16, 1, 1), "b1": r(24, 4, 1, 1), "b2": r(4, 16, 3, 3)},
            ),
            conv,
        ),
    }


@pytest.mark.parametrize("name", list(_examples()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_by_blocks_is_the_whole_merge_rounded_once(name, dtype, monkeypatch):
    """merge_layer() (blocks of rows, the result written once in the weight's dtype) against
    merged_weight (the whole float32 weight): the same to float32 rounding, then one rounding to the
    dtype; the same bits whether it writes into new memory or into a tensor it had (the patcher's exact
    rollback rests on that); stacked patches apply in order."""
    from comfyui_diffusers_adapters.converters.lora_algorithms import merge as merge_module
    from comfyui_diffusers_adapters.converters.lora_algorithms.merge import merge_layer as merge

    patch, shape = _examples()[name]
    base = torch.randn(shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    other, _ = _examples()["loha" if len(shape) > 1 else "norm"]
    for patches in ([(patch, 0.7)], [(other, -0.4), (patch, 0.7)]):
        want = base.float()
        for p, s in patches:
            want = merged_weight(want, p, s)
        fresh = merge(base, patches)
        assert fresh.dtype == dtype
        _assert_rounded_once(fresh, want, name)
        into = torch.full_like(base, 7.0)
        assert torch.equal(merge(base, patches, out=into), fresh) and torch.equal(into, fresh)
        assert torch.equal(merge(base, patches), fresh)
        # blocks of a few rows (the groups of OFT, BOFT, LoKr kept whole): the same merge
        monkeypatch.setattr(merge_module, "_BLOCK_ELEMENTS", 64)
        _assert_rounded_once(merge(base, patches), want, name)
        monkeypatch.undo()


def _assert_rounded_once(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # at most one unit in the last place of the dtype off the float32 result, rounded once
        ulp = (want.abs() * torch.finfo(got.dtype).eps).clamp(min=torch.finfo(got.dtype).tiny)
        assert bool(((got.float() - want).abs() <= ulp).all()), name
