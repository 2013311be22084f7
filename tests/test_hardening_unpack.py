"""Small files that unpack to huge ones, and non-finite numbers in adapter files (issue 12, classes 1
and 2, the file side): every hostile file is refused by name before anything it declares is
materialized, also under a memory limit far below what it declares."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from ip_adapter_lib import flatten, ip_adapter_nested
from safetensors.torch import save_file

from comfyui_diffusers_adapters.converters.embeddings import MAX_VECTORS, EmbeddingFormatError
from comfyui_diffusers_adapters.converters.ip_adapter_files import IPAdapterFormatError, parse_ip_adapter
from comfyui_diffusers_adapters.converters.json_text import JsonTextError, parse_bounded_json
from comfyui_diffusers_adapters.converters.training_metadata import summarize
from comfyui_diffusers_adapters.loaders import embedding_files
from comfyui_diffusers_adapters.loaders.embedding_files import read_embedding
from comfyui_diffusers_adapters.loaders.model_files import ModelFileError, open_model_file
from testlib import tiny_pipeline

HUGE = 100_000  # HUGE x HUGE float32 is 40 GB


@pytest.fixture(autouse=True)
def _fresh_cache():
    embedding_files.clear_embedding_cache()
    yield
    embedding_files.clear_embedding_cache()


# ------------------------------------------------------------------ hostile pickles, built by hand
def expanded_view(path: Path, legacy: bool = False, key: str = "emb_params") -> Path:
    """A 4-byte storage viewed with stride 0 as HUGE x HUGE: what torch.save writes for an expanded
    tensor. torch.load gives it back without allocating; the first copy allocates 40 GB."""
    torch.save({key: torch.zeros(1).expand(HUGE, HUGE)}, path, _use_new_zipfile_serialization=not legacy)
    return path


def many_views(path: Path) -> Path:
    """500 full views of one 1 MB storage: 500 MB once each is copied."""
    base = torch.zeros(256, 1024)
    torch.save({f"lora_unet_x{i}.lora_down.weight": base.view(256, 1024) for i in range(500)}, path)
    return path


def _rezip(source: Path, target: Path, change=lambda name, data: data, compress=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(source) as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(target, "w", compression=compress) as z:
        for name, data in entries:
            z.writestr(name, change(name, data))
    return target


def compressed(path: Path) -> Path:
    """torch.save's archive with its entries deflated: a zip bomb's shape (torch never compresses)."""
    torch.save({"emb_params": torch.zeros(4, 768)}, path.with_suffix(".src"))
    return _rezip(path.with_suffix(".src"), path, compress=zipfile.ZIP_DEFLATED)


def short_storage(path: Path) -> Path:
    """A storage entry shorter than its tensor declares."""
    torch.save({"emb_params": torch.zeros(4, 768)}, path.with_suffix(".src"))
    return _rezip(path.with_suffix(".src"), path, lambda n, d: d[:16] if "/data/" in n else d)


def huge_binbytes(path: Path) -> Path:
    """data.pkl whose BINBYTES8 declares a terabyte: a reader that trusts it allocates that much."""
    pkl = b"\x80\x02\x8e" + struct.pack("<Q", 1 << 40) + b"xx"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3\n")
        z.writestr("archive/byteorder", "little")
    return path


class _FakeStorage:
    def __init__(self, numel: int):
        self.numel = numel


class _TensorView:
    def __init__(self, storage: _FakeStorage, size: tuple, stride: tuple):
        self.storage, self.size, self.stride = storage, size, stride

    def __reduce__(self):
        args = (self.storage, 0, self.size, self.stride, False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


class _LegacyPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _FakeStorage):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel, None)
        return None


def legacy_huge_storage(path: Path) -> Path:
    """torch's legacy layout whose one storage declares 10^11 floats (400 GB) in a file of 300 bytes:
    torch allocates a storage at its declared size before reading its bytes."""
    storage = _FakeStorage(10**11)
    out = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, out, protocol=2)
    _LegacyPickler(out, protocol=2).dump({"emb_params": _TensorView(storage, (4, 768), (768, 1))})
    pickle.dump(["0"], out, protocol=2)
    out.write(struct.pack("<q", 10**11) + bytes(64))
    path.write_bytes(out.getvalue())
    return path


HOSTILE_PICKLES = {
    "expanded-view-zip": (expanded_view, "declares shape \\[100000, 100000\\]"),
    "expanded-view-legacy": (lambda p: expanded_view(p, legacy=True), "declares shape \\[100000, 100000\\]"),
    "compressed-entry": (compressed, "compressed entry"),
    "short-storage": (short_storage, "declares 12288 bytes but the file holds 16"),
    "huge-binbytes": (huge_binbytes, "corrupt|truncated"),
    "legacy-huge-storage": (legacy_huge_storage, "storages declare 400000000008 bytes"),
}


def test_the_expanded_view_really_declares_40_gb():
    """Control: torch.load returns the view without allocating; its first copy would take 40 GB."""
    buffer = io.BytesIO()
    torch.save({"emb_params": torch.zeros(1).expand(HUGE, HUGE)}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["emb_params"]
    assert loaded.numel() * loaded.element_size() == 4 * HUGE * HUGE
    assert loaded.untyped_storage().nbytes() == 4


@pytest.mark.parametrize("case", HOSTILE_PICKLES)
@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_hostile_embedding_pickles_are_refused_by_name(tmp_path, case, suffix):
    build, message = HOSTILE_PICKLES[case]
    path = build(tmp_path / f"evil{suffix}")
    with pytest.raises(ModelFileError, match=message) as error:
        read_embedding(path)
    assert f"evil{suffix}" in str(error.value)


@pytest.mark.parametrize("case", HOSTILE_PICKLES)
def test_hostile_model_pickles_are_refused_by_name(tmp_path, case):
    build, message = HOSTILE_PICKLES[case]
    path = build(tmp_path / "evil.ckpt")
    with pytest.raises(ModelFileError, match=message) as error:
        open_model_file(path)
    assert "evil.ckpt" in str(error.value)


def test_many_views_of_one_storage_are_refused(tmp_path):
    with pytest.raises(ModelFileError, match=r"evil.pt: its tensors declare 524288000 bytes over 1048576"):
        open_model_file(many_views(tmp_path / "evil.pt"))


def test_real_pickle_layouts_still_load(tmp_path):
    """Slices of one tensor, transposed views, parameters, nested dicts, empty and bf16 tensors, in
    both torch layouts."""
    weight = torch.randn(8, 6)
    state = {
        "w": weight,
        "half": weight[:4],
        "t": torch.randn(4, 6).t(),
        "p": torch.nn.Parameter(torch.ones(3)),
        "e": torch.zeros(0, 5),
        "b": torch.randn(3, dtype=torch.bfloat16),
    }
    for legacy in (False, True):
        path = tmp_path / f"ok{int(legacy)}.pt"
        torch.save({"state_dict": state}, path, _use_new_zipfile_serialization=not legacy)
        tensors = open_model_file(path).read(state)
        assert all(torch.equal(tensors[k], state[k]) for k in state)


# ------------------------------------------------------------------ embeddings: counts and values
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_an_embedding_with_thousands_of_vectors_is_refused(tmp_path, suffix):
    vectors = torch.zeros(20_000, 768, dtype=torch.float16)  # 30 MB: under the file size limit
    path = tmp_path / f"many{suffix}"
    if suffix == ".pt":
        torch.save({"emb_params": vectors}, path)
    else:
        save_file({"emb_params": vectors}, str(path))
    with pytest.raises(
        EmbeddingFormatError, match=rf"many{suffix}: emb_params .*20000 vectors.*{MAX_VECTORS}"
    ):
        read_embedding(path)


def test_many_sub_token_tensors_are_not_stacked(tmp_path):
    path = tmp_path / "tokens.bin"
    torch.save({"<t>": torch.zeros(768), **{f"<t>_{i}": torch.zeros(768) for i in range(1, 300)}}, path)
    with pytest.raises(EmbeddingFormatError, match="tokens.bin: Found keys"):
        read_embedding(path)
    torch.save({"<t>": torch.zeros(768), **{f"<t>_{i}": torch.zeros(768) for i in range(1, 2000)}}, path)
    with pytest.raises(
        ModelFileError, match="tokens.bin holds 2000 tensors; a file of this kind has at most"
    ):
        read_embedding(path)


@pytest.mark.parametrize(
    "value, message",
    [
        (float("nan"), "NaN or infinite"),
        (float("inf"), "NaN or infinite"),
        (-float("inf"), "NaN or infinite"),
        (1e5, "holds 100000; embedding values must be no larger than 10000"),
        (-3e4, "holds -30000"),
    ],
    ids=["nan", "inf", "-inf", "absurd", "absurd-negative"],
)
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_non_finite_or_absurd_embedding_values_are_refused(tmp_path, value, message, suffix):
    vectors = torch.randn(3, 768) * 0.05
    vectors[1, 7] = value
    path = tmp_path / f"bad{suffix}"
    if suffix == ".pt":
        torch.save({"string_to_param": {"*": vectors}, "name": "bad"}, path)
    else:
        save_file({"clip_l": vectors, "clip_g": torch.zeros(3, 1280)}, str(path))
    with pytest.raises(EmbeddingFormatError, match=rf"bad{suffix}: .*{message}"):
        read_embedding(path)


def test_real_embedding_values_load(tmp_path):
    path = tmp_path / "ok.safetensors"
    vectors = torch.randn(75, 768) * 0.3  # the largest real vector count
    save_file({"emb_params": vectors}, str(path))
    assert torch.equal(read_embedding(path).vectors[""], vectors)


# ------------------------------------------------------------------ IP-Adapter / FaceID tensors
@pytest.mark.parametrize("variant", ["base", "plus", "faceid"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e7], ids=["nan", "inf", "absurd"])
def test_non_finite_ip_adapter_tensors_are_refused_naming_the_tensor(variant, value):
    unet = tiny_pipeline("sd1").unet
    flat = flatten(ip_adapter_nested(unet, variant, lora=variant == "faceid"))
    parse_ip_adapter(flat)  # the clean file reads
    key = sorted(k for k in flat if k.startswith("ip_adapter.") and k.endswith("to_v_ip.weight"))[-1]
    flat[key] = flat[key].clone()
    flat[key][0, 0] = value
    with pytest.raises(IPAdapterFormatError, match=rf"{key}.*holds .*finite numbers no larger than 1e\+06"):
        parse_ip_adapter(flat)


def test_a_non_finite_ip_adapter_file_is_named(tmp_path, models_root):
    from lora_fixtures import fresh_handle

    from comfyui_diffusers_adapters.loaders.ip_adapter_specs import IPAdapterInputs, with_ip_adapter

    flat = flatten(ip_adapter_nested(tiny_pipeline("sd1").unet, "faceid", lora=True))
    key = next(k for k in flat if k.startswith("image_proj."))
    flat[key] = torch.full_like(flat[key], float("nan"))
    path = models_root / "ipadapter" / "broken.safetensors"
    save_file(flat, str(path))
    inputs = IPAdapterInputs(path, "broken.safetensors", lambda: path, "none")
    with pytest.raises(
        IPAdapterFormatError, match=rf"broken.safetensors: .*{key.split('.', 1)[1]} holds NaN"
    ):
        with_ip_adapter(fresh_handle(), inputs)


# ------------------------------------------------------------------ JSON in files
@pytest.mark.parametrize(
    "text, message",
    [
        ("[" * 100_000 + "]" * 100_000, "nested more than 16"),
        ('{"a": ' + "[" * 17 + "]" * 17 + "}", "nested more than 16"),
        ("1" + "0" * 5000, "integer of 5001 digits"),
        ('{"a": NaN}', "NaN is not a number"),
        ('{"a": 1e999}', "not a finite number"),
        ("[" + "1" * 200 + ".5]", "not a finite number"),
        ('"' + "x" * 4_000_001 + '"', "characters, more than"),
        (b'{"\xff": 1}', "not UTF-8"),
        ('{"a": ', "not JSON"),
    ],
    ids=["deep", "depth-17", "digits", "nan", "overflow", "long-float", "huge", "not-utf8", "truncated"],
)
def test_bounded_json_refuses_by_name(text, message):
    with pytest.raises(JsonTextError, match=rf"^the field x .*{message}"):
        parse_bounded_json(text, "the field x")


def test_bounded_json_reads_real_data_and_strings_with_brackets():
    text = json.dumps({"a": [1, 2.5, {"b": '[[[[ {{{{ \\" ]]'}], "n": -12345678901234567890})
    assert parse_bounded_json(text, "x") == json.loads(text)
    assert parse_bounded_json('"\\\\"', "x") == "\\"


def test_training_metadata_beyond_bounds_is_skipped_not_raised():
    deep = '{"5_zxc": ' + "[" * 50_000 + "]" * 50_000 + "}"
    assert summarize({"ss_tag_frequency": deep, "ss_output_name": "style"}) == "output name: style"
    assert "zxc style (12)" in summarize({"ss_tag_frequency": '{"5_zxc style": {"zxc style": 12}}'})


def test_a_deeply_nested_safetensors_header_is_a_corrupt_file(tmp_path):
    header = ('{"__metadata__": {}, "x": ' + "[" * 50_000 + "]" * 50_000 + "}").encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ModelFileError, match="deep.safetensors has a corrupt safetensors header.*nested"):
        open_model_file(path)


# ------------------------------------------------------------------ under a memory limit
UNDER_LIMIT = textwrap.dedent(
    """
    import resource, sys
    sys.path.insert(0, "tests")
    import conftest  # noqa: F401  (imports the pack)
    import torch
    from pathlib import Path
    from comfyui_diffusers_adapters.loaders.embedding_files import read_embedding
    from comfyui_diffusers_adapters.loaders.model_files import open_model_file

    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    torch.ones(1000) @ torch.ones(1000)  # start torch's threads before the limit
    headroom = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + headroom, resource.RLIM_INFINITY))
    legit = read_embedding(Path(sys.argv[1]) / "legit.safetensors")
    assert legit.vectors[""].shape == (75, 768)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for path in sorted(Path(sys.argv[1]).glob("evil-*.pt")):
        # a 20,000-vector state dict is a fine model file, only not an embedding
        for reader in (read_embedding,) if "vectors" in path.name else (read_embedding, open_model_file):
            try:
                reader(path)
            except MemoryError as e:
                print(f"MEMORY {path.name} {reader.__name__}: {e}")
            except Exception as e:  # the refusal: ModelFileError or EmbeddingFormatError
                print(f"REFUSED {path.name} {reader.__name__}: {type(e).__name__}: {str(e)[:160]}")
            else:
                print(f"LOADED {path.name} {reader.__name__}")
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(f"GROWTH_KB {growth}")
    """
)


@pytest.mark.slow
def test_hostile_files_are_refused_under_a_memory_limit(tmp_path):
    """Every hostile file declares tens to hundreds of GB; under an address-space limit of 1.5 GB above
    the process's own, each is refused with its message (no MemoryError, no crash) and the peak
    resident memory grows by less than 64 MB (a legitimate 75-vector embedding is 230 KB)."""
    save_file({"emb_params": torch.randn(75, 768)}, str(tmp_path / "legit.safetensors"))
    for name, (build, _) in HOSTILE_PICKLES.items():
        build(tmp_path / f"evil-{name}.pt")
    many_views(tmp_path / "evil-many-views.pt")
    torch.save({"emb_params": torch.zeros(20_000, 768, dtype=torch.float16)}, tmp_path / "evil-vectors.pt")
    run = subprocess.run(
        [sys.executable, "-c", UNDER_LIMIT, str(tmp_path), str(1536 * 2**20)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [
        line for line in run.stdout.splitlines() if line.split(" ")[0] in ("REFUSED", "MEMORY", "LOADED")
    ]
    assert len(lines) == 2 * (len(HOSTILE_PICKLES) + 1) + 1, run.stdout
    assert all(line.startswith("REFUSED") for line in lines), "\n".join(lines)
    growth_kb = int(run.stdout.split("GROWTH_KB ")[1].split()[0])
    assert growth_kb < 64 * 1024, run.stdout


def test_too_many_tensors_are_refused_from_the_header(tmp_path):
    from comfyui_diffusers_adapters.loaders.pickle_scan import MAX_TENSORS

    # an embedding file of 600 one-number tensors: far more than an embedding has
    save_file({f"t{i}": torch.zeros(1) for i in range(600)}, str(tmp_path / "many.safetensors"))
    with pytest.raises(
        EmbeddingFormatError, match="many.safetensors: 600 tensors are more than an embedding"
    ):
        read_embedding(tmp_path / "many.safetensors")
    # any model file: a header of 100,001 empty tensors (5 MB) is refused before anything is built
    entries = ", ".join(
        f'"t{i}": {{"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}' for i in range(MAX_TENSORS + 1)
    )
    header = ("{" + entries + "}").encode()
    path = tmp_path / "header.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(
        ModelFileError, match="header.safetensors declares 100001 tensors, more than the 100000"
    ):
        open_model_file(path)


def test_a_zip_of_a_million_entries_is_refused_before_zipfile_reads_them(tmp_path, monkeypatch):
    from comfyui_diffusers_adapters.loaders import pickle_scan

    monkeypatch.setattr(pickle_scan, "MAX_TENSORS", 1000)  # the real bound, 100,000, takes a big file
    path = tmp_path / "entries.pt"
    with zipfile.ZipFile(path, "w") as z:
        for i in range(2000):
            z.writestr(f"archive/data/{i}", b"")
    monkeypatch.setattr(zipfile, "ZipFile", None)  # reading the entries would fail the test
    with pytest.raises(ModelFileError, match="entries.pt declares 2000 zip entries"):
        pickle_scan.scan_torch_pickle(path)
