"""Draw a thumbnail of each example workflow's graph for ComfyUI's template browser.

    .venv/bin/python scripts/workflow_thumbnails.py [example_workflows/NAME.json ...]

ComfyUI lists a custom node pack's `example_workflows/*.json` as templates and, for each, asks for
`/api/workflow_templates/<pack folder>/<name>.jpg` (frontend 1.35: mediaSubtype "jpg" for custom
node templates), which the server serves from the same folder. A sampled image from tiny built-in
models would only show noise, so the picture is the graph itself: groups, nodes with their titles,
links coloured by type, and a caption. Run it again when a workflow changes.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
SIZE = 512
PAD = 24
CAPTION = 64  # pixels at the bottom for the caption
TITLE_HEIGHT = 30  # LiteGraph's title bar, above a node's saved position
BACKGROUND = (32, 32, 32)
NODE_BODY, NODE_TITLE, NODE_EDGE = (53, 53, 53), (34, 34, 34), (80, 80, 80)
TEXT = (220, 220, 220)
# ComfyUI's default link colours; other types grey.
LINK_COLOURS = {
    "LATENT": (255, 156, 249),
    "IMAGE": (100, 181, 246),
    "MASK": (129, 199, 132),
    "VAE": (255, 110, 110),
    "STRING": (119, 221, 119),
    "DIFFUSERS_ADAPTERS_PIPELINE": (255, 183, 77),
    "DIFFUSERS_ADAPTERS_FACEID": (186, 104, 200),
}
# Titles for the caption (the browser shows custom node templates under their file names).
CAPTIONS = {
    "flux_ip_adapter": "Flux.1 with the XLabs IP-Adapter",
    "flux_lora_stack": "Flux.1 with three LoRAs",
    "flux_text_to_image": "Flux.1 text to image",
    "hires_fix": "Hires fix: latent upscale and a second pass",
    "img2img": "Image to image with a LoRA",
    "inpainting": "Inpainting with a painted mask",
    "ip_adapter_faceid": "IP-Adapter FaceID",
    "ip_adapter_faceid_plus": "IP-Adapter FaceID Plus V2",
    "ip_adapter_image_prompt": "IP-Adapter image prompt",
    "ip_adapter_plus": "IP-Adapter Plus",
    "lora_single": "One LoRA",
    "lora_stack_block_weights": "Two LoRAs, block weights",
    "text_to_image": "Text to image (DreamBooth checkpoint)",
    "textual_inversion_negative": "Negative embeddings",
    "textual_inversion_positive": "Textual inversion in the prompt",
}


def pack_display_names() -> dict[str, str]:
    """The pack's node display names (the pack loaded as ComfyUI loads it)."""
    spec = importlib.util.spec_from_file_location("_diffusers_adapters_cli", ROOT / "cli.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return dict(cli.load_pack().NODE_DISPLAY_NAME_MAPPINGS)


def node_title(node: dict, display_names: dict[str, str]) -> str:
    """The node's title as the editor shows it: its own, its display name, or the core type in
    words ("VAEDecode" -> "VAE Decode")."""
    if node.get("title"):
        return node["title"]
    if node["type"] in display_names:
        return display_names[node["type"]]
    return re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", node["type"])


def fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    """`text` cut (with an ellipsis) to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…" if text else ""


class Canvas:
    """Maps canvas coordinates (title bars and groups included) into the thumbnail."""

    def __init__(self, workflow: dict) -> None:
        boxes = [(*n["pos"], n["size"][0], n["size"][1] + TITLE_HEIGHT) for n in workflow["nodes"]]
        boxes = [(x, y - TITLE_HEIGHT, w, h) for x, y, w, h in boxes]
        boxes += [tuple(g["bounding"]) for g in workflow.get("groups") or []]
        self.left = min(b[0] for b in boxes)
        self.top = min(b[1] for b in boxes)
        width = max(b[0] + b[2] for b in boxes) - self.left
        height = max(b[1] + b[3] for b in boxes) - self.top
        self.scale = min((SIZE - 2 * PAD) / width, (SIZE - CAPTION - 2 * PAD) / height)
        self.dx = PAD + (SIZE - 2 * PAD - width * self.scale) / 2
        self.dy = PAD + (SIZE - CAPTION - 2 * PAD - height * self.scale) / 2

    def point(self, x: float, y: float) -> tuple[float, float]:
        return self.dx + (x - self.left) * self.scale, self.dy + (y - self.top) * self.scale


def draw_groups(draw: ImageDraw.ImageDraw, canvas: Canvas, workflow: dict, font) -> None:
    for group in workflow.get("groups") or []:
        x, y, w, h = group["bounding"]
        colour = tuple(int(group.get("color", "#3f789e")[i : i + 2], 16) for i in (1, 3, 5))
        (x0, y0), (x1, y1) = canvas.point(x, y), canvas.point(x + w, y + h)
        draw.rectangle((x0, y0, x1, y1), fill=(*colour, 60), outline=(*colour, 160))
        draw.text(
            (x0 + 4, y0 + 2), fit(draw, group.get("title", ""), font, x1 - x0 - 8), font=font, fill=TEXT
        )


def slot_point(canvas: Canvas, node: dict, slot: int, output: bool) -> tuple[float, float]:
    """Where a socket sits: on the left (inputs) or right (outputs) edge, one 20-unit row each."""
    x, y = node["pos"]
    return canvas.point(x + (node["size"][0] if output else 0), y + 10 + 20 * slot)


def draw_links(draw: ImageDraw.ImageDraw, canvas: Canvas, workflow: dict) -> None:
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link in workflow.get("links") or []:
        _, origin, origin_slot, target, target_slot, kind = link[:6]
        if origin not in nodes or target not in nodes:
            continue
        start = slot_point(canvas, nodes[origin], origin_slot, True)
        end = slot_point(canvas, nodes[target], target_slot, False)
        bend = max(20.0, abs(end[0] - start[0]) / 2)
        points = [
            bezier(start, (start[0] + bend, start[1]), (end[0] - bend, end[1]), end, t / 24)
            for t in range(25)
        ]
        draw.line(points, fill=LINK_COLOURS.get(kind, (160, 160, 160)), width=2)


def bezier(p0, p1, p2, p3, t: float) -> tuple[float, float]:
    s = 1 - t
    return tuple(
        s**3 * a + 3 * s * s * t * b + 3 * s * t * t * c + t**3 * d for a, b, c, d in zip(p0, p1, p2, p3)
    )


def draw_nodes(draw: ImageDraw.ImageDraw, canvas: Canvas, workflow: dict, font, names: dict) -> None:
    for node in workflow["nodes"]:
        (x, y), (w, h) = node["pos"], node["size"]
        (x0, y0), (x1, y1) = canvas.point(x, y - TITLE_HEIGHT), canvas.point(x + w, y + h)
        bar = y0 + TITLE_HEIGHT * canvas.scale
        note = node["type"] in ("Note", "MarkdownNote")
        draw.rounded_rectangle(
            (x0, y0, x1, y1), radius=4, fill=(70, 64, 40) if note else NODE_BODY, outline=NODE_EDGE
        )
        draw.rounded_rectangle((x0, y0, x1, bar), radius=4, fill=NODE_TITLE)
        draw.text(
            (x0 + 4, y0 + 1), fit(draw, node_title(node, names), font, x1 - x0 - 8), font=font, fill=TEXT
        )
        rows = min(len(node.get("widgets_values") or []), int((y1 - bar - 6) // 7))
        for row in range(rows):  # widgets as faint bars
            top = bar + 4 + row * 7
            draw.rounded_rectangle((x0 + 4, top, x1 - 4, top + 4), radius=2, fill=(78, 78, 78))


def thumbnail(workflow: dict, caption: str, names: dict[str, str]) -> Image.Image:
    image = Image.new("RGBA", (SIZE, SIZE), BACKGROUND)
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    canvas = Canvas(workflow)
    small = ImageFont.load_default(size=max(9, min(14, int(22 * canvas.scale))))
    draw_groups(ImageDraw.Draw(overlay), canvas, workflow, small)
    image = Image.alpha_composite(image, overlay)
    draw = ImageDraw.Draw(image)
    draw_links(draw, canvas, workflow)
    draw_nodes(draw, canvas, workflow, small, names)
    big = ImageFont.load_default(size=24)
    draw.text(
        (SIZE / 2, SIZE - CAPTION / 2),
        fit(draw, caption, big, SIZE - 2 * PAD),
        font=big,
        fill=TEXT,
        anchor="mm",
    )
    return image.convert("RGB")


def main(paths: list[str]) -> int:
    names = pack_display_names()
    for path in [Path(p) for p in paths] or sorted((ROOT / "example_workflows").glob("*.json")):
        workflow = json.loads(path.read_text(encoding="utf-8"))
        caption = CAPTIONS.get(path.stem, path.stem.replace("_", " "))
        out = path.with_suffix(".jpg")
        thumbnail(workflow, caption, names).save(out, quality=85, optimize=True)
        print(f"{out} ({out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
