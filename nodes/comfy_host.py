"""The one module that knows ComfyUI.

Inside ComfyUI it forwards to `folder_paths`, `comfy.utils`, `comfy.model_management`, `comfy.cli_args`
(the preview method) and `latent_preview` (TAESD previews).
Outside (tests, the headless runner) it falls back to a models root with ComfyUI's folder
names, a text progress bar and an interrupt flag. Nothing else in the pack imports ComfyUI.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from ..loaders.vae_bridge import DiffusersVAE

try:  # ComfyUI present: these modules are already imported by the host process.
    import comfy.model_management as _mm
    import comfy.utils as _cu
    import folder_paths as _fp

    IN_COMFYUI = True
except ImportError:  # tests, the command line
    _mm = _cu = _fp = None
    IN_COMFYUI = False
try:  # ComfyUI's settings; its `preview_method` is rewritten before each prompt (the prompt's override)
    from comfy.cli_args import args as _comfy_args
except ImportError:
    _comfy_args = None

PACK_FOLDERS = ("ipadapter", "insightface")
MODEL_FOLDERS = ("checkpoints", "diffusers", "loras", "embeddings", "clip_vision") + PACK_FOLDERS
# Flux's split files. ComfyUI lists the legacy folders under the new names (its map_legacy); outside
# ComfyUI the same pairs are searched, the new name first.
FLUX_FOLDERS = ("diffusion_models", "unet", "text_encoders", "clip", "vae")
MODEL_FOLDERS += FLUX_FOLDERS
LEGACY_FOLDERS = {"diffusion_models": ("unet",), "text_encoders": ("clip",)}
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
# NAME_MAX and PATH_MAX of common file systems: longer names are refused before the OS sees them.
MAX_COMPONENT_BYTES = 255
MAX_NAME_BYTES = 4096
# Folder listings (they run whenever ComfyUI builds the node inputs) and the link check of a model
# folder stop here: a large LoRA collection has thousands of files a few levels deep, a diffusers
# folder a few dozen; a link loop or a stranger's folder of millions of files must not stall validation.
MAX_LISTED_ENTRIES = 200_000
MAX_LISTING_DEPTH = 32
MAX_FOLDER_FILES = 10_000

log = logging.getLogger(__name__)


class ModelPathError(ValueError):
    """A file name from a workflow that does not name a file inside the model folders."""


class Interrupted(Exception):
    """Raised when the user interrupts a run (outside ComfyUI)."""


# ---------------------------------------------------------------- model folders
_standalone_root: Path | None = None


def set_models_root(root: str | os.PathLike) -> None:
    """Outside ComfyUI: use `root/<folder name>` for every model folder."""
    global _standalone_root
    _standalone_root = Path(root).resolve()


def register_pack_folders() -> None:
    """Add the pack's own folders (`models/ipadapter`, `models/insightface`) to ComfyUI,
    keeping entries that extra_model_paths.yaml or another pack already made."""
    if not IN_COMFYUI:
        return
    for name in PACK_FOLDERS:
        default = os.path.join(_fp.models_dir, name)
        _fp.add_model_folder_path(name, default)
        paths, exts = _fp.folder_names_and_paths[name]
        if not exts:  # an entry created by add_model_folder_path has no extensions
            _fp.folder_names_and_paths[name] = (paths, set(MODEL_EXTENSIONS))


def folder_roots(folder: str) -> list[Path]:
    """Folders searched for `folder` ("checkpoints", "loras", ...), in priority order."""
    if IN_COMFYUI:
        try:
            return [Path(p) for p in _fp.get_folder_paths(folder)]
        except KeyError:
            return [Path(_fp.models_dir) / folder]
    root = _standalone_root or Path(os.environ.get("DIFFUSERS_ADAPTERS_MODELS", "models")).resolve()
    return [root / name for name in (folder, *LEGACY_FOLDERS.get(folder, ()))]


def _walk_model_folder(root: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """`os.walk(root, followlinks=True)` that cannot hang: links are followed (ComfyUI users link model
    folders together), but every real directory is entered once (by its device and inode, so a link
    loop is a dead end), at most MAX_LISTING_DEPTH levels down and MAX_LISTED_ENTRIES entries in all.
    Unreadable folders and dangling or looping links are skipped, as os.walk skips them."""
    seen: set[tuple[int, int]] = set()
    try:
        st = root.stat()
    except OSError:
        return
    seen.add((st.st_dev, st.st_ino))
    budget = MAX_LISTED_ENTRIES
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        depth = len(Path(dirpath).relative_to(root).parts)
        budget -= len(dirnames) + len(filenames)
        if budget < 0:
            log.warning("%s: more than %d entries; the listing stops there.", root, MAX_LISTED_ENTRIES)
            del filenames[max(len(filenames) + budget, 0) :]
            dirnames[:] = []
            yield dirpath, dirnames, filenames
            return
        keep = []
        for d in dirnames:
            try:
                st = os.stat(os.path.join(dirpath, d))
            except OSError:  # a dangling or looping link
                continue
            if (st.st_dev, st.st_ino) not in seen and depth < MAX_LISTING_DEPTH:
                seen.add((st.st_dev, st.st_ino))
                keep.append(d)
        dirnames[:] = keep
        yield dirpath, dirnames, filenames


def list_model_files(folder: str, extensions: tuple[str, ...] = MODEL_EXTENSIONS) -> list[str]:
    """Relative names (forward slashes) of the files in a model folder, subfolders included."""
    names: set[str] = set()
    for root in folder_roots(folder):
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in _walk_model_folder(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in filenames:
                if f.lower().endswith(extensions):
                    names.add((Path(dirpath) / f).relative_to(root).as_posix())
    return sorted(names, key=str.lower)


def list_model_dirs(folder: str, marker: str) -> list[str]:
    """Relative names of the subfolders of a model folder that contain `marker`."""
    names: set[str] = set()
    for root in folder_roots(folder):
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in _walk_model_folder(root):
            if marker in filenames:
                names.add(Path(dirpath).relative_to(root).as_posix())
                dirnames[:] = []
    return sorted(names, key=str.lower)


def _clean_name(name: str) -> str:
    """A file name from a workflow as a relative, forward-slash path that cannot leave its folder.

    Workflows come from strangers: refuse NUL bytes, over-long names, absolute or drive paths and
    `..` before anything touches the file system. Backslashes (workflows saved on Windows) are
    separators, so `sdxl\\style.safetensors` is `sdxl/style.safetensors` and `..\\x` is refused."""
    if not isinstance(name, str) or not name.strip():
        raise ModelPathError("No file name was given.")
    shown = repr(name[:80]) + ("..." if len(name) > 80 else "")
    if "\x00" in name:
        raise ModelPathError(f"Refused file name {shown}: it contains a NUL byte.")
    try:
        encoded = os.fsencode(name)
    except UnicodeError:
        raise ModelPathError(f"Refused file name {shown}: it is not valid text.") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise ModelPathError(f"Refused file name {shown}: it is longer than {MAX_NAME_BYTES} bytes.")
    name = name.replace("\\", "/")
    parts = name.split("/")
    if any(len(os.fsencode(p)) > MAX_COMPONENT_BYTES for p in parts):
        raise ModelPathError(
            f"Refused file name {shown}: a part of it is longer than {MAX_COMPONENT_BYTES} bytes."
        )
    if name.startswith("/") or re.match(r"[A-Za-z]:", name) or ".." in parts:
        raise ModelPathError(
            f"Refused file name {name!r}: names must be relative to a model folder, without '..'."
        )
    clean = "/".join(p for p in parts if p not in ("", "."))
    if not clean:
        raise ModelPathError(f"Refused file name {name!r}: it names the model folder itself.")
    return clean


def clean_model_name(name: str) -> str:
    """The one check of every file or folder name a workflow gives (see `_clean_name`)."""
    return _clean_name(name)


def _inside(path: str | os.PathLike, real_root: Path) -> bool:
    real = Path(os.path.realpath(path))
    return real == real_root or real_root in real.parents


def _is_special(path: str) -> bool:
    """A FIFO, socket or device (after links); a dangling link is not special (nothing can open it)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _check_links_inside(top: Path, real_root: Path, name: str) -> None:
    """Every file and folder under the model folder `top` must resolve inside `real_root`, and every
    file must be a regular one: diffusers and insightface open the files inside by themselves,
    following any link."""
    count = 0
    for dirpath, dirnames, filenames in _walk_model_folder(top):
        for entry in (*dirnames, *filenames):
            count += 1
            if count > MAX_FOLDER_FILES:
                raise ModelPathError(
                    f"Refused {name!r}: it holds more than {MAX_FOLDER_FILES} files; a model folder has a "
                    "few dozen."
                )
            path = os.path.join(dirpath, entry)
            shown = Path(path).relative_to(top).as_posix()
            if not _inside(path, real_root):
                raise ModelPathError(
                    f"Refused {name!r}: {shown} in it is a link that leads outside {real_root}. Copy the "
                    "file into the model folder instead."
                )
            if entry in filenames and _is_special(path):
                raise ModelPathError(
                    f"Refused {name!r}: {shown} in it is not a regular file (a FIFO, socket or device "
                    "would block or never end when read)."
                )


def path_in_folder(root: Path, name: str) -> Path:
    """`root / name` for a file name from a workflow in a folder that is not a model folder (the
    input and output folders): the same name check, and links that leave `root` refused. The file
    need not exist."""
    path = root / _clean_name(name)
    if not _inside(path, Path(os.path.realpath(root))):
        raise ModelPathError(f"Refused {name!r}: it is a link that leads outside {root}.")
    return path


def resolve_model_path(folder: str, name: str, want_dir: bool = False, subfolder: str = "") -> Path:
    """The full path of `name` inside the model folder `folder` (in its `subfolder`, a fixed name
    of the pack such as insightface's "models", when given).

    Every file-name input of every node comes here. Refuses anything that could reach outside the
    model folders: absolute paths, `..`, NUL bytes, over-long names, and symlinks whose target leaves
    the folder (`ModelPathError`); for a folder (want_dir), also any link inside it that leaves.
    """
    clean = _clean_name(name)
    relative = f"{subfolder}/{clean}" if subfolder else clean
    roots = folder_roots(folder)
    for root in roots:
        candidate = root / relative
        try:
            found = candidate.is_dir() if want_dir else candidate.is_file()
        except OSError as e:  # e.g. the whole path exceeds PATH_MAX under a deep root
            raise ModelPathError(f"Refused {name!r}: {e.strerror or e}.") from None
        if not found:
            continue
        real_root, real = root.resolve(), candidate.resolve()
        if real != real_root and real_root not in real.parents:
            raise ModelPathError(f"Refused {name!r}: it is a link that leads outside {root}.")
        if want_dir:
            _check_links_inside(real, real_root, name)
        return real
    kind = "folder" if want_dir else "file"
    where = ", ".join(str(r / relative) for r in roots)
    raise FileNotFoundError(
        f"The {kind} {name!r} was not found in the '{folder}' model folder (looked for {where}). "
        f"Put it there, or pick one of the listed names."
    )


def new_model_path(folder: str, name: str) -> Path:
    """Where a node may write a new file `name` in the model folder `folder` (its first root)."""
    root = folder_roots(folder)[0].resolve()
    path = (root / _clean_name(name)).resolve()
    if root not in path.parents:
        raise ModelPathError(f"Refused {name!r}: it would be written outside {root}.")
    return path


# ---------------------------------------------------------------- progress and interruption
_interrupt = threading.Event()


def request_interrupt(value: bool = True) -> None:
    """Outside ComfyUI: ask the running job to stop at the next step."""
    if value:
        _interrupt.set()
    else:
        _interrupt.clear()


def check_interrupted() -> None:
    """Raise the host's interrupt exception if the user asked to stop."""
    if IN_COMFYUI:
        _mm.throw_exception_if_processing_interrupted()
    elif _interrupt.is_set():
        _interrupt.clear()
        raise Interrupted("Interrupted by the user.")


class _TextProgressBar:
    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = total, label

    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        self.total = total or self.total
        width = 30
        done = int(width * value / max(self.total, 1))
        end = "\n" if value >= self.total else ""
        print(
            f"\r{self.label} [{'#' * done}{'.' * (width - done)}] {value}/{self.total}",
            end=end,
            file=sys.stderr,
        )


def progress_bar(total: int, label: str = "sampling") -> Any:
    """A progress bar with `update_absolute(value, total, preview)`."""
    if IN_COMFYUI:
        return _cu.ProgressBar(total)
    if os.environ.get("DIFFUSERS_ADAPTERS_QUIET"):
        return _QuietProgressBar()
    return _TextProgressBar(total, label)


class _QuietProgressBar:
    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        pass


def preview_method() -> str:
    """ComfyUI's latent preview method for the running prompt: "none", "auto", "latent2rgb" or "taesd"
    (its --preview-method, or the prompt's own choice, which ComfyUI writes into the same setting
    before each prompt). Outside ComfyUI nobody sees previews: "none"."""
    if not IN_COMFYUI or _comfy_args is None:
        return "none"
    method = getattr(_comfy_args, "preview_method", None)
    return str(getattr(method, "value", method) or "none").lower()


def preview_size() -> int:
    """The largest side of a preview ComfyUI sends (its --preview-size, default 512), as its own
    samplers' previews (latent_preview.MAX_PREVIEW_RESOLUTION)."""
    return int(getattr(_comfy_args, "preview_size", None) or 512)


def _taesd_preview(family: str) -> Callable[[Any], Any] | None:
    """ComfyUI's own TAESD previewer when its decoder for `family` is in models/vae_approx
    (taesd_decoder.* for SD1.x/SD2.x, taesdxl_decoder.* for SDXL, taef1_decoder.* for Flux), else
    None. Built at the first step, on the latents' device, as ComfyUI's KSampler builds it on the model's."""
    import comfy.latent_formats
    import latent_preview  # ComfyUI's module

    formats = {"sdxl": comfy.latent_formats.SDXL, "flux": comfy.latent_formats.Flux}
    latent_format = formats.get(family, comfy.latent_formats.SD15)()
    if not any(n.startswith(latent_format.taesd_decoder_name) for n in _fp.get_filename_list("vae_approx")):
        return None
    previewer = None

    def preview(latents: Any) -> Any:
        nonlocal previewer
        if previewer is None:
            previewer = latent_preview.get_previewer(latents.device, latent_format)
        return previewer.decode_latent_to_preview_image("JPEG", latents.float())

    return preview


def _previewer(preview_fn: Callable[[Any], Any] | None, family: str | None) -> Callable[[Any], Any] | None:
    """The preview to compute each step, following ComfyUI's preview method: none for "none" (and
    outside ComfyUI), TAESD for "taesd" where ComfyUI has the decoder file, else `preview_fn` (the
    pack's latent-to-RGB projection, what ComfyUI's "auto" and "latent2rgb" show)."""
    method = preview_method()
    if preview_fn is None or method == "none":
        return None
    if method == "taesd" and family is not None:
        return _taesd_preview(family) or preview_fn
    return preview_fn


def step_hook(
    total: int, preview_fn: Callable[[Any], Any] | None = None, family: str | None = None
) -> Callable[[int, Any], None]:
    """A per-step callback: checks for interruption, then advances a progress bar, with a latent
    preview when ComfyUI's preview method asks for one (`family` picks the TAESD decoder).

    Without previews the latents are never touched: a preview has to wait for the GPU and copy to
    the host, which would stall every step, so nothing else in a step may do that."""
    bar = progress_bar(total)
    preview = _previewer(preview_fn, family)

    if preview is None:

        def on_step(step: int, latents: Any) -> None:
            check_interrupted()
            bar.update_absolute(step, total, None)

    else:

        def on_step(step: int, latents: Any) -> None:
            check_interrupted()
            bar.update_absolute(step, total, preview(latents))

    return on_step


# ---------------------------------------------------------------- the VAE socket
def vae_for(base: Any) -> Any:
    """The VAE socket's value for a loaded base model, made once per model.

    Inside ComfyUI: ComfyUI's own VAE class (comfy.sd.VAE) from the pipeline's VAE weights and
    layout, built when a core node first uses it (a checkpoint whose VAE output is not connected
    costs nothing); the core VAE Decode / Encode (tiled, for inpainting) nodes then run as with any
    checkpoint, and ComfyUI's memory manager holds that copy. A VAE ComfyUI's class cannot hold
    (another group-norm size) falls back to the pipeline's own. Outside ComfyUI: the pipeline's
    VAE behind ComfyUI's VAE methods (loaders/vae_bridge.py), for the headless stand-ins."""
    if base.vae_socket is None:
        base.vae_socket = _LazyComfyVAE(base) if IN_COMFYUI else DiffusersVAE(base.pipe.vae, base.lock)
    return base.vae_socket


class _LazyComfyVAE:
    """ComfyUI's VAE for a base model, built on first use; every attribute is the built VAE's."""

    def __init__(self, base: Any) -> None:
        self._base = base
        self._vae: Any = None
        self._lock = threading.Lock()

    def _built(self) -> Any:
        with self._lock:
            if self._vae is None:
                self._vae = _comfy_vae(self._base)
            return self._vae

    def __getattr__(self, name: str) -> Any:
        return getattr(self._built(), name)


def _comfy_vae(base: Any) -> Any:
    import comfy.sd

    module = base.pipe.vae
    c = module.config
    with base.lock:
        state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    ch = c.block_out_channels[0]
    ddconfig = {  # ComfyUI's AutoencoderKL layout from diffusers' config (its SD default has these keys)
        "double_z": True,
        "z_channels": c.latent_channels,
        "resolution": 256,
        "in_channels": c.in_channels,
        "out_ch": c.out_channels,
        "ch": ch,
        "ch_mult": [b // ch for b in c.block_out_channels],
        "num_res_blocks": c.layers_per_block,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    state.update(_identity_quant_convs(state, c.latent_channels))
    try:
        config = {"params": {"ddconfig": ddconfig, "embed_dim": c.latent_channels}}
        vae = comfy.sd.VAE(sd=state, config=config)
        vae.latent_channels = c.latent_channels  # the config path leaves SD's 4 (Flux's VAE has 16)
        return vae
    except (RuntimeError, ValueError, KeyError) as e:
        log.warning("ComfyUI's VAE class cannot hold this VAE (%s); using the pipeline's own.", str(e)[:200])
        return DiffusersVAE(module, base.lock)


def _identity_quant_convs(state: dict, channels: int) -> dict:
    """1x1 identity convs for a VAE without quant convs (Flux's), which ComfyUI's config path always
    builds: without weights they would stay randomly initialised. x * 1 + 0 keeps every value."""
    if "quant_conv.weight" in state:
        return {}
    import torch

    eye = torch.eye(channels).reshape(channels, channels, 1, 1)
    return {
        "quant_conv.weight": torch.eye(2 * channels).reshape(2 * channels, 2 * channels, 1, 1),
        "quant_conv.bias": torch.zeros(2 * channels),
        "post_quant_conv.weight": eye,
        "post_quant_conv.bias": torch.zeros(channels),
    }


# ---------------------------------------------------------------- devices and memory
def free_host_memory() -> None:
    """Inside ComfyUI, unload ComfyUI's own models before a pipeline goes to the GPU."""
    if IN_COMFYUI:
        _mm.unload_all_models()
        _mm.soft_empty_cache()


def output_directory() -> Path:
    if IN_COMFYUI:
        return Path(_fp.get_output_directory())
    return Path(os.environ.get("DIFFUSERS_ADAPTERS_OUTPUT", "output")).resolve()


def input_directory() -> Path:
    if IN_COMFYUI:
        return Path(_fp.get_input_directory())
    return Path(os.environ.get("DIFFUSERS_ADAPTERS_INPUT", "input")).resolve()


def set_io_directories(input_dir: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """Outside ComfyUI: where stand-in LoadImage reads and SaveImage writes."""
    os.environ["DIFFUSERS_ADAPTERS_INPUT"] = str(Path(input_dir).resolve())
    os.environ["DIFFUSERS_ADAPTERS_OUTPUT"] = str(Path(output_dir).resolve())


# ---------------------------------------------------------------- the T5 tokenizer
def t5_tokenizer_folder() -> Path | None:
    """Inside ComfyUI: the T5 tokenizer files ComfyUI itself ships (comfy/text_encoders/t5_tokenizer),
    read where they are, never copied; outside, None (the loader then asks for a folder)."""
    if not IN_COMFYUI:
        return None
    # comfy/text_encoders is a namespace package (no __file__): found beside comfy/utils.py.
    folder = Path(_cu.__file__).resolve().parent / "text_encoders" / "t5_tokenizer"
    return folder if folder.is_dir() else None
