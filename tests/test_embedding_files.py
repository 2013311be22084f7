"""Textual-inversion embedding files: every real layout, errors, unsafe pickles, the cache."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch
from embedding_files_lib import (
    FORMATS,
    case_vectors,
    expected_name,
    lora_bundle_keys,
    random_vectors,
    write_a1111_pt,
    write_case,
    write_diffusers_bin,
    write_emb_params,
    write_malicious_pt,
    write_sdxl,
)
from safetensors.torch import save_file

from comfyui_diffusers_adapters.converters.embeddings import (
    Embedding,
    EmbeddingFormatError,
    embedding_width_family,
    parse_embedding,
)
from comfyui_diffusers_adapters.converters.lora_keys import parse_lora
from comfyui_diffusers_adapters.loaders import embedding_files
from comfyui_diffusers_adapters.loaders.embedding_files import (
    SAFE_GLOBALS,
    load_embedding_pickle,
    read_embedding,
)
from comfyui_diffusers_adapters.loaders.model_files import ModelFileError


@pytest.fixture(autouse=True)
def _fresh_cache():
    embedding_files.clear_embedding_cache()
    yield
    embedding_files.clear_embedding_cache()


def _assert_vectors(embedding: Embedding, expected: dict[str, torch.Tensor]) -> None:
    assert set(embedding.vectors) == set(expected)
    for slot, tensor in expected.items():
        got = embedding.vectors[slot]
        assert type(got) is torch.Tensor and not got.requires_grad
        torch.testing.assert_close(got, tensor, rtol=0, atol=0)


# ---------------------------------------------------------------- every real format
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("case", FORMATS, ids=lambda c: c.id)
def test_every_format_reads_back(tmp_path, case, n):
    vectors = case_vectors(case, n, seed=n)
    path = write_case(case, tmp_path, "mytok", vectors)
    embedding = read_embedding(path)
    _assert_vectors(embedding, vectors)
    assert embedding.format == case.format
    assert embedding.name == expected_name(case, "mytok", path)
    assert embedding.n_vectors == n and embedding.is_sdxl == case.sdxl


def test_sd2_width_and_describe(tmp_path):
    embedding = read_embedding(write_emb_params(tmp_path / "sd2.safetensors", random_vectors(4, 1024)))
    assert embedding.vectors[""].shape == (4, 1024)
    assert embedding.describe() == "4 vectors, 1024 wide (SD2.x)"
    sdxl = read_embedding(
        write_sdxl(tmp_path / "x.safetensors", random_vectors(1, 768), random_vectors(1, 1280))
    )
    assert sdxl.describe() == "1 vector, clip_l 768 + clip_g 1280 wide (SDXL)"


def test_width_family():
    assert embedding_width_family(768) == "SD1.x"
    assert embedding_width_family(1024) == "SD2.x"
    assert embedding_width_family(1280) == "SDXL (second encoder)"
    assert embedding_width_family(32) is None


def test_a1111_file_is_what_a1111_saves(tmp_path):
    """The writer's file holds exactly A1111's keys, with an nn.Parameter and an int step."""
    path = write_a1111_pt(tmp_path / "x.pt", "x", random_vectors(2, 768), step=700)
    data = load_embedding_pickle(path)
    assert set(data) == {
        "string_to_token",
        "string_to_param",
        "name",
        "step",
        "sd_checkpoint",
        "sd_checkpoint_name",
    }
    assert isinstance(data["string_to_param"]["*"], torch.nn.Parameter)
    assert data["step"] == 700 and type(data["step"]) is int


@pytest.mark.parametrize("step_type, global_name", [("numpy", "numpy._core"), ("numpy1", "numpy.core")])
def test_numpy_step_loads_only_with_the_allow_list(tmp_path, step_type, global_name):
    vectors = random_vectors(2, 768)
    path = write_a1111_pt(tmp_path / "np.pt", "np", vectors, step=1234, step_type=step_type)
    assert f"{global_name}.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):  # what plain weights_only does with these files
        torch.load(path, weights_only=True)
    data = load_embedding_pickle(path)
    assert data["step"] == 1234 and type(data["step"]) is int  # numpy scalars come back as numbers
    _assert_vectors(read_embedding(path), {"": vectors})


def test_allow_list_is_narrow():
    import numpy as np

    names = {entry[1] if isinstance(entry, tuple) else entry.__qualname__ for entry in SAFE_GLOBALS}
    assert names == {
        "ParameterDict",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray.scalar",
        "dtype",
        *(type(np.dtype(t)).__qualname__ for t in (np.int32, np.int64, np.float32, np.float64)),
    }


# ---------------------------------------------------------------- in-memory layouts
def test_parse_in_memory_layouts():
    v = random_vectors(3, 768)
    single = parse_embedding({"<tok>": v[0]})  # diffusers, one vector stored as [dim]
    assert single.name == "<tok>" and single.vectors[""].shape == (1, 768)
    stacked = parse_embedding({"tok": v[0], "tok_1": v[1], "tok_2": v[2]})  # diffusers' sub-tokens
    assert stacked.name == "tok" and stacked.format == "diffusers"
    torch.testing.assert_close(stacked.vectors[""], v)
    raw = parse_embedding(v, name="given")
    assert raw.format == "raw tensor" and raw.name == "given"
    assert parse_embedding({"emb_params": v[None]}).vectors[""].shape == (3, 768)  # [1, n, dim]
    assert parse_embedding({"emb_params": v}, name="fallback").name == "fallback"
    half = parse_embedding({"emb_params": v.half()})
    assert half.vectors[""].dtype == torch.float16


def test_parse_lora_bundled_embeddings():
    """`LoraFile.embeddings[token]` as `parse_lora` collects Kohya's `bundle_emb.*` keys."""
    sd1, cl, cg = random_vectors(2, 768), random_vectors(2, 768, 1), random_vectors(2, 1280, 2)
    state = {**lora_bundle_keys("sdtok", sd1), **lora_bundle_keys("xltok", {"clip_l": cl, "clip_g": cg})}
    lora = parse_lora(state, {"unet": {}, "text_encoder": {}})
    sd_emb = parse_embedding(lora.embeddings["sdtok"], name="sdtok")
    assert sd_emb.name == "sdtok" and sd_emb.format == "a1111"
    _assert_vectors(sd_emb, {"": sd1})
    xl = parse_embedding(lora.embeddings["xltok"], name="xltok")
    assert xl.format == "sdxl" and xl.is_sdxl
    _assert_vectors(xl, {"clip_l": cl, "clip_g": cg})


def test_embedding_is_read_only():
    embedding = parse_embedding({"emb_params": random_vectors(1, 768)})
    with pytest.raises(TypeError):
        embedding.vectors["x"] = torch.zeros(1)
    with pytest.raises(AttributeError):
        embedding.name = "other"


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "obj, message",
    [
        ({}, "Found an empty dict; expected a textual-inversion embedding"),
        ({"a": torch.zeros(1, 8), "b": torch.zeros(1, 8)}, "Found keys a, b; expected"),
        ({"clip_l": torch.zeros(1, 768)}, "SDXL embedding without clip_g"),
        ({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(2, 1280)}, "1 clip_l vectors but 2 clip_g"),
        ({"clip_l": torch.zeros(1, 1280), "clip_g": torch.zeros(1, 768)}, "swapped"),
        (
            {"emb_params": torch.zeros(2, 3, 768)},
            "emb_params has shape [2, 3, 768], expected [n_vectors, width]",
        ),
        ({"emb_params": torch.zeros(0, 768)}, "has shape [0, 768]"),
        ({"emb_params": torch.zeros(1, 768, dtype=torch.int64)}, "holds torch.int64 values"),
        ({"emb_params": torch.full((1, 768), float("nan"))}, "NaN or infinite"),
        ({"emb_params": "text"}, "emb_params is a str, expected a tensor"),
        ({"string_to_param": {}}, "string_to_param is empty"),
        ({"string_to_param": 5}, "string_to_param is a int"),
        ({"tok": [1.0, 2.0]}, "Found key tok; expected"),
        ([torch.zeros(1, 768)], "Found a list; expected"),
    ],
)
def test_parse_errors(obj, message):
    with pytest.raises(EmbeddingFormatError) as info:
        parse_embedding(obj)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "keys, where",
    [
        (
            ["lora_unet_down_blocks_0.lora_down.weight", "lora_unet_down_blocks_0.lora_up.weight"],
            "models/loras",
        ),
        (["unet.down_blocks.0.attn1.to_q.lora_A.weight", "unet.x.lora_B.weight"], "models/loras"),
        (["bundle_emb.tok.string_to_param.*", "lora_unet_x.lora_down.weight"], "bundled embeddings"),
        (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.x"], "models/checkpoints"),
        (["image_proj.proj.weight", "ip_adapter.1.to_k_ip.weight"], "models/ipadapter"),
        (
            ["vision_model.encoder.layers.0.mlp.fc1.weight", "vision_model.post_layernorm.weight"],
            "clip_vision",
        ),
    ],
)
def test_wrong_kind_of_file_says_where_it_belongs(tmp_path, keys, where):
    state = {k: torch.zeros(4, 4) for k in keys}
    with pytest.raises(EmbeddingFormatError) as info:
        parse_embedding(state)
    assert where in str(info.value)
    save_file(state, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(EmbeddingFormatError, match=f"wrong.safetensors: .*{where}"):
        read_embedding(tmp_path / "wrong.safetensors")


def test_checkpoint_pickle_says_where_it_belongs(tmp_path):
    path = tmp_path / "model.ckpt.pt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(2)}, "global_step": 10}, path)
    with pytest.raises(EmbeddingFormatError, match="checkpoint.*models/checkpoints"):
        read_embedding(path)


def test_large_file_judged_by_keys_without_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(embedding_files, "MAX_EMBEDDING_BYTES", 1000)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(64, 64)}, str(tmp_path / "big.safetensors"))
    with pytest.raises(EmbeddingFormatError, match="too large for an embedding.*models/loras"):
        read_embedding(tmp_path / "big.safetensors")
    torch.save({"emb_params": torch.zeros(64, 768)}, tmp_path / "big.pt")
    with pytest.raises(EmbeddingFormatError, match=r"big.pt: \d+ KB is too large .* Is it a LoRA"):
        read_embedding(tmp_path / "big.pt")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.pt", None, "Cannot read embedding missing.pt"),
        ("garbage.pt", b"this is not a pickle", "garbage.pt.*corrupt"),
        ("random.pt", bytes(range(7, 107)), "random.pt is not a PyTorch file, or it is corrupt"),
        ("short.safetensors", b"\x01\x02", "not a safetensors file"),
        ("e.txt", b"x", "unsupported embedding file type '.txt'"),
    ],
)
def test_file_errors(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ModelFileError, match=message):
        read_embedding(tmp_path / name)


def test_truncated_pt(tmp_path):
    path = write_a1111_pt(tmp_path / "t.pt", "t", random_vectors(2, 768))
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ModelFileError, match="t.pt"):
        read_embedding(path)


# ---------------------------------------------------------------- pickles that run code
_PAYLOADS = [("exec", "zip"), ("exec", "raw"), ("os.system", "zip"), ("os.system", "raw")]


@pytest.mark.parametrize("how, container", _PAYLOADS)
def test_code_running_pickle_is_refused(tmp_path, how, container):
    if how == "os.system" and os.name != "posix":
        pytest.skip("shell payload is POSIX")
    canary = tmp_path / "canary"
    for suffix in (".pt", ".bin"):
        path = write_malicious_pt(tmp_path / f"evil{suffix}", canary, how, container)
        with pytest.raises(ModelFileError) as info:
            read_embedding(path)
        message = str(info.value)
        assert f"Refused to load evil{suffix}" in message and "Nothing from it was run" in message
        assert ("`exec`" if how == "exec" else "system`") in message
        assert "weights_only" not in message
        assert not canary.exists()


def test_payload_really_runs_code_when_unpickled_unsafely(tmp_path):
    """Control: the same files do create the canary under an unrestricted unpickler (subprocess)."""
    script = (
        "import pickle, sys, torch\n"
        "pickle.load(open(sys.argv[1], 'rb'))\n"
        "torch.load(sys.argv[2], weights_only=False)\n"
    )
    raw = write_malicious_pt(tmp_path / "raw.pt", tmp_path / "canary_raw", container="raw")
    zipped = write_malicious_pt(tmp_path / "zip.pt", tmp_path / "canary_zip", container="zip")
    subprocess.run([sys.executable, "-c", script, str(raw), str(zipped)], check=True, timeout=120)
    assert (tmp_path / "canary_raw").read_text() == "code ran"
    assert (tmp_path / "canary_zip").read_text() == "code ran"


def test_numpy_array_is_not_allowed(tmp_path):
    import numpy as np

    path = tmp_path / "arr.pt"
    torch.save({"emb_params": torch.zeros(1, 8), "step": np.arange(3)}, path)
    with pytest.raises(ModelFileError, match="Refused to load arr.pt: it asks to load `numpy"):
        read_embedding(path)


# ---------------------------------------------------------------- cache
def test_cache_hit_and_reload_on_change(tmp_path, monkeypatch):
    path = write_diffusers_bin(tmp_path / "c.bin", "<c>", random_vectors(1, 768, 1))
    calls = []
    real = embedding_files.load_embedding_pickle
    monkeypatch.setattr(embedding_files, "load_embedding_pickle", lambda p: calls.append(p) or real(p))
    first = read_embedding(path)
    assert read_embedding(path) is first and read_embedding(str(path)) is first and len(calls) == 1

    new = random_vectors(2, 768, 2)  # rewritten: another size
    write_diffusers_bin(path, "<c>", new)
    second = read_embedding(path)
    assert second is not first and len(calls) == 2
    _assert_vectors(second, {"": new})

    newer = random_vectors(2, 768, 3)  # same size, only the mtime differs
    write_diffusers_bin(path, "<c>", newer)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    third = read_embedding(path)
    assert len(calls) == 3
    _assert_vectors(third, {"": newer})

    embedding_files.clear_embedding_cache()
    assert read_embedding(path) is not third and len(calls) == 4
