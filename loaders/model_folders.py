"""What diffusers and transformers open inside a diffusers model folder must stay inside it.

Links are checked where the folder's name is resolved (nodes/comfy_host). A sharded weights file
names its shards in an index (`*.safetensors.index.json`, `*.bin.index.json`) that the libraries
open themselves: diffusers refuses `../` there, transformers 5 (text encoders) follows it, so a
folder could read any file without a single link. Every shard must be a plain file name.
"""

from __future__ import annotations

from pathlib import Path

from ..converters.json_text import JsonTextError, parse_bounded_json
from .model_files import ModelFileError

INDEX_SUFFIX = ".index.json"
# A full SDXL UNet index names ~2,500 tensors in ~200 KB: 16 MB is far beyond any real index.
MAX_INDEX_BYTES = 16 * 1024 * 1024


def _plain_file_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
    )


def check_shard_index(index: Path, shown: str) -> None:
    """Refuse an index whose weight_map names anything but plain file names (ModelFileError naming
    `shown`, the index's name inside the model folder)."""
    if index.stat().st_size > MAX_INDEX_BYTES:
        raise ModelFileError(
            f"{shown} is larger than {MAX_INDEX_BYTES // 2**20} MB; it is not a shard index."
        )
    try:
        data = parse_bounded_json(index.read_bytes(), shown, max_chars=MAX_INDEX_BYTES)
    except JsonTextError as e:
        raise ModelFileError(str(e)) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ModelFileError(f"{shown} has no weight_map object; it is not a shard index.")
    for shard in weight_map.values():
        if not _plain_file_name(shard):
            raise ModelFileError(
                f"{shown} names the shard {str(shard)[:80]!r}; shards must be plain file names next to "
                "the index (a name with '/' or '..' would read a file outside the model folder)."
            )


def check_shard_indexes(folder: Path) -> None:
    """`check_shard_index` for the index files of a diffusers folder and its component folders, and
    every other JSON file there (model_index.json, config.json, tokenizer and scheduler files) through
    the bounded parser: diffusers and transformers parse them with Python's json, where a deeply
    nested file escapes as a RecursionError and a huge one fills memory."""
    for index in sorted([*folder.glob(f"*{INDEX_SUFFIX}"), *folder.glob(f"*/*{INDEX_SUFFIX}")]):
        check_shard_index(index, index.relative_to(folder).as_posix())
    for config in sorted([*folder.glob("*.json"), *folder.glob("*/*.json")]):
        if not config.name.endswith(INDEX_SUFFIX):
            check_config_file(config, config.relative_to(folder).as_posix())


def check_config_file(path: Path, shown: str) -> None:
    """A JSON file of a model folder: at most MAX_INDEX_BYTES, JSON, nested at most 16 levels (real
    configs nest 2-4; a tokenizer.json's merges list 3)."""
    if path.stat().st_size > MAX_INDEX_BYTES:
        raise ModelFileError(
            f"{shown} is larger than {MAX_INDEX_BYTES // 2**20} MB; it is not a model config."
        )
    try:
        # 64 digits: tokenizer_config.json holds transformers' "no limit", int(1e30), 31 digits
        parse_bounded_json(path.read_bytes(), shown, max_chars=MAX_INDEX_BYTES, max_digits=64)
    except JsonTextError as e:
        raise ModelFileError(str(e)) from None
