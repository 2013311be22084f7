"""LoadLoRA end to end: merge math, strengths, block scales, stacking, exact removal, errors."""

from __future__ import annotations

import pytest
import torch
from lora_fixtures import fresh_handle, lora_modules, write_kohya
from safetensors.torch import save_file

from comfyui_diffusers_adapters.converters.lora_form import LoraFormatError
from comfyui_diffusers_adapters.loaders import lora_files
from comfyui_diffusers_adapters.loaders.pipeline_handle import PipelineHandle, materialized
from comfyui_diffusers_adapters.nodes.load_lora import LoadLoRA, UnloadLoRA

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def fresh_caches():
    lora_files._cache.clear()
    yield
    lora_files._cache.clear()


def expected_weight(base_weight, sd, name, strength):
    """The written-out math: W + strength * alpha / rank * up @ down."""
    down, up, alpha = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"], sd[f"{name}.alpha"]
    rank = down.shape[0]
    delta = (up.flatten(1) @ down.flatten(1)).reshape(base_weight.shape)
    return base_weight.float() + strength * float(alpha) / rank * delta


def load(handle, name, strength_model=1.0, strength_clip=1.0, apply_to="unet and text encoders", blocks=""):
    out = LoadLoRA().load(handle, name, strength_model, strength_clip, apply_to, blocks)
    return out["result"]


def unet_state(handle):
    return {k: v.clone() for k, v in handle.base.pipe.unet.state_dict().items()}


def test_merged_weights_follow_the_written_out_math(models_root):
    sd = write_kohya(models_root, "style.safetensors")
    handle = fresh_handle()
    original_unet = {k: v.clone() for k, v in handle.base.pipe.unet.state_dict().items()}
    original_te = {k: v.clone() for k, v in handle.base.pipe.text_encoder.state_dict().items()}
    lora_handle, info = load(handle, "style.safetensors", 0.8, 0.5)
    with materialized(lora_handle) as pipe:
        for path, module in lora_modules(pipe.unet).items():
            name = "lora_unet_" + path.replace(".", "_")
            want = expected_weight(original_unet[path + ".weight"], sd, name, 0.8)
            torch.testing.assert_close(module.weight, want, rtol=1e-5, atol=1e-6)
        for path, module in lora_modules(pipe.text_encoder).items():
            name = "lora_te_text_model_" + path.replace(".", "_")
            want = expected_weight(original_te[path + ".weight"], sd, name, 0.5)
            torch.testing.assert_close(module.weight, want, rtol=1e-5, atol=1e-6)
    assert "kohya" in info and "trigger words: zxc style" in info
    assert f"unet: {len(lora_modules(handle.base.pipe.unet))} layers" in info


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_removal_is_bit_exact(models_root, dtype):
    write_kohya(models_root, "a.safetensors")
    write_kohya(models_root, "b.safetensors", seed=1)
    handle = fresh_handle(dtype=DTYPES[dtype])
    before = unet_state(handle)
    stacked, _ = load(load(handle, "a.safetensors", 0.7)[0], "b.safetensors", -1.3)
    with materialized(stacked) as pipe:
        assert not torch.equal(pipe.unet.conv_in.weight, before["conv_in.weight"])
    with materialized(UnloadLoRA().unload(stacked)[0]):
        pass
    after = unet_state(handle)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert handle.base.kind_state["lora"].backups == {}


def test_stacking_and_the_same_file_twice_add_up(models_root):
    write_kohya(models_root, "a.safetensors")
    handle = fresh_handle()
    twice = load(load(handle, "a.safetensors", 0.5)[0], "a.safetensors", 0.5)[0]
    once = load(handle, "a.safetensors", 1.0)[0]
    with materialized(once) as pipe:
        w1 = pipe.unet.down_blocks[0].attentions[0].proj_in.weight.clone()
    with materialized(twice) as pipe:
        torch.testing.assert_close(
            pipe.unet.down_blocks[0].attentions[0].proj_in.weight, w1, rtol=1e-5, atol=1e-6
        )


def test_only_changed_layers_are_rewritten(models_root, monkeypatch):
    from comfyui_diffusers_adapters.loaders import lora_patcher

    write_kohya(models_root, "a.safetensors", only=lambda p: p.startswith("down_blocks"), te=False)
    write_kohya(models_root, "b.safetensors", only=lambda p: p.startswith("up_blocks"), te=False)
    handle = fresh_handle()
    a = load(handle, "a.safetensors", 1.0)[0]
    with materialized(load(a, "b.safetensors", 1.0)[0]) as pipe:
        down = pipe.unet.down_blocks[0].attentions[0].proj_in.weight
        down_before = down.data_ptr(), down.clone()
        up_before = pipe.unet.up_blocks[1].attentions[0].proj_in.weight.clone()
    written, real_write = [], lora_patcher._write
    monkeypatch.setattr(
        lora_patcher, "_write", lambda m, key, *rest: written.append(key) or real_write(m, key, *rest)
    )
    with materialized(load(a, "b.safetensors", 0.3)[0]) as pipe:
        down = pipe.unet.down_blocks[0].attentions[0].proj_in.weight
        assert (down.data_ptr(), torch.equal(down, down_before[1])) == (down_before[0], True)
        assert not torch.equal(pipe.unet.up_blocks[1].attentions[0].proj_in.weight, up_before)
    assert written and all(path.startswith("up_blocks") for _, path in written)


def test_block_scales_and_apply_to_reach_every_layer_of_a_block(models_root):
    write_kohya(models_root, "a.safetensors")
    handle = fresh_handle()
    before = unet_state(handle)
    te_before = handle.base.pipe.text_encoder.encoder.layers[0].self_attn.q_proj.weight.clone()
    scaled = load(
        handle, "a.safetensors", 1.0, 1.0, "unet only", '{"unet": {"down": 0.0, "mid": 1, "up": 1}}'
    )[0]
    with materialized(scaled) as pipe:
        after = pipe.unet.state_dict()
        for key in before:
            if key.startswith("down_blocks"):
                assert torch.equal(after[key], before[key]), key  # attention, resnets and samplers alike
        assert not torch.equal(
            after["up_blocks.0.resnets.0.conv1.weight"], before["up_blocks.0.resnets.0.conv1.weight"]
        )
        assert not torch.equal(
            after["mid_block.resnets.0.conv1.weight"], before["mid_block.resnets.0.conv1.weight"]
        )
        assert torch.equal(pipe.text_encoder.encoder.layers[0].self_attn.q_proj.weight, te_before)


@pytest.fixture(params=["originals kept", "originals copied"])
def backup_mode(request, monkeypatch):
    """Both ways the patcher keeps backups: the original tensors themselves (CPU, a GPU with room) or
    copies, with merges written into the module's own memory (a GPU short of memory)."""
    from comfyui_diffusers_adapters.loaders import lora_patcher

    if request.param == "originals copied":
        monkeypatch.setattr(lora_patcher, "_keep_originals", lambda device, originals: False)
    return request.param


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_changing_strengths_in_place_gives_the_bits_of_a_fresh_apply(models_root, dtype, backup_mode):
    """Strength changes rewrite merged weights in place; the result must be the same bits as applying
    those strengths to an untouched model, and removal must give the original."""
    write_kohya(models_root, "a.safetensors")
    write_kohya(models_root, "b.safetensors", seed=1)
    handle = fresh_handle(dtype=DTYPES[dtype])
    original = unet_state(handle)
    steps = [("a", 1.0, "b", 0.5), ("a", -0.4, "b", 0.5), ("a", 0.7, "b", 0.0), ("a", 0.7, "b", 1.3)]
    for a, sa, b, sb in steps:
        target = load(load(handle, f"{a}.safetensors", sa)[0], f"{b}.safetensors", sb)[0]
        with materialized(target):
            changed = unet_state(handle)
        fresh = fresh_handle(dtype=DTYPES[dtype])
        with materialized(PipelineHandle(fresh.base, target.adapters)):
            want = unet_state(fresh)
        assert all(torch.equal(changed[k], want[k]) for k in want), (sa, sb)
    with materialized(handle):
        pass
    assert all(torch.equal(original[k], v) for k, v in unet_state(handle).items())


def test_memory_of_removed_merges_is_reused_with_the_same_bits(models_root):
    """After a removal the CPU keeps the merged tensors' memory for the next merge of the module:
    the next apply writes into it, gives the bits of a fresh apply and leaves the originals intact."""
    write_kohya(models_root, "a.safetensors")
    write_kohya(models_root, "b.safetensors", seed=1)
    handle = fresh_handle()
    original = unet_state(handle)
    proj = handle.base.pipe.unet.down_blocks[0].attentions[0].proj_in
    with materialized(load(handle, "a.safetensors", 1.0)[0]):
        merged_ptr = proj.weight.data_ptr()
    with materialized(handle):
        assert all(torch.equal(original[k], v) for k, v in unet_state(handle).items())
    target = load(handle, "b.safetensors", 0.7)[0]
    with materialized(target):
        assert proj.weight.data_ptr() == merged_ptr
        reused = unet_state(handle)
    fresh = fresh_handle()
    with materialized(PipelineHandle(fresh.base, target.adapters)):
        assert all(torch.equal(reused[k], v) for k, v in unet_state(fresh).items())
    with materialized(handle):
        assert all(torch.equal(original[k], v) for k, v in unet_state(handle).items())


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_failure_while_applying_changes_nothing(models_root, monkeypatch, when, backup_mode):
    """A failure on the 25th layer, before its merge or after it was written in place (a strength
    change rewrites the module's own tensor), leaves every weight as it was."""
    write_kohya(models_root, "a.safetensors")
    write_kohya(models_root, "b.safetensors", seed=1)
    handle = fresh_handle()
    with materialized(load(handle, "a.safetensors", 1.0)[0]):
        pass
    with_a = unet_state(handle)
    from comfyui_diffusers_adapters.loaders import lora_patcher

    real, calls = lora_patcher._merged, []

    def flaky(*args):
        calls.append(1)
        result = real(*args) if when == "after" else None
        if len(calls) == 25:
            raise RuntimeError("out of memory (simulated)")
        return real(*args) if result is None else result

    monkeypatch.setattr(lora_patcher, "_merged", flaky)
    target = load(load(handle, "a.safetensors", 0.2)[0], "b.safetensors", 1.0)[0]
    with pytest.raises(RuntimeError, match="simulated"):
        with materialized(target):
            pass
    after = unet_state(handle)
    assert all(torch.equal(with_a[k], after[k]) for k in with_a)


def test_wrong_family_and_foreign_files_are_refused(models_root):
    handle = fresh_handle()
    sdxl_names = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4),
    }
    save_file(sdxl_names, str(models_root / "loras" / "xl.safetensors"))
    with pytest.raises(LoraFormatError, match="SDXL.*SD1.x"):
        load(handle, "xl.safetensors")
    save_file(
        {f"model.layer{i}.weight": torch.zeros(2, 2) for i in range(5)},
        str(models_root / "loras" / "x.safetensors"),
    )
    with pytest.raises(LoraFormatError, match="matches"):
        load(handle, "x.safetensors")
    with pytest.raises(FileNotFoundError):
        load(handle, "missing.safetensors")


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_low_precision_merge_matches_the_math_to_rounding(models_root, dtype):
    sd = write_kohya(models_root, "style.safetensors", te=False)
    handle = fresh_handle(dtype=DTYPES[dtype])
    original = {k: v.clone() for k, v in handle.base.pipe.unet.state_dict().items()}
    with materialized(load(handle, "style.safetensors", 0.8)[0]) as pipe:
        for path, module in lora_modules(pipe.unet).items():
            want = expected_weight(original[path + ".weight"], sd, "lora_unet_" + path.replace(".", "_"), 0.8)
            assert module.weight.dtype == DTYPES[dtype]
            # one rounding of the exact fp32 result to the weight's dtype
            assert torch.equal(module.weight, want.to(DTYPES[dtype])) or torch.allclose(
                module.weight.float(), want, rtol=1e-2, atol=1e-3
            ), path


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_biases_no_patch_changes_keep_their_tensor(models_root, dtype):
    """A merged layer whose bias no patch changes keeps its bias tensor itself (no identical copy, in
    any dtype); a bias delta (LyCORIS full diff_b) gives a new one, and removal the original back."""
    write_kohya(models_root, "style.safetensors", te=False)
    handle = fresh_handle(dtype=DTYPES[dtype])
    biased = {p: m for p, m in lora_modules(handle.base.pipe.unet).items() if m.bias is not None}
    originals = {p: m.bias.detach().clone() for p, m in biased.items()}
    pointers = {p: m.bias.data_ptr() for p, m in biased.items()}
    with materialized(load(handle, "style.safetensors", 0.8)[0]):
        assert all(biased[p].bias.data_ptr() == pointers[p] for p in biased)
    # a full diff with a bias delta on one layer, beside the LoRA: only that layer's bias changes
    path = next(p for p in biased if p.endswith("proj_in"))
    stem = "lora_unet_" + path.replace(".", "_")
    weight = biased[path].weight
    diff = {
        f"{stem}.diff": torch.randn(weight.shape) * 0.01,
        f"{stem}.diff_b": torch.randn(weight.shape[0]) * 0.01,
    }
    save_file(diff, str(models_root / "loras" / "diff.safetensors"))
    both = load(load(handle, "style.safetensors", 0.8)[0], "diff.safetensors", 1.0)[0]
    with materialized(both):
        assert biased[path].bias.data_ptr() != pointers[path]
        torch.testing.assert_close(
            biased[path].bias.float(),
            (originals[path].float() + diff[f"{stem}.diff_b"]),
            rtol=1e-2,
            atol=1e-3,
        )
        assert all(biased[p].bias.data_ptr() == pointers[p] for p in biased if p != path)
    with materialized(handle):
        assert all(biased[p].bias is not None and biased[p].bias.data_ptr() == pointers[p] for p in biased)
