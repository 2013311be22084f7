"""Untrusted model files: code-running pickles and corrupt safetensors, through every entry point."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ip_adapter_lib import flatten, ip_adapter_nested, tiny_vision_model, write_vision_files
from lora_fixtures import fresh_handle
from safetensors.torch import save_file

from comfyui_diffusers_adapters.loaders import base_models, embedding_files, lora_files, model_files
from comfyui_diffusers_adapters.loaders.model_files import ModelFileError, open_model_file
from comfyui_diffusers_adapters.nodes.apply_ip_adapter import ApplyIPAdapter
from comfyui_diffusers_adapters.nodes.load_dreambooth import LoadDreamBooth
from comfyui_diffusers_adapters.nodes.load_lora import LoadLoRA
from comfyui_diffusers_adapters.nodes.load_textual_inversion import LoadTextualInversion
from comfyui_diffusers_adapters.nodes.sampler import Sampler
from testlib import QUICK_SAMPLER, ldm_state_dict, tiny_pipeline


# ------------------------------------------------------------------ code-running pickles
class Payload:
    """Unpickling this runs code that creates `canary`, in one of three ways."""

    def __init__(self, canary: Path, how: str):
        self.canary, self.how = str(canary), how

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch '{self.canary}'",)
        if self.how == "exec":
            return builtins.exec, (f"open({self.canary!r}, 'w').write('code ran')",)
        return builtins.open, (self.canary, "w")  # opening for writing creates the file


HOWS = ("os.system", "exec", "builtins.open")


def write_pickle(path: Path, obj, container: str) -> Path:
    """`container`: "zip" (torch.save, like every real file) or "raw" (a bare pickle stream)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if container == "zip":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    return path


def _checkpoint(payload):
    sd = dict(list(ldm_state_dict(tiny_pipeline("sd1"), "sd1").items())[:4])
    return {"state_dict": {"evil": payload, **sd}}  # the payload first: raw pickles run in order


def _lora(payload):
    w = torch.zeros(4, 8)
    return {
        "lora_unet_x.alpha": payload,
        "lora_unet_x.lora_down.weight": w,
        "lora_unet_x.lora_up.weight": w.T,
    }


def _embedding(payload):
    return {"step": payload, "string_to_param": {"*": torch.zeros(1, 64)}, "name": "evil"}


def _ip_adapter(payload):
    nested = ip_adapter_nested(tiny_pipeline("sd1").unet, "base")
    return {
        "image_proj": {"evil": payload, **nested["image_proj"]},
        "ip_adapter": nested["ip_adapter"],
    }


def _clip_vision(payload):
    return {"vision_model.evil": payload, **tiny_vision_model().state_dict()}


IMAGE = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def handle():
    return fresh_handle()


@pytest.fixture
def models(models_root):
    base_models.clear_cache()
    lora_files._cache.clear()
    embedding_files.clear_embedding_cache()
    save_file(
        flatten(ip_adapter_nested(tiny_pipeline("sd1").unet, "base")),
        str(models_root / "ipadapter" / "ip.safetensors"),
    )
    write_vision_files(models_root / "clip_vision")
    yield models_root
    base_models.clear_cache()


def _node_calls(handle):
    """(folder, file name, state builder, node call) for every input that may name a pickle."""
    vision = "tiny_vit_transformers.safetensors"
    checkpoint = lambda n: LoadDreamBooth().load(n, dtype="fp32", device="cpu")  # noqa: E731
    lora = lambda n: LoadLoRA().load(handle, n, 1.0, 1.0, "unet and text encoders", "")  # noqa: E731
    embedding = lambda n: LoadTextualInversion().load(handle, n, "<evil>")  # noqa: E731
    return {
        "checkpoint-ckpt": ("checkpoints", "evil.ckpt", _checkpoint, checkpoint),
        "checkpoint-pt": ("checkpoints", "evil.pt", _checkpoint, checkpoint),
        "checkpoint-bin": ("checkpoints", "evil.bin", _checkpoint, checkpoint),
        "lora-pt": ("loras", "evil.pt", _lora, lora),
        "lora-bin": ("loras", "evil.bin", _lora, lora),
        "lora-ckpt": ("loras", "evil.ckpt", _lora, lora),
        "embedding-pt": ("embeddings", "evil.pt", _embedding, embedding),
        "embedding-bin": ("embeddings", "evil.bin", _embedding, embedding),
        "embedding-in-prompt": (
            "embeddings",
            "evil.pt",
            _embedding,
            lambda n: Sampler().sample(handle, "a photo of embedding:evil", "", **QUICK_SAMPLER),
        ),
        "ipadapter-bin": (
            "ipadapter",
            "evil.bin",
            _ip_adapter,
            lambda n: ApplyIPAdapter().apply(handle, n, vision, IMAGE, 1.0),
        ),
        "clip_vision-bin": (
            "clip_vision",
            "evil.bin",
            _clip_vision,
            lambda n: ApplyIPAdapter().apply(handle, "ip.safetensors", n, IMAGE, 1.0),
        ),
    }


ENTRY_POINTS = list(_node_calls(None))


@pytest.mark.parametrize("container", ["zip", "raw"])
@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_code_running_pickles_are_refused_and_never_run(models, handle, tmp_path, entry, how, container):
    folder, name, build, call = _node_calls(handle)[entry]
    canary = tmp_path / "canary"
    write_pickle(models / folder / name, build(Payload(canary, how)), container)
    with pytest.raises(ModelFileError, match=r"Refused to load evil\.\w+: .*safetensors") as err:
        call(name)
    assert "run code" in str(err.value)
    assert not canary.exists()


@pytest.mark.parametrize("how", HOWS)
def test_the_payloads_do_run_code_when_unpickled_unsafely(tmp_path, how):
    """Control: the same files create the canary under an unrestricted load, so the test above can fail."""
    for container in ("zip", "raw"):
        canary = tmp_path / f"canary-{container}"
        path = write_pickle(tmp_path / f"evil-{container}.pt", _lora(Payload(canary, how)), container)
        try:
            torch.load(path, weights_only=False)
        except RuntimeError:  # a bare pickle has no magic number: torch notices after unpickling it
            assert container == "raw"
        assert canary.exists()
        canary.unlink()


def test_ip_adapter_bin_in_its_nested_layout_loads(models, handle):
    """The real `.bin` layout ({"image_proj": {...}, "ip_adapter": {...}}) is read, with weights_only."""
    torch.save(ip_adapter_nested(tiny_pipeline("sd1").unet, "base"), models / "ipadapter" / "ip.bin")
    ours = ApplyIPAdapter().apply(handle, "ip.bin", "tiny_vit_transformers.safetensors", IMAGE, 1.0)["result"]
    theirs = ApplyIPAdapter().apply(handle, "ip.safetensors", "tiny_vit_transformers.safetensors", IMAGE, 1.0)
    a, b = ours[0].adapters[-1].file, theirs["result"][0].adapters[-1].file
    assert a.variant == b.variant and a.image_proj.keys() == b.image_proj.keys()
    assert all(torch.equal(a.ip_adapter[k], b.ip_adapter[k]) for k in b.ip_adapter)


# ------------------------------------------------------------------ safetensors headers
def _valid_file(path: Path) -> Path:
    save_file(
        {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)},
        str(path),
    )
    return path


def _parts(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _with_header(header, data: bytes, length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _edit(field: str, value):
    def change(header, data):
        header["a"][field] = value
        return _with_header(header, data)

    return change


CORRUPT = {
    "empty": (lambda h, d: b"", "only 0 bytes"),
    "shorter-than-length-field": (lambda h, d: b"\x10\x00\x00", "only 3 bytes"),
    "header-length-beyond-file": (
        lambda h, d: _with_header(h, d, length=10_000),
        "header claims 10000 bytes",
    ),
    "absurd-header-length": (lambda h, d: _with_header(h, d, length=2**63 + 5), "more than the"),
    "non-json-header": (lambda h, d: _with_header(b"{not json at all", d), "not JSON"),
    "non-utf8-header": (lambda h, d: _with_header(b'{"\xff\xfe": 1}', d), "not JSON"),
    "header-not-an-object": (lambda h, d: _with_header([1, 2], d), "not a JSON object"),
    "metadata-not-text": (lambda h, d: _with_header({**h, "__metadata__": {"x": 1}}, d), "__metadata__"),
    "entry-not-an-object": (lambda h, d: _with_header({**h, "a": 5}, d), "no dtype, shape and data_offsets"),
    "unknown-dtype": (_edit("dtype", "Q4_K"), "unknown dtype 'Q4_K'"),
    "sub-byte-dtype": (_edit("dtype", "F4"), "unknown dtype 'F4'"),
    "negative-shape": (_edit("shape", [-2, -3]), "invalid shape"),
    "text-shape": (_edit("shape", "2x3"), "invalid shape"),
    "bool-shape": (_edit("shape", [True, 6]), "invalid shape"),
    "huge-shape": (_edit("shape", [2**40, 2**40]), "needs"),
    "offsets-not-two": (_edit("data_offsets", [0]), "invalid data_offsets"),
    "offsets-negative": (_edit("data_offsets", [-24, 0]), "invalid data_offsets"),
    "offsets-reversed": (_edit("data_offsets", [24, 0]), "needs 24"),
    "size-not-shape-times-dtype": (_edit("shape", [2, 2]), "needs 16"),
    "offsets-out-of-range": (_edit("data_offsets", [2**40, 2**40 + 24]), "gap|truncated"),
    "offsets-overlap": (
        lambda h, d: _with_header({**h, "b": {**h["b"], "data_offsets": [16, 24]}}, d),
        "overlaps",
    ),
    "offsets-gap": (
        lambda h, d: _with_header({**h, "b": {**h["b"], "data_offsets": [28, 36]}}, d + b"\0" * 4),
        "gap",
    ),
    "trailing-bytes": (lambda h, d: _with_header(h, d + b"junk"), "belong to none"),
    "truncated-data": (lambda h, d: _with_header(h, d[:-3]), "truncated"),
    "truncated-header": (lambda h, d: _with_header(h, d)[:20], "truncated"),
}


def _corrupt(tmp_path: Path, case: str, name: str = "bad.safetensors") -> Path:
    header, data = _parts(_valid_file(tmp_path / "good.safetensors"))
    path = tmp_path / name
    path.write_bytes(CORRUPT[case][0](header, data))
    return path


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_headers_are_refused_before_the_library_reads_anything(tmp_path, monkeypatch, case):
    path = _corrupt(tmp_path, case)

    def never(*a, **k):
        raise AssertionError("the safetensors library was reached")

    monkeypatch.setattr(model_files, "safe_open", never)
    tracemalloc.start()
    try:
        with pytest.raises(ModelFileError, match=CORRUPT[case][1]) as err:
            open_model_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, "no allocation from what the header claims"
    assert "bad.safetensors" in str(err.value) and len(str(err.value)) < 400


def test_a_valid_file_passes_and_reads_back(tmp_path):
    f = open_model_file(_valid_file(tmp_path / "good.safetensors"))
    assert f.shapes == {"a": (2, 3), "b": (4,)}
    assert torch.equal(f.read(["a"])["a"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    # every dtype of the table, zero-size and 0-dim tensors
    tensors = {
        "bool": torch.ones(3, dtype=torch.bool),
        "fp8": torch.zeros(5, dtype=torch.float8_e4m3fn),
        "i64": torch.arange(3),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, str(tmp_path / "all.safetensors"))
    read = open_model_file(tmp_path / "all.safetensors")
    assert read.shapes["scalar"] == () and read.shapes["empty"] == (0, 4)


NODE_CASES = [
    "header-length-beyond-file",
    "non-json-header",
    "unknown-dtype",
    "offsets-overlap",
    "truncated-data",
]


@pytest.mark.parametrize("case", NODE_CASES)
@pytest.mark.parametrize("entry", ["checkpoint", "lora", "embedding", "ipadapter", "clip_vision"])
def test_corrupt_files_give_the_clear_error_through_the_nodes(models, handle, case, entry):
    folder = {"checkpoint": "checkpoints", "lora": "loras", "embedding": "embeddings"}.get(entry, entry)
    path = _corrupt(models / folder, case)
    vision = "tiny_vit_transformers.safetensors"
    call = {
        "checkpoint": lambda: LoadDreamBooth().load(path.name, dtype="fp32", device="cpu"),
        "lora": lambda: LoadLoRA().load(handle, path.name, 1.0, 1.0, "unet and text encoders", ""),
        "embedding": lambda: LoadTextualInversion().load(handle, path.name, ""),
        "ipadapter": lambda: ApplyIPAdapter().apply(handle, path.name, vision, IMAGE, 1.0),
        "clip_vision": lambda: ApplyIPAdapter().apply(handle, "ip.safetensors", path.name, IMAGE, 1.0),
    }[entry]
    with pytest.raises(ModelFileError, match=CORRUPT[case][1]):
        call()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_safetensors_bytes_give_only_the_clear_error(tmp_path, data):
    """Random byte flips, insertions and cuts of a real file: it reads back, or ModelFileError."""
    raw = bytearray(_valid_file(tmp_path / "good.safetensors").read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "header-digit"]))
        if not raw:
            break
        i = data.draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[i:]
        elif op == "insert":
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        else:  # change a number inside the JSON header (shapes, offsets)
            digits = [j for j in range(8, min(len(raw), 200)) if chr(raw[j]).isdigit()]
            if digits:
                raw[data.draw(st.sampled_from(digits))] = ord(data.draw(st.sampled_from("0123456789")))
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(bytes(raw))
    try:
        f = open_model_file(path)
        tensors = f.read(f.shapes)
    except ModelFileError:
        return
    for k, shape in f.shapes.items():
        assert tuple(tensors[k].shape) == shape


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0.0, 0.999), container=st.sampled_from(["zip", "raw"]))
def test_truncated_pickles_give_only_the_clear_error(tmp_path, cut, container):
    path = write_pickle(tmp_path / f"w-{container}.ckpt", _checkpoint(torch.zeros(3)), container)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * cut)])
    with pytest.raises(ModelFileError):
        open_model_file(path)


def test_corrupt_checkpoint_in_a_diffusers_folder_is_refused(models_root, tmp_path):
    pipe = tiny_pipeline("sd1")
    folder = models_root / "diffusers" / "tiny"
    pipe.save_pretrained(folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    header, data = _parts(unet)
    unet.write_bytes(_with_header(header, data[:-10]))
    with pytest.raises(ModelFileError, match="diffusion_pytorch_model.safetensors is truncated"):
        LoadDreamBooth().load("[diffusers] tiny", dtype="fp32", device="cpu")


@pytest.mark.parametrize("how", HOWS)
def test_code_running_pickle_in_a_diffusers_folder_is_refused(models_root, tmp_path, how):
    pipe = tiny_pipeline("sd1")
    folder = models_root / "diffusers" / "tiny"
    pipe.save_pretrained(folder)
    unet = folder / "unet"
    state = dict(pipe.unet.state_dict())
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    canary = tmp_path / "canary"
    torch.save({"evil": Payload(canary, how), **state}, unet / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelFileError, match="Refused to load diffusion_pytorch_model.bin"):
        LoadDreamBooth().load("[diffusers] tiny", dtype="fp32", device="cpu")
    assert not canary.exists()
