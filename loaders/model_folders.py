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
    """`check_shard_index` for the index files of a diffusers folder and its component folders."""
    for index in sorted([*folder.glob(f"*{INDEX_SUFFIX}"), *folder.glob(f"*/*{INDEX_SUFFIX}")]):
        check_shard_index(index, index.relative_to(folder).as_posix())
