"""Face embeddings for IP-Adapter FaceID, computed with insightface.

For each image: the face is detected (SCRFD), its ArcFace embedding is computed and normalised
(`Face.normed_embedding`, 512 values; the raw `Face.embedding` is kept for FaceID Portrait unnorm) and
the face is aligned and cropped by its five landmarks
(`insightface.utils.face_align.norm_crop`), the crop that FaceID Plus / PlusV2 give the CLIP image
encoder. Models are read from `<insightface folder>/models/<name>/*.onnx` (buffalo_l, antelopev2) and
never downloaded.

insightface and onnxruntime are optional: they are imported only when a face is analysed, so the
pack works without them.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .file_stamps import file_stamp
from .images import as_rgb_images
from .stamp_cache import StampCache

PROVIDERS = ("auto", "CUDA", "CPU")
# Detection sizes tried in turn, as ComfyUI_IPAdapter_plus does: SCRFD misses faces that fill most
# of the frame at 640 px and often finds them at a smaller size.
DETECTION_SIZES = (640, 576, 512, 448, 384, 320, 256)
CROP_SIZES = (224, 256)  # ComfyUI_IPAdapter_plus: 224 for SD1.5, 256 for SDXL
ID_EMBED_DIM = 512
INSTALL_HINT = (
    "Install them into ComfyUI's Python: `pip install insightface onnxruntime` (with an NVIDIA GPU: "
    "`pip install insightface`, then `pip uninstall -y onnxruntime && pip install onnxruntime-gpu`), "
    "then restart ComfyUI."
)


class FaceAnalysisError(ValueError):
    """insightface missing, its models missing, or no face found: a message for the user."""


@dataclass(frozen=True, eq=False)
class FaceEmbeddings:
    """What FaceIDEmbed gives ApplyIPAdapter: one face per input image."""

    embeddings: torch.Tensor  # [n, 512] float32, insightface's normed ArcFace embeddings
    raw_embeddings: torch.Tensor  # [n, 512] the same before normalising (FaceID Portrait unnorm takes these)
    crops: torch.Tensor  # [n, S, S, 3] float32 RGB in 0..1 (a ComfyUI IMAGE): the aligned faces
    digest: str  # content hash of embeddings and crops (cache and spec key)
    model: str = ""  # the insightface model name, for messages

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])


def _insightface() -> tuple[Any, Any, Any]:
    """(onnxruntime, FaceAnalysis, face_align), or FaceAnalysisError with the install command."""
    try:
        import onnxruntime
    except ImportError as e:
        raise FaceAnalysisError(f"FaceID needs onnxruntime, which is not installed. {INSTALL_HINT}") from e
    try:
        import insightface  # noqa: F401  (imported first so a missing package is reported as such)
        from insightface.app import FaceAnalysis
        from insightface.utils import face_align
    except ImportError as e:
        raise FaceAnalysisError(f"FaceID needs insightface, which is not installed. {INSTALL_HINT}") from e
    return onnxruntime, FaceAnalysis, face_align


def execution_providers(choice: str = "auto") -> list[str]:
    """onnxruntime providers for `choice` ("auto", "CUDA", "CPU"). auto takes CUDA when onnxruntime has
    it and torch sees a GPU, else the CPU."""
    if choice not in PROVIDERS:
        raise FaceAnalysisError(f"Unknown provider {choice!r}; choose one of {', '.join(PROVIDERS)}.")
    onnxruntime, _, _ = _insightface()
    if choice == "CPU":
        return ["CPUExecutionProvider"]
    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers() and torch.cuda.is_available()
    if choice == "CUDA" and not cuda:
        raise FaceAnalysisError(
            "The CUDA provider was chosen, but onnxruntime has no CUDAExecutionProvider or no GPU is "
            "visible: "
            "`pip uninstall onnxruntime && pip install onnxruntime-gpu`, or choose CPU."
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]


def check_model_dir(model_dir: Path) -> None:
    """FaceAnalysisError naming the expected path when `model_dir` holds no .onnx models (insightface
    would try to download them)."""
    if not model_dir.is_dir() or not any(model_dir.glob("*.onnx")):
        raise FaceAnalysisError(
            f"The insightface model folder {model_dir} is missing or holds no .onnx files. Put the model's "
            f".onnx files there (e.g. buffalo_l: det_10g.onnx, w600k_r50.onnx, ...)."
        )


class FaceAnalyzer:
    """A loaded insightface FaceAnalysis (detection + recognition) and the functions it needs."""

    def __init__(self, app: Any, face_align: Any, ctx_id: int) -> None:
        self.app, self.face_align, self.ctx_id = app, face_align, ctx_id
        self.lock = threading.Lock()  # prepare() changes the detector's size: one image at a time


# One analyzer per insightface folder and provider set (a few hundred MB of ONNX sessions each).
_cache: StampCache[FaceAnalyzer] = StampCache(4, build_under_lock=True)


def load_face_analysis(model_dir: Path, provider: str = "auto") -> FaceAnalyzer:
    """insightface's FaceAnalysis for the models in `model_dir` (`.../insightface/models/<name>`),
    cached by (folder, its files' versions, providers)."""
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    providers = execution_providers(provider)
    _, FaceAnalysis, face_align = _insightface()
    files = tuple(file_stamp(p) for p in sorted(model_dir.glob("*.onnx")))
    _cache.discard(lambda key, old: key[0] == str(model_dir) and old != files)  # replaced files
    key = (str(model_dir), tuple(providers))
    return _cache.get(key, files, lambda: _build(model_dir, providers, FaceAnalysis, face_align))


def _build(model_dir: Path, providers: list, FaceAnalysis: Any, face_align: Any) -> FaceAnalyzer:
    # An absolute name: insightface 2.x takes a folder as the name, 0.7.x joins root/models/name,
    # which is the name itself when it is absolute. Either way this folder, never a download.
    try:
        app = FaceAnalysis(
            name=str(model_dir.resolve()),
            root=str(model_dir.parent.parent),
            allowed_modules=["detection", "recognition"],
            providers=providers,
        )
    except AssertionError as e:  # FaceAnalysis asserts that it found a detection model
        raise FaceAnalysisError(
            f"{model_dir} has no face detection model (an SCRFD .onnx file such as det_10g.onnx)."
        ) from e
    if "recognition" not in app.models:
        raise FaceAnalysisError(
            f"{model_dir} has no face recognition model (an ArcFace .onnx file such as w600k_r50.onnx)."
        )
    ctx_id = 0 if providers[0] == "CUDAExecutionProvider" else -1
    app.prepare(ctx_id=ctx_id, det_size=(DETECTION_SIZES[0], DETECTION_SIZES[0]))
    return FaceAnalyzer(app, face_align, ctx_id)


def clear_cache() -> None:
    _cache.clear()


def _prepare(analyzer: FaceAnalyzer, size: int) -> None:
    """Set the detection size to `size` x `size`.

    Only the detector is prepared again: FaceAnalysis.prepare() prepares every model, and on the CPU
    each model's prepare() calls onnxruntime's set_providers, which builds its session anew. Passing
    ctx_id 0 skips that (it is the only thing ctx_id does there); the sessions keep the providers
    they were made with in `load_face_analysis`.

    insightface 0.7.x's detector keeps the first det_size it was prepared with: a later prepare() only
    prints "det_size is already set ... ignore" and detection stays at that size; 2.x takes each new
    size. Clearing the detector's size first makes 0.7.x take it too; a detector with a fixed input
    shape keeps its own size in both."""
    det = analyzer.app.det_model
    shape = getattr(det, "input_shape", None)
    if shape is not None and len(shape) == 4 and not isinstance(shape[2], int):
        det.input_size = None
    det.prepare(0, input_size=(size, size))


def _largest(faces: list) -> Any:
    return max(faces, key=lambda f: float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])))


def analyze_faces(
    analyzer: FaceAnalyzer,
    images: torch.Tensor,
    crop_size: int = 224,
    sizes: tuple[int, ...] = DETECTION_SIZES,
    model: str = "",
) -> FaceEmbeddings:
    """The largest face of each image of a ComfyUI IMAGE batch [n, H, W, 3]: its normed embedding and its
    aligned crop. Detection is retried at smaller sizes; an image without a face raises
    FaceAnalysisError naming it (1-based)."""
    images = as_rgb_images(images, "image")  # no-op after the node; loaders callers get the same check
    pixels = (images.cpu() * 255).round().to(torch.uint8).numpy()
    embeddings, raw, crops = [], [], []
    with analyzer.lock:
        for i, rgb in enumerate(pixels):
            bgr = np.ascontiguousarray(rgb[..., ::-1])  # insightface reads images as OpenCV does (BGR)
            faces: list = []
            for size in sizes:
                _prepare(analyzer, size)
                faces = [f for f in analyzer.app.get(bgr) if f.embedding is not None]
                if faces:
                    break
            if not faces:
                raise FaceAnalysisError(
                    f"No face was found in image {i + 1} of {len(pixels)} (tried detection sizes "
                    f"{sizes[0]} to {sizes[-1]} px). Use a photo where the face is clearly visible."
                )
            face = _largest(faces)
            embeddings.append(torch.from_numpy(np.asarray(face.normed_embedding, dtype=np.float32)))
            raw.append(torch.from_numpy(np.asarray(face.embedding, dtype=np.float32)))
            crop = analyzer.face_align.norm_crop(bgr, landmark=face.kps, image_size=crop_size)
            crops.append(torch.from_numpy(np.ascontiguousarray(crop[..., ::-1])).float() / 255.0)
        # The next caller starts from the first size again.
        _prepare(analyzer, sizes[0])
    emb, raw_emb, crop_batch = torch.stack(embeddings), torch.stack(raw), torch.stack(crops)
    digest = hashlib.sha256(raw_emb.numpy().tobytes() + crop_batch.numpy().tobytes()).hexdigest()
    return FaceEmbeddings(emb, raw_emb, crop_batch, digest, model)
