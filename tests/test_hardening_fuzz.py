"""Fuzzing the converters with hypothesis: random keys, shapes, dtypes and metadata never raise
anything but the pack's own error of each converter, and a parsed LoRA either applies or fails
with that error and leaves the pipeline bit-exactly as it was."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from ip_adapter_lib import ip_adapter_nested
from lora_fixtures import fresh_handle, pipeline_targets

from comfyui_diffusers_adapters.converters import checkpoint_layout
from comfyui_diffusers_adapters.converters.checkpoint_layout import CheckpointFormatError
from comfyui_diffusers_adapters.converters.embeddings import Embedding, EmbeddingFormatError, parse_embedding
from comfyui_diffusers_adapters.converters.ip_adapter_files import (
    IPAdapterFormatError,
    check_unet,
    parse_ip_adapter,
    state_dict_for_diffusers,
)
from comfyui_diffusers_adapters.converters.lora_form import LoraFile, LoraFormatError
from comfyui_diffusers_adapters.converters.lora_keys import parse_lora
from comfyui_diffusers_adapters.converters.training_metadata import summarize
from comfyui_diffusers_adapters.loaders.lora_files import describe
from comfyui_diffusers_adapters.loaders.lora_patcher import LoraSpec
from comfyui_diffusers_adapters.loaders.pipeline_handle import materialized
from testlib import ldm_state_dict, tiny_pipeline

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
junk = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.0123456789", max_size=12)


def tensor_of(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.1
    return values.to(dtype)


@st.composite
def shapes(draw, near: tuple[int, ...] = ()) -> tuple[int, ...]:
    """0-dim, zero-size, random, or built from a module's own dimensions (so many of them fit)."""
    dims = list(near) + [0, 1, 2, 4, 8]
    shape = tuple(draw(st.lists(st.sampled_from(dims), min_size=0, max_size=4)))
    numel = 1
    for d in shape:
        numel *= d
    return shape if numel <= 2**18 else tuple(min(d, 8) for d in shape)  # no huge tensors


@st.composite
def tensors(draw, near: tuple[int, ...] = ()) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES)) if draw(st.integers(0, 3)) == 0 else torch.float32
    return tensor_of(draw(shapes(near)), dtype, draw(st.integers(0, 2**16)))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 64) | st.floats(allow_nan=True) | junk,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(junk, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def metadata(draw) -> dict[str, str]:
    keys = [
        "lora_adapter_metadata",
        "ss_tag_frequency",
        "ss_dataset_dirs",
        "ss_output_name",
        "modelspec.title",
    ]
    out = {}
    for key in draw(st.lists(st.sampled_from(keys) | junk, max_size=4)):
        if draw(st.booleans()):
            out[key] = json.dumps(draw(json_values))
        elif key == "lora_adapter_metadata" and draw(st.booleans()):
            config = {
                draw(
                    st.sampled_from(
                        [
                            "lora_alpha",
                            "unet.lora_alpha",
                            "alpha_pattern",
                            "unet.alpha_pattern",
                            "use_rslora",
                            "r",
                        ]
                    )
                ): draw(
                    json_values
                    | st.dictionaries(
                        st.sampled_from(["to_q", "(", "[a-", "attn1.to_k", "*"]), json_values, max_size=2
                    )
                )
                for _ in range(draw(st.integers(1, 3)))
            }
            out[key] = json.dumps(config)
        else:
            out[key] = draw(st.text(max_size=20))
    return out


# ------------------------------------------------------------------ LoRA keys
_TARGETS = None


def targets() -> dict:
    global _TARGETS
    if _TARGETS is None:
        _TARGETS = pipeline_targets(tiny_pipeline("sd1"))
    return _TARGETS


LORA_SUFFIXES = [
    ".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".alpha", ".dora_scale",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
    ".diff", ".diff_b", ".w_norm", ".b_norm",
    ".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_magnitude_vector",
    ".lora.down.weight", ".lora.up.weight", "_lora.down.weight", "_lora.up.weight",
    ".oft_blocks", ".on_input", ".weight", "",
]  # fmt: skip


@st.composite
def lora_entries(draw) -> tuple[str, torch.Tensor]:
    part = draw(st.sampled_from(["unet", "text_encoder"]))
    path, weight_shape = draw(st.sampled_from(sorted(targets()[part].items())))
    style = draw(st.sampled_from(["kohya", "dotted", "peft", "old", "junk", "bundle"]))
    if style == "kohya":
        prefix = {
            "unet": "lora_unet_",
            "text_encoder": draw(st.sampled_from(["lora_te_", "lora_te_text_model_", "lora_te1_"])),
        }[part]
        stem = prefix + path.replace(".", "_")
    elif style in ("dotted", "peft"):
        stem = (
            draw(st.sampled_from([f"{part}.", "", "base_model.model.", f"{part}.base_model.model."])) + path
        )
    elif style == "old":
        stem = f"{part}.{path.rsplit('.', 1)[0]}.processor.to_q"
    elif style == "bundle":
        stem = "bundle_emb." + draw(st.sampled_from(["tok", "", "a.b"]))
    else:
        stem = draw(junk)
    suffix = draw(st.sampled_from(LORA_SUFFIXES) | junk)
    if draw(st.integers(0, 9)) == 0:
        stem += draw(junk)
    rank = draw(st.sampled_from([1, 2, 4]))
    near = tuple(weight_shape) + (rank,)
    return stem + suffix, draw(tensors(near))


@st.composite
def lora_state_dicts(draw) -> dict[str, torch.Tensor]:
    """Mostly whole layers (up + down + alpha of one module) plus random extra entries."""
    sd: dict[str, torch.Tensor] = {}
    for _ in range(draw(st.integers(0, 4))):
        part = draw(st.sampled_from(["unet", "text_encoder"]))
        path, shape = draw(st.sampled_from(sorted(targets()[part].items())))
        prefix = "lora_unet_" if part == "unet" else "lora_te_"
        stem = prefix + path.replace(".", "_")
        rank = draw(st.sampled_from([1, 2]))
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        if len(shape) >= 2:
            down = (rank, *shape[1:]) if len(shape) == 4 else (rank, fan_in)
            up = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
            sd[stem + ".lora_down.weight"] = tensor_of(down, torch.float32, draw(st.integers(0, 99)))
            up_dtype = draw(st.sampled_from([torch.float32] * 4 + DTYPES))
            sd[stem + ".lora_up.weight"] = tensor_of(up, up_dtype, 1)
        odd_alpha = draw(st.integers(0, 4)) == 0
        sd[stem + ".alpha"] = (
            draw(tensors(())) if odd_alpha else torch.tensor(draw(st.sampled_from([0.0, 1.0, 8.0])))
        )
    for key, value in draw(st.lists(lora_entries(), max_size=draw(st.sampled_from([0, 0, 2, 8])))):
        sd[key] = value
    return sd


@FUZZ
@given(sd=lora_state_dicts(), meta=metadata())
def test_parse_lora_raises_only_its_own_error(sd, meta):
    try:
        lora = parse_lora(sd, targets(), meta)
    except LoraFormatError:
        return
    assert isinstance(lora, LoraFile)
    describe(lora, "fuzzed.safetensors")  # the node's info text
    for part, patches in lora.patches.items():
        for path, patch in patches.items():
            assert path in targets()[part]
            assert all(t.is_floating_point() for t in patch.tensors.values()), patch.tensors
            assert patch.alpha is None or isinstance(patch.alpha, float)


@FUZZ
@given(meta=metadata())
def test_training_metadata_summary_never_fails(meta):
    assert isinstance(summarize(meta), str)


_counter = itertools.count()


@pytest.fixture(scope="module")
def handle():
    return fresh_handle()


def snapshot(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v.clone()
        for name in ("unet", "text_encoder")
        for k, v in getattr(pipe, name).state_dict().items()
    }


def assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(sd=lora_state_dicts(), strength=st.sampled_from([1.0, -0.5, 0.0, 2.0]))
def test_a_parsed_lora_applies_or_fails_cleanly(handle, sd, strength):
    try:
        lora = parse_lora(sd, targets())
    except LoraFormatError:
        return
    before = snapshot(handle.base.pipe)
    spec = LoraSpec(
        ("fuzz", next(_counter)), lora, {"unet": strength, "text_encoder": strength}, lambda p, m: 1.0
    )
    event(f"layers: {min(sum(map(len, lora.patches.values())), 3)}")
    try:
        with materialized(handle.with_adapter(spec)) as pipe:
            for name in ("unet", "text_encoder"):
                for v in getattr(pipe, name).state_dict().values():
                    assert v.dtype == torch.float32
    except LoraFormatError:
        event("refused when applied")
        assert_same(before, snapshot(handle.base.pipe))
        return
    with materialized(handle):  # removal is exact
        pass
    assert_same(before, snapshot(handle.base.pipe))


# ------------------------------------------------------------------ embeddings
EMBEDDING_KEYS = ["string_to_param", "emb_params", "clip_l", "clip_g", "name", "step", "string_to_token", "tok", "tok_1", "*"]  # fmt: skip  # noqa: E501


def embedding_values(width: int = 64):
    leaf = tensors((width, 1, 2, 768, 1280))
    return st.one_of(
        leaf,
        st.dictionaries(st.sampled_from(["*", "tok", ""]), leaf | st.none() | junk, max_size=2),
        st.none(),
        st.integers(),
        junk,
        st.lists(leaf, max_size=2),
    )


@FUZZ
@given(
    obj=st.one_of(
        tensors((64, 1, 2, 768)),
        st.dictionaries(st.sampled_from(EMBEDDING_KEYS) | junk, embedding_values(), max_size=4),
        st.none(),
        st.lists(st.integers(), max_size=2),
    ),
    name=st.none() | junk,
)
def test_parse_embedding_raises_only_its_own_error(obj, name):
    try:
        emb = parse_embedding(obj, name=name)
    except EmbeddingFormatError:
        return
    assert isinstance(emb, Embedding)
    emb.describe()
    for v in emb.vectors.values():
        assert v.ndim == 2 and 0 not in v.shape
        assert v.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64), v.dtype
        assert bool(torch.isfinite(v.float()).all())


# ------------------------------------------------------------------ IP-Adapter files
IMAGE_PROJ = [
    "proj.weight", "proj.bias", "norm.weight", "norm.bias", "latents", "proj_in.weight", "proj_out.weight",
    "norm_out.weight", "layers.0.0.to_q.weight", "proj.0.weight", "proj.2.weight", "proj.3.weight",
    "perceiver_resampler.proj_in.weight", "perceiver_resampler.proj_out.weight",
]  # fmt: skip
IP_KEYS = ["1.to_k_ip.weight", "1.to_v_ip.weight", "3.to_k_ip.weight", "3.to_v_ip.weight", "x.to_k_ip.weight", "0.to_q_lora.down.weight"]  # fmt: skip  # noqa: E501


_IP_BASES: dict[str, dict] = {}


def ip_adapter_base(variant: str) -> dict:
    if variant not in _IP_BASES:
        _IP_BASES[variant] = ip_adapter_nested(tiny_pipeline("sd1").unet, variant)
    return _IP_BASES[variant]


@st.composite
def ip_adapter_dicts(draw) -> dict:
    """A real tiny IP-Adapter of some variant with keys dropped, reshaped, retyped, and junk added."""
    base = ip_adapter_base(draw(st.sampled_from(["base", "plus", "full_face", "faceid", "faceid_plus"])))
    image_proj, ip_adapter = dict(base["image_proj"]), dict(base["ip_adapter"])
    for _ in range(draw(st.integers(0, 3))):
        part = draw(st.sampled_from([image_proj, ip_adapter]))
        if not part:
            continue
        key = draw(st.sampled_from(sorted(part)))
        action = draw(st.sampled_from(["drop", "reshape", "retype"]))
        if action == "drop":
            del part[key]
        elif action == "reshape":
            part[key] = draw(tensors((0, 1, 8, 16, 32, 64, 768)))
        else:
            part[key] = part[key].to(draw(st.sampled_from(DTYPES)))
    for key in draw(st.lists(st.sampled_from(IMAGE_PROJ) | junk, max_size=2)):
        image_proj[key] = draw(tensors((8, 16, 32, 64, 768)))
    for key in draw(st.lists(st.sampled_from(IP_KEYS) | junk, max_size=2)):
        ip_adapter[key] = draw(tensors((8, 16, 32, 64, 768)))
    if draw(st.booleans()):
        return {"image_proj": image_proj, "ip_adapter": ip_adapter}
    flat = {f"image_proj.{k}": v for k, v in image_proj.items()}
    flat.update({f"ip_adapter.{k}": v for k, v in ip_adapter.items()})
    return flat


@FUZZ
@given(sd=ip_adapter_dicts(), cross=st.sampled_from([32, 64, 768]), n=st.integers(0, 8))
def test_parse_ip_adapter_raises_only_its_own_error(sd, cross, n):
    try:
        f = parse_ip_adapter(sd)
        check_unet(f, cross, n)
        state_dict_for_diffusers(f)
        _ = f.variant_name
    except IPAdapterFormatError:
        return


# ------------------------------------------------------------------ checkpoint family and configs
_CHECKPOINT_SHAPES: dict[str, dict] = {}


def checkpoint_shapes(family: str) -> dict[str, tuple[int, ...]]:
    if family not in _CHECKPOINT_SHAPES:
        sd = ldm_state_dict(tiny_pipeline(family), family)
        _CHECKPOINT_SHAPES[family] = {k: tuple(v.shape) for k, v in sd.items()}
    return _CHECKPOINT_SHAPES[family]


@st.composite
def checkpoint_layouts(draw) -> dict[str, tuple[int, ...]]:
    """A real tiny checkpoint's key shapes with keys dropped, shapes changed and junk added."""
    real = checkpoint_shapes(draw(st.sampled_from(["sd1", "sd2", "sdxl"])))
    keys = sorted(real)
    shapes_ = dict(real)
    for key in draw(st.lists(st.sampled_from(keys), max_size=6)):
        action = draw(st.sampled_from(["drop", "reshape", "dims"]))
        if action == "drop":
            shapes_.pop(key, None)
        elif action == "reshape":
            shapes_[key] = draw(shapes((4, 8, 32, 64, 320)))
        else:
            shapes_[key] = tuple(draw(st.integers(0, 2048)) for _ in real[key])
    if draw(st.booleans()):  # whole prefixes gone (a UNet-only file, a LoRA...)
        gone = draw(
            st.sampled_from(
                ["model.diffusion_model.", "cond_stage_model.", "conditioner.", "first_stage_model."]
            )
        )
        shapes_ = {k: v for k, v in shapes_.items() if not k.startswith(gone)}
    for key in draw(st.lists(junk, max_size=3)):
        shapes_[key] = draw(shapes())
    return shapes_


@FUZZ
@given(shapes_=checkpoint_layouts())
def test_checkpoint_family_and_configs_raise_only_their_own_error(shapes_):
    try:
        family = checkpoint_layout.detect_family(shapes_)
        assert family in ("sd1", "sd2", "sdxl")
        layout = checkpoint_layout.infer_configs(shapes_)
    except CheckpointFormatError:
        return
    assert layout.family == family
    for config in (layout.unet, layout.vae, layout.text_encoder, layout.text_encoder_2 or {}):
        for key, value in config.items():
            if isinstance(value, int) and not isinstance(value, bool) and key != "addition_time_embed_dim":
                assert value > 0, (key, value)


def test_unchanged_tiny_checkpoints_still_parse():
    """Control: the fuzzer's starting points are valid, so the tests above explore near real files."""
    for family in ("sd1", "sd2", "sdxl"):
        assert checkpoint_layout.infer_configs(checkpoint_shapes(family)).family == family
