"""Stale caches: a file replaced by another of the same size with its modification time kept (`cp -p`,
`rsync -t`, `shutil.copy2`) must be read again by every cache of parsed files and change the nodes'
IS_CHANGED (issue 12, class 4)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from embedding_files_lib import random_vectors, write_diffusers_bin
from ip_adapter_lib import write_vision_files
from lora_fixtures import fresh_handle, write_kohya

from comfyui_diffusers_adapters.loaders import base_models, embedding_files, image_encoders, lora_files
from comfyui_diffusers_adapters.loaders.file_stamps import file_stamp, source_stamp
from comfyui_diffusers_adapters.nodes.load_dreambooth import LoadDreamBooth
from comfyui_diffusers_adapters.nodes.load_lora import LoadLoRA
from comfyui_diffusers_adapters.nodes.load_textual_inversion import LoadTextualInversion
from testlib import tiny_pipeline, write_single_file


@pytest.fixture(autouse=True)
def fresh_caches():
    def clear():
        embedding_files.clear_embedding_cache()
        lora_files._cache.clear()
        base_models.clear_cache()
        image_encoders.clear_cache()

    clear()
    yield
    clear()


def copy_keeping_time(source: Path, target: Path) -> None:
    """`cp -p source target`: same size (checked), the target's modification time as before."""
    before = target.stat()
    assert source.stat().st_size == before.st_size, "the test needs files of the same size"
    shutil.copy2(source, target)  # rewrites the target in place and copies the source's times
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_file_stamp_changes_on_a_same_size_same_time_replacement(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"A" * 300_000)
    b.write_bytes(b"A" * 150_000 + b"B" + b"A" * 149_999)  # differs in the middle only
    first = file_stamp(a)
    assert file_stamp(a) == first  # stable while nothing changes
    copy_keeping_time(b, a)
    assert file_stamp(a) != first
    moved = tmp_path / "c.bin"  # replaced by rename (rsync's way): a new inode
    shutil.copy2(b, moved)
    before = file_stamp(a)
    os.replace(moved, a)
    os.utime(a, ns=(a.stat().st_atime_ns, before[4]))
    assert file_stamp(a) != before
    assert source_stamp(a) == (file_stamp(a),)


def test_embedding_replaced_keeping_size_and_time_is_read_again(models_root):
    path = models_root / "embeddings" / "e.bin"
    first_vectors, second_vectors = random_vectors(2, 768, 1), random_vectors(2, 768, 2)
    write_diffusers_bin(path, "<e>", first_vectors)
    (models_root / "elsewhere").mkdir()  # the same name: torch.save stores it in the archive
    other = write_diffusers_bin(models_root / "elsewhere" / "e.bin", "<e>", second_vectors)
    torch.testing.assert_close(embedding_files.read_embedding(path).vectors[""], first_vectors)
    changed = LoadTextualInversion.IS_CHANGED("e.bin")
    copy_keeping_time(other, path)
    assert LoadTextualInversion.IS_CHANGED("e.bin") != changed
    torch.testing.assert_close(embedding_files.read_embedding(path).vectors[""], second_vectors)


def test_lora_replaced_keeping_size_and_time_is_read_again(models_root):
    first = write_kohya(models_root, "style.safetensors", seed=0)
    second = write_kohya(models_root, "other.safetensors", seed=1)
    path = models_root / "loras" / "style.safetensors"
    base = fresh_handle().base
    key = next(k for k in first if k.endswith("lora_down.weight"))

    def down_of(lora) -> torch.Tensor:
        patch = next(p for part in lora.patches.values() for p in part.values())
        return next(t for t in patch.tensors.values() if t.dim() == 2)

    assert not torch.equal(first[key], second[key])
    before = down_of(lora_files.read_lora(path, base))
    changed = LoadLoRA.IS_CHANGED("style.safetensors")
    copy_keeping_time(models_root / "loras" / "other.safetensors", path)
    assert LoadLoRA.IS_CHANGED("style.safetensors") != changed
    after = down_of(lora_files.read_lora(path, base))
    assert not torch.equal(before, after)
    assert torch.equal(
        after, down_of(lora_files.read_lora(models_root / "loras" / "other.safetensors", base))
    )


def test_checkpoint_replaced_keeping_size_and_time_is_loaded_again(models_root):
    path = write_single_file(models_root / "checkpoints" / "m.safetensors", "sd1", seed=0)
    other = write_single_file(models_root / "other.safetensors", "sd1", seed=1)
    first = base_models.load_base_model(path, "fp32", "cpu")
    changed = LoadDreamBooth.IS_CHANGED("m.safetensors")
    copy_keeping_time(other, path)
    assert LoadDreamBooth.IS_CHANGED("m.safetensors") != changed
    second = base_models.load_base_model(path, "fp32", "cpu")
    assert second is not first
    reference = tiny_pipeline("sd1", seed=1).unet.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in second.pipe.unet.state_dict().items())


def test_image_encoder_replaced_keeping_size_and_time_is_loaded_again(tmp_path):
    path, _, first_model = write_vision_files(tmp_path / "a", seed=0)
    other, _, second_model = write_vision_files(tmp_path / "b", seed=1)
    first = image_encoders.load_image_encoder(path, torch.float32, "cpu")
    copy_keeping_time(other, path)
    second = image_encoders.load_image_encoder(path, torch.float32, "cpu")
    assert second is not first
    reference = second_model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in second.state_dict().items())


TRUNCATED_AFTER_READ = """
import sys, torch
from safetensors.torch import save_file
sys.path.insert(0, "tests")
import conftest  # noqa: F401  (imports the pack)
from comfyui_diffusers_adapters.loaders.model_files import open_model_file
path = sys.argv[1]
save_file({"w": torch.ones(1 << 16)}, path)
file = open_model_file(path)
tensors = file.read(file.shapes)
with open(path, "r+b") as f:  # rewritten in place, then truncated (a copy or download over it)
    f.seek(200)
    f.write(bytes(4096))
    f.truncate(0)
print(float(tensors["w"].sum()))
"""


def test_tensors_read_from_a_file_do_not_follow_it_on_disk(tmp_path):
    """safetensors memory-maps by default: cached tensors then changed with a file rewritten in place,
    and touching them after the file was truncated killed the process (SIGBUS)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", TRUNCATED_AFTER_READ, str(tmp_path / "w.safetensors")],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.split()[-1]) == float(1 << 16)


def test_a_fifo_named_like_a_model_file_does_not_hang_the_stamp(tmp_path):
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        file_stamp(fifo)
