"""Tiny synthetic insightface models, built with `onnx`, so insightface's own code runs on them.

- `detector.onnx`: SCRFD-style (what insightface's model router takes for detection: one NCHW input
  with free height/width, 9 outputs = scores, box distances and 5-point keypoint distances at strides
  8, 16 and 32 with 2 anchors per location). It "sees a face" where the image is bright and the
  bright patch is bounded: at stride 32 a location scores high when its 3x3 neighbourhood of 32 px
  cells is bright and the cells RING cells away on all four sides are dark. A face wider than about
  10 cells at the detection size (one that fills the frame at 640 px) is missed and found at a smaller
  size, as real SCRFD behaves. Strides 8 and 16 never fire. Every anchor
  predicts the same very large box (so non-maximum suppression keeps one face) and fixed keypoints
  around its centre in the shape of insightface's ArcFace template.
- `recognizer.onnx`: ArcFace-style, [1, 3, 112, 112] -> [1, 512]: 8x8 average pooling and a fixed
  random linear map, so different faces give different embeddings.

And FaceID adapter files for the tiny pipelines, in the original key layout (FaceID `MLPProjModel`,
FaceID Plus `ProjPlusModel`, the LoRA on every attention processor).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from diffusers.models.embeddings import (
    IPAdapterFaceIDImageProjection,
    IPAdapterFaceIDPlusImageProjection,
    IPAdapterPlusImageProjection,
)
from ip_adapter_lib import ENC_HIDDEN, cross_attention_slots, faceid_plus_to_original, resampler_to_original
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file

from testlib import tiny_pipeline

ID_DIM = 512  # insightface's embedding width (the recognizer's output)
LORA_RANK = 4
OPSET = 17
IR_VERSION = 8
STRIDES = (8, 16, 32)
# insightface's 112 px ArcFace landmark template (eyes, nose, mouth corners), centred and scaled to a
# face 3 cells (96 px at stride 32) wide, in units of the stride, as SCRFD predicts keypoints.
_ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
KPS_OFFSETS = ((_ARCFACE_112 - 56.0) / 112.0 * 3.0).reshape(1, 10)
RING = 5  # a face is seen where the cells 5 cells away (160 px at the detection size) are dark
BOX_DISTANCE = 40.0  # strides on each side: every anchor's box overlaps every other's


def _ring_kernel() -> np.ndarray:
    """Conv weights [4, 1, k, k] picking the cells RING cells left, right, above and below."""
    k = 2 * RING + 1
    w = np.zeros((4, 1, k, k), dtype=np.float32)
    for i, (y, x) in enumerate(((RING, 0), (RING, k - 1), (0, RING), (k - 1, RING))):
        w[i, 0, y, x] = 1.0
    return w


def _const(name: str, value) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], name=name, value=numpy_helper.from_array(np.asarray(value), name)
    )


def detector_model(input_hw=("height", "width")) -> onnx.ModelProto:
    """The detector; `input_hw` fixes its input size (some exported SCRFD models have one)."""
    nodes = [
        _const("half", np.float32(0.5)),
        _const("zero", np.float32(0.0)),
        _const("flat1", np.array([-1, 1], dtype=np.int64)),
        _const("box_d", np.full((1, 4), BOX_DISTANCE, dtype=np.float32)),
        _const("kps_d", KPS_OFFSETS.astype(np.float32)),
        _const("thr3", np.float32(0.7)),
        _const("gain3", np.float32(20.0)),
        _const("gain_ring", np.float32(40.0)),
        _const("ring_w", _ring_kernel()),
        # brightness in 0..1 (SCRFD feeds (pixel - 127.5) / 128)
        helper.make_node("ReduceMean", ["input.1"], ["gray"], name="gray", axes=[1], keepdims=1),
        helper.make_node("Mul", ["gray", "half"], ["gray_h"], name="gray_h"),
        helper.make_node("Add", ["gray_h", "half"], ["bright"], name="bright"),
    ]
    outputs = {"score": [], "bbox": [], "kps": []}
    for s in STRIDES:
        cell = f"cell{s}"
        nodes.append(
            helper.make_node(
                "AveragePool", ["bright"], [cell], name=cell, kernel_shape=[s, s], strides=[s, s]
            )
        )
        if s == 32:
            nodes += [
                helper.make_node("AveragePool", [cell], ["a3"], name="a3", kernel_shape=[3, 3], pads=[1] * 4),
                helper.make_node("Conv", [cell, "ring_w"], ["ring"], name="ring", pads=[RING] * 4),
                helper.make_node("ReduceMax", ["ring"], ["around"], name="around", axes=[1], keepdims=1),
                helper.make_node("Sub", ["a3", "thr3"], ["a3c"], name="a3c"),
                helper.make_node("Mul", ["a3c", "gain3"], ["l3"], name="l3"),
                helper.make_node("Mul", ["around", "gain_ring"], ["lr"], name="lr"),
                helper.make_node("Sub", ["l3", "lr"], ["logit"], name="logit"),
                helper.make_node("Sigmoid", ["logit"], [f"map{s}"], name=f"map{s}"),
            ]
        else:
            nodes.append(helper.make_node("Mul", [cell, "zero"], [f"map{s}"], name=f"map{s}"))
        # [1, 1, h, w] -> [h*w*2, 1]: the first anchor of each location scores, the second never does
        nodes += [
            helper.make_node("Reshape", [f"map{s}", "flat1"], [f"one{s}"], name=f"one{s}"),
            helper.make_node("Mul", [f"one{s}", "zero"], [f"nil{s}"], name=f"nil{s}"),
            helper.make_node("Concat", [f"one{s}", f"nil{s}"], [f"pair{s}"], name=f"pair{s}", axis=1),
            helper.make_node("Reshape", [f"pair{s}", "flat1"], [f"score_{s}"], name=f"score_{s}"),
            helper.make_node("Mul", [f"score_{s}", "zero"], [f"z{s}"], name=f"z{s}"),
            helper.make_node("Add", [f"z{s}", "box_d"], [f"bbox_{s}"], name=f"bbox_{s}"),
            helper.make_node("Add", [f"z{s}", "kps_d"], [f"kps_{s}"], name=f"kps_{s}"),
        ]
        for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
            outputs[kind].append(
                helper.make_tensor_value_info(f"{kind}_{s}", TensorProto.FLOAT, [f"n{s}", width])
            )
    graph = helper.make_graph(
        nodes,
        "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, *input_hw])],
        outputs["score"] + outputs["bbox"] + outputs["kps"],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def recognizer_model(seed: int = 0) -> onnx.ModelProto:
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(3 * 14 * 14, 512, generator=g) / 24).numpy().astype(np.float32)
    nodes = [
        helper.make_node(
            "AveragePool", ["data"], ["pooled"], name="pool", kernel_shape=[8, 8], strides=[8, 8]
        ),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "fc_weight"], ["fc1"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_arcface",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 512])],
        initializer=[numpy_helper.from_array(weight, "fc_weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def write_insightface_models(insightface_root: Path, name: str = "buffalo_tiny") -> Path:
    """`<insightface_root>/models/<name>/{det_tiny,rec_tiny}.onnx`, the layout ComfyUI users have."""
    folder = insightface_root / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(detector_model(), str(folder / "det_tiny.onnx"))
    onnx.save(recognizer_model(), str(folder / "rec_tiny.onnx"))
    return folder


def face_image(
    size: int = 128, face: int = 48, center=(64, 64), tint=(1.0, 0.9, 0.8), background: float = 0.0
) -> torch.Tensor:
    """A ComfyUI IMAGE [1, size, size, 3] with a bright square "face" of `face` px (a tinted gradient,
    so different tints give different embeddings)."""
    img = torch.full((size, size, 3), background)
    cy, cx = center
    y0, x0 = cy - face // 2, cx - face // 2
    ys = torch.linspace(0.75, 1.0, face)[:, None, None]
    xs = torch.linspace(0.85, 1.0, face)[None, :, None]
    tint = torch.tensor(tint)[None, None, :]
    img[y0 : y0 + face, x0 : x0 + face] = ys * xs * tint
    return ((img * 255).round() / 255)[None]


def blank_image(size: int = 128) -> torch.Tensor:
    return torch.zeros(1, size, size, 3)


# ---------------------------------------------------------------- FaceID adapter files (original layout)
def faceid_image_proj(variant: str, cross: int, clip_width: int) -> dict[str, torch.Tensor]:
    """diffusers' projection modules with random weights, renamed back to the original IP-Adapter names
    (`MLPProjModel`: proj.0, proj.2, norm; `ProjPlusModel`: + perceiver_resampler.*; Portrait unnorm: a
    `Resampler` over the raw 512-wide id embedding, 16 queries)."""
    torch.manual_seed(5)
    if variant == "faceid_unnorm":
        sd = IPAdapterPlusImageProjection(
            embed_dims=ID_DIM, output_dims=cross, hidden_dims=64, heads=1, num_queries=16
        ).state_dict()
        return resampler_to_original(sd)
    if variant == "faceid":
        sd = IPAdapterFaceIDImageProjection(
            image_embed_dim=ID_DIM, cross_attention_dim=cross, mult=2, num_tokens=4
        ).state_dict()
        ren = {"ff.net.0.proj": "proj.0", "ff.net.2": "proj.2", "norm": "norm"}
        return {ren[k.rsplit(".", 1)[0]] + "." + k.rsplit(".", 1)[1]: v for k, v in sd.items()}
    sd = IPAdapterFaceIDPlusImageProjection(
        embed_dims=cross, output_dims=cross, hidden_dims=clip_width, id_embeddings_dim=ID_DIM, heads=1
    ).state_dict()
    return faceid_plus_to_original(sd)


def faceid_lora_weights(unet, seed: int = 7) -> dict[str, torch.Tensor]:
    """`N.to_{q,k,v,out}_lora.{down,up}.weight` for every attention processor N (self and cross), with
    the shapes of the projections they patch."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, name in enumerate(unet.attn_processors):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        for p, module in (("q", attn.to_q), ("k", attn.to_k), ("v", attn.to_v), ("out", attn.to_out[0])):
            sd[f"{i}.to_{p}_lora.down.weight"] = torch.randn(LORA_RANK, module.in_features, generator=g) * 0.1
            sd[f"{i}.to_{p}_lora.up.weight"] = torch.randn(module.out_features, LORA_RANK, generator=g) * 0.1
    return sd


def faceid_nested(family: str, variant: str, lora: bool = True) -> dict:
    unet = tiny_pipeline(family).unet
    g = torch.Generator().manual_seed(1)
    ip = {}
    for key_id, hidden, cross in cross_attention_slots(unet):
        ip[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.05
        ip[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.05
    if lora:
        ip.update(faceid_lora_weights(unet))
    proj = faceid_image_proj(variant, unet.config.cross_attention_dim, ENC_HIDDEN)
    return {"image_proj": proj, "ip_adapter": ip}


def write_faceid(models_root, name: str, family: str = "sd1", variant: str = "faceid", lora: bool = True):
    """A FaceID file for the tiny pipeline of `family` in models/ipadapter: `.bin` as the original
    releases ({"image_proj": ..., "ip_adapter": ...}), `.safetensors` flat. Returns the nested dict."""
    nested = faceid_nested(family, variant, lora)
    path = models_root / "ipadapter" / name
    if path.suffix == ".bin":
        torch.save(nested, path)
    else:
        flat = {f"{part}.{k}": v.contiguous() for part in nested for k, v in nested[part].items()}
        save_file(flat, str(path))
    return nested
