"""Open, check and run every example workflow in a real ComfyUI, in headless Chromium, as a user would.

A dev tool (not run by the tests or CI). Needs Debian's Chromium (`apt-get install chromium`, used as
/usr/bin/chromium: playwright's own browser download is not needed) and playwright in the Python that
runs this script (`pip install playwright`), then:

    python scripts/editor_check.py --comfyui ~/ComfyUI --quick [--out editor_check_out]

It links the pack into COMFYUI/custom_nodes (as comfyui-diffusers-adapters) unless a link is there,
starts ComfyUI on a free port with a fresh user folder (--cpu, --preview-method none unless told),
and in a 1600x1000 window opens each example_workflows/*.json from the template browser, checks it,
runs it (the Run button) and waits for its image in /history. One PASS/FAIL line per workflow and
check, a summary, exit code 1 when a check failed. ComfyUI and the browser are stopped at the end
(Ctrl-C too). Screenshots: OUT/template_browser.png, OUT/<name>_open.png, OUT/<name>_run.png;
ComfyUI's log and images: OUT/comfyui.log, OUT/output/.

Checks: "(startup) errors" and "(templates) errors", no console error and no failed request while
the editor and the template browser load (the frontend's own requests of a fresh profile offline,
STARTUP_NOISE, aside); then per workflow:
  visible     every node (with its title bar) and group lies inside the window, not under the
              sidebar, the top bar, the Run toolbar or the minimap, at the view the editor opens with
  overlap     no two nodes overlap, no two groups overlap, no node's source badge (the pack's
              name the editor draws above a custom node's title) covers another node
  text        every text box (Notes, prompts) shows its whole text without scrolling
  unmodified  the editor did not change the workflow on opening (its change tracker, and the
              widget values it would save equal the file's). The dot on the new tab is not this:
              the frontend marks every template not saved yet, core ones too
  open-errors no console error and no failed request while opening
  thumbnail   the template browser showed the workflow's picture
  run         the run ends with an image (ComfyUI's /history); --quick makes it 2 steps at 64x64
  run-errors  no console error and no failed request while running
  previews    with --preview-method none no latent preview reached the editor; with another method
              the sampler showed one

--only NAME... checks some workflows; --server URL uses a running ComfyUI instead of starting one.

Files the examples name (put them in COMFYUI/models/<folder>, pictures in COMFYUI/input; any real
file of that kind works, tiny ones too):
  checkpoints/v1-5-pruned-emaonly.safetensors (an SD1.x checkpoint)
  loras/my_style_lora.safetensors, loras/kohya_character.safetensors, loras/lycoris_style_locon.safetensors
  embeddings/EasyNegative.safetensors, embeddings/badhandv4.pt, embeddings/my_concept.pt
  ipadapter/ip-adapter_sd15.safetensors, ipadapter/ip-adapter-plus_sd15.safetensors,
  ipadapter/ip-adapter-faceid_sd15.bin, ipadapter/ip-adapter-faceid-plusv2_sd15.bin
  clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors
  insightface/models/buffalo_l/ (insightface's files; FaceID needs `pip install insightface onnxruntime`)
  Flux: diffusion_models/flux1-dev.safetensors, text_encoders/clip_l.safetensors,
  text_encoders/t5xxl_fp8_e4m3fn.safetensors, vae/ae.safetensors, loras/my_first_flux_lora_v1.safetensors,
  loras/realism_lora.safetensors, loras/flux_style_lokr.safetensors, ipadapter/flux-ip-adapter.safetensors,
  clip_vision/clip_vision_l.safetensors
  input/reference.png (a face, for FaceID), input/example.png (ComfyUI ships it)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACK_FOLDER = "comfyui-diffusers-adapters"  # pyproject's name: the template browser's category key
WINDOW = {"width": 1600, "height": 1000}
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# A fresh user folder: no tutorial (it opens the template browser over the canvas), no update check.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Notification.ShowVersionUpdates": False}
# Requests the frontend itself makes on a fresh profile or offline; they fail without any pack.
STARTUP_NOISE = ("/user.css", "/favicon.ico", "/api/userdata/comfy.templates.json", "api.comfy.org")
SAMPLERS = ("DiffusersAdaptersSampler", "DiffusersAdaptersLatentSampler")
QUICK = {"steps": 2, "width": 64, "height": 64}

# Screen rectangles (CSS px) of nodes (title bar included) and groups, from the frontend's graph.
JS_LAYOUT = """() => {
  const c = window.app.canvas, r = c.canvas.getBoundingClientRect();
  const toScreen = ([x, y, w, h]) => {
    const [sx, sy] = c.ds.convertOffsetToCanvas([x, y]);
    return [r.x + sx, r.y + sy, w * c.ds.scale, h * c.ds.scale];
  };
  // The source badges drawn above a custom node's title bar (LGraphNode.drawBadges: right-aligned,
  // 2 px apart and above the title).
  const badge = (n) => {
    const list = (n.badges ?? []).map(b => typeof b === 'function' ? b() : b).filter(b => b?.visible);
    if (!list.length) return null;
    const width = list.reduce((sum, b) => sum + b.getWidth(c.ctx) + 2, 0);
    const height = Math.max(...list.map(b => b.height));
    const [x, y, w] = Array.from(n.getBounding());
    return [x + w - width, y - 2 - height, width, height];
  };
  return {
    nodes: window.app.graph.nodes.map(n => ({
      id: n.id, type: n.type, title: n.title, box: Array.from(n.getBounding()), badge: badge(n),
      screen: toScreen(Array.from(n.getBounding())) })),
    groups: window.app.graph.groups.map(g => ({
      title: g.title, box: Array.from(g._bounding), screen: toScreen(Array.from(g._bounding)) })),
  };
}"""

# Points of a screen rectangle where something else than the canvas (or a widget drawn in the DOM
# over it, such as a text box) is on top: the rectangle is not fully visible there.
JS_COVERED = """([x, y, w, h]) => {
  const canvas = window.app.canvas.canvas, hidden = [];
  const step = 12, xs = [], ys = [];
  for (let i = 0; i <= Math.ceil((w - 2) / step); i++) xs.push(Math.min(x + 1 + i * step, x + w - 1));
  for (let i = 0; i <= Math.ceil((h - 2) / step); i++) ys.push(Math.min(y + 1 + i * step, y + h - 1));
  for (const px of xs) for (const py of ys) {
    const onEdge = px === xs[0] || px === xs[xs.length - 1] || py === ys[0] || py === ys[ys.length - 1];
    if (!onEdge) continue;
    const top = document.elementFromPoint(px, py);
    if (top === canvas || (top && top.closest('.dom-widget, .comfy-multiline-input'))) continue;
    const what = !top ? 'outside the window'
      : (top.closest('[aria-label]')?.getAttribute('aria-label')
         || top.closest('[class]')?.className.toString().split(' ').slice(0, 2).join(' ') || top.tagName);
    hidden.push([Math.round(px), Math.round(py), what]);
  }
  return hidden;
}"""

# A card shows the workflow's own picture: the frontend fetches <name>.jpg into a blob, and falls
# back to its default-template.png when that fails.
JS_CARD_PICTURE = """([card, name]) => [...card.querySelectorAll('img')].some(i => i.complete
  && i.naturalWidth > 0 && (i.src.startsWith('blob:') || i.src.endsWith('/' + name + '.jpg')))"""

JS_SAVED_WIDGETS = """() => Object.fromEntries(window.app.graph.serialize().nodes.map(
  n => [n.id, n.widgets_values ?? null]))"""

JS_MODIFIED = """() => {
  const wf = window.app.extensionManager.workflow.activeWorkflow;
  wf?.changeTracker?.checkState();
  return {path: wf?.path ?? null, modified: !!wf?.isModified};
}"""

# Text boxes (Notes, prompts) whose text does not fit: the user would have to scroll to read it.
JS_CUT_TEXT = """() => window.app.graph.nodes.flatMap(n => (n.widgets ?? [])
  .filter(w => w.element?.tagName === 'TEXTAREA' && w.element.scrollHeight > w.element.clientHeight + 2)
  .map(w => `node ${n.id} ${n.title}: ${w.name} shows ${w.element.clientHeight}`
    + ` of ${w.element.scrollHeight} px`))"""

JS_QUICK = """(values) => {
  const changed = [];
  for (const node of window.app.graph.nodes) {
    if (!values.types.includes(node.type)) continue;
    for (const w of node.widgets ?? []) {
      if (w.name in values.set) { w.value = values.set[w.name]; changed.push(node.id + '.' + w.name); }
    }
  }
  window.app.graph.setDirtyCanvas(true, true);
  return changed;
}"""

JS_PREVIEWS = """() => Object.keys(window.app.nodePreviewImages ?? {})"""


@dataclass
class Events:
    """Console errors and failed requests seen since the last `take`."""

    items: list[str] = field(default_factory=list)

    def take(self) -> list[str]:
        items, self.items = self.items, []
        return items


@dataclass
class Report:
    lines: list[tuple[str, str, bool, str]] = field(default_factory=list)

    def check(self, workflow: str, name: str, ok: bool, detail: str = "") -> bool:
        self.lines.append((workflow, name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'} {workflow:28} {name:12} {detail}", flush=True)
        return ok

    def summary(self) -> int:
        failed = [line for line in self.lines if not line[2]]
        names = sorted({line[0] for line in failed})
        print(f"\n{len(self.lines) - len(failed)} passed, {len(failed)} failed", end="")
        print(f" ({', '.join(names)})" if names else "", flush=True)
        return 1 if failed else 0


# ---------------------------------------------------------------- ComfyUI
def link_pack(comfyui: Path) -> None:
    """Link the pack into custom_nodes under its pyproject name unless some entry there is the pack."""
    nodes = comfyui / "custom_nodes"
    if not nodes.is_dir():
        sys.exit(f"{nodes} does not exist: --comfyui must name a ComfyUI folder (the one with main.py).")
    if any(p.resolve() == ROOT for p in nodes.iterdir()):
        return
    (nodes / PACK_FOLDER).symlink_to(ROOT, target_is_directory=True)
    print(f"linked {nodes / PACK_FOLDER} -> {ROOT}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_comfyui(args: argparse.Namespace, workdir: Path, port: int) -> subprocess.Popen:
    user = workdir / "user"
    for folder in ("workflows", "subgraphs"):  # the frontend lists them on start (404 when absent)
        (user / "default" / folder).mkdir(parents=True)
    (user / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS), encoding="utf-8")
    command = [
        str(args.python),
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--preview-method",
        args.preview_method,
        "--user-directory",
        str(user),
        "--output-directory",
        str(args.out / "output"),
    ]
    log = (args.out / "comfyui.log").open("w", encoding="utf-8")
    # Its own process group, so that stopping it stops whatever it started.
    return subprocess.Popen(
        command, cwd=args.comfyui, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_comfyui(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def get_json(url: str, timeout: float = 30) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def wait_for_server(server: str, process: subprocess.Popen | None, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
            sys.exit(f"ComfyUI exited with code {process.returncode} before it served; log {log}:\n{tail}")
        try:
            get_json(f"{server}/api/system_stats", timeout=5)
            return
        except (urllib.error.URLError, OSError, ValueError):
            time.sleep(2)
    sys.exit(f"ComfyUI did not answer at {server} within {timeout:.0f} s; see {log}.")


def wait_for_history(server: str, prompt_id: str, timeout: float) -> tuple[bool, str]:
    """(success with an image, detail) from /history once the prompt ended."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        entry = get_json(f"{server}/api/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            seconds = time.monotonic() - started
            status = entry["status"]
            for kind, message in status.get("messages", []):
                if kind == "execution_error":
                    return False, (
                        f"node {message.get('node_id')} {message.get('node_type')}: "
                        f"{message.get('exception_type')}: {str(message.get('exception_message'))[:300]}"
                    )
            images = [i["filename"] for o in entry.get("outputs", {}).values() for i in o.get("images", [])]
            ok = status.get("status_str") == "success" and bool(images)
            return ok, f"{seconds:.1f} s, images {images}" if ok else f"{status.get('status_str')}, no image"
        time.sleep(1)
    return False, f"no result within {timeout:.0f} s (prompt {prompt_id})"


# ---------------------------------------------------------------- the browser
def watch(page: Any, events: Events) -> None:
    def console(message: Any) -> None:
        if message.type == "error":
            source = (message.location or {}).get("url") or ""
            events.items.append(f"console: {message.text[:300]} ({source})")

    def response(r: Any) -> None:
        if r.status >= 400:
            events.items.append(f"HTTP {r.status} {r.request.method} {r.url}")

    page.on("console", console)
    page.on("pageerror", lambda error: events.items.append(f"page error: {str(error)[:300]}"))
    page.on("requestfailed", lambda r: events.items.append(f"request failed: {r.url} ({r.failure})"))
    page.on("response", response)


def category_title(folder: str) -> str:
    """The template browser's name for the pack's category (locales/en/main.json), else the folder."""
    path = ROOT / "locales" / "en" / "main.json"
    try:
        titles = json.loads(path.read_text(encoding="utf-8"))["templateWorkflows"]["category"]
    except (OSError, ValueError, KeyError):
        return folder
    return titles.get(folder, folder)


def open_pack_templates(page: Any, folder: str) -> None:
    """The user's way: the Templates button of the sidebar, then the pack's category."""
    title = category_title(folder)
    if not page.get_by_role("dialog").filter(has_text=title).is_visible():
        close_dialogs(page)  # another dialog (a run's error) would be in the way
        page.get_by_role("button", name="Templates", exact=True).click()
    page.get_by_role("dialog").get_by_text(title, exact=True).first.click()
    page.locator('[data-testid^="template-workflow-"]').first.wait_for()


def close_dialogs(page: Any) -> None:
    """Close open dialogs (the template browser's close button has no label)."""
    page.keyboard.press("Escape")
    close = page.locator("[role=dialog] button:has(i.pi-times)")
    for i in reversed(range(close.count())):
        close.nth(i).click()


def thumbnails(page: Any, names: list[str]) -> dict[str, str]:
    """Scroll every card of the pack into view (the browser loads pictures lazily) and say, per
    workflow, what its card shows: "" when its picture loaded, else what is wrong."""
    shown = {}
    for name in names:
        card = page.locator(f'[data-testid="template-workflow-{name}"]')
        if card.count() == 0:
            shown[name] = "no card in the template browser"
            continue
        card.scroll_into_view_if_needed()
        try:
            card.locator("img").first.wait_for(timeout=10_000)
            page.wait_for_function(JS_CARD_PICTURE, arg=[card.element_handle(), name], timeout=10_000)
            shown[name] = ""
        except Exception:  # playwright's TimeoutError: report it as the check's detail
            shown[name] = "no picture on its card (the frontend's default-template.png or none)"
    return shown


def load_editor(page: Any, server: str) -> None:
    page.goto(server)
    page.wait_for_function("() => window.app?.graph && window.app?.canvas", timeout=120_000)
    page.wait_for_timeout(2000)  # the frontend's extensions settle


def check_layout(page: Any, report: Report, name: str) -> None:
    layout = page.evaluate(JS_LAYOUT)
    hidden = []
    for item in layout["nodes"] + layout["groups"]:
        label = f"node {item['id']} {item['title']}" if "id" in item else f"group {item['title']}"
        covered = page.evaluate(JS_COVERED, item["screen"])
        if covered:
            x, y, what = covered[0]
            hidden.append(f"{label} at ({x},{y}) under {what} ({len(covered)} points)")
    report.check(name, "visible", not hidden, "; ".join(hidden[:4]))
    overlaps = []
    for kind in ("nodes", "groups"):
        items = layout[kind]
        for i, a in enumerate(items):
            for b in items[i + 1 :]:
                if intersect(a["box"], b["box"]):
                    overlaps.append(f"{a.get('id', a['title'])} and {b.get('id', b['title'])}")
    for a in layout["nodes"]:
        for b in layout["nodes"]:
            if a is not b and a["badge"] and intersect(a["badge"], b["box"]):
                overlaps.append(f"node {a['id']}'s source badge covers node {b['id']}")
    report.check(name, "overlap", not overlaps, "; ".join(overlaps))
    cut = page.evaluate(JS_CUT_TEXT)
    report.check(name, "text", not cut, "; ".join(cut))


def intersect(a: list[float], b: list[float]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def check_unmodified(page: Any, report: Report, name: str, workflow: dict) -> None:
    state = page.evaluate(JS_MODIFIED)
    saved = page.evaluate(JS_SAVED_WIDGETS)
    changed = [
        f"node {n['id']} {n['type']}: {n.get('widgets_values')} -> {saved.get(str(n['id']))}"
        for n in workflow["nodes"]
        if "widgets_values" in n and n["widgets_values"] != saved.get(str(n["id"]))
    ]
    if state["modified"]:
        changed.insert(0, "the editor marks it modified")
    report.check(name, "unmodified", not changed, "; ".join(changed)[:600])


def check_previews(page: Any, report: Report, name: str, method: str, workflow: dict) -> None:
    samplers = {str(n["id"]) for n in workflow["nodes"] if n["type"] in SAMPLERS}
    previewed = {key.split(":")[-1] for key in page.evaluate(JS_PREVIEWS)}
    if method == "none":
        shown = sorted(samplers & previewed)
        detail = f"latent previews on nodes {shown}" if shown else "none shown"
        report.check(name, "previews", not shown, detail)
    else:
        detail = f"nodes with a preview: {sorted(previewed)}"
        report.check(name, "previews", bool(samplers & previewed), detail)


def run_workflow(page: Any, args: argparse.Namespace, server: str, report: Report, name: str) -> None:
    if args.quick:
        page.evaluate(JS_QUICK, {"types": list(SAMPLERS), "set": QUICK})

    def is_queue(r: Any) -> bool:
        return r.url.endswith("/api/prompt") and r.request.method == "POST"

    with page.expect_response(is_queue) as queued:
        page.get_by_role("button", name="Run", exact=True).first.click()
    response = queued.value
    if response.status != 200:
        report.check(name, "run", False, f"refused: {response.text()[:600]}")
        return
    ok, detail = wait_for_history(server, response.json()["prompt_id"], args.run_timeout)
    report.check(name, "run", ok, detail)
    if ok:  # the Save Image node shows the picture once the frontend fetched it
        try:
            page.wait_for_function(
                "() => window.app.graph.nodes.some(n => n.type === 'SaveImage' && n.imgs?.length)",
                timeout=15_000,
            )
        except Exception:  # a screenshot without the picture still shows the rest
            pass


def check_workflow(
    page: Any, args: argparse.Namespace, server: str, report: Report, events: Events, path: Path, thumb: str
) -> None:
    name = path.stem
    workflow = json.loads(path.read_text(encoding="utf-8"))
    # Each workflow in a freshly loaded editor, as a user opening it first: nothing left over from
    # the last run (its job-queue bar, dialogs) over the canvas.
    load_editor(page, args.server_url)
    events.take()
    open_pack_templates(page, args.folder)
    page.locator(f'[data-testid="template-workflow-{name}"]').click()
    page.wait_for_function(
        "([file, count]) => window.app.extensionManager.workflow.activeWorkflow?.path?.endsWith(file)"
        " && window.app.graph.nodes.length === count",
        arg=[f"/{name}.json", len(workflow["nodes"])],
        timeout=30_000,
    )
    page.wait_for_timeout(1500)  # pictures of Load Image nodes, the change tracker's first check
    report.check(name, "thumbnail", not thumb, thumb)
    check_layout(page, report, name)
    check_unmodified(page, report, name, workflow)
    page.screenshot(path=str(args.out / f"{name}_open.png"))
    errors = events.take()
    report.check(name, "open-errors", not errors, "; ".join(errors)[:600])
    run_workflow(page, args, server, report, name)
    page.wait_for_timeout(500)
    page.screenshot(path=str(args.out / f"{name}_run.png"))
    errors = events.take()
    report.check(name, "run-errors", not errors, "; ".join(errors)[:600])
    check_previews(page, report, name, args.preview_method, workflow)


def browse(args: argparse.Namespace, server: str, report: Report) -> None:
    args.server_url = server
    from playwright.sync_api import sync_playwright  # a dev dependency: only this tool needs it

    paths = sorted((ROOT / "example_workflows").glob("*.json"))
    if args.only:
        paths = [p for p in paths if p.stem in args.only]
    with tempfile.TemporaryDirectory(prefix="editor_check_profile_") as profile, sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            profile,
            executable_path=args.chromium,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=WINDOW,
            device_scale_factor=1,
        )
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            events = Events()
            watch(page, events)
            load_editor(page, server)
            startup = [e for e in events.take() if not any(n in e for n in STARTUP_NOISE)]
            report.check("(startup)", "errors", not startup, "; ".join(startup)[:600])
            open_pack_templates(page, args.folder)
            shown = thumbnails(page, [p.stem for p in paths])
            page.locator('[data-testid^="template-workflow-"]').first.scroll_into_view_if_needed()
            page.wait_for_timeout(500)
            page.screenshot(path=str(args.out / "template_browser.png"))
            errors = events.take()
            report.check("(templates)", "errors", not errors, "; ".join(errors)[:600])
            for path in paths:
                try:
                    check_workflow(page, args, server, report, events, path, shown.get(path.stem, ""))
                except Exception as error:  # one broken workflow must not hide the others' results
                    report.check(path.stem, "open", False, f"{type(error).__name__}: {str(error)[:300]}")
                    close_dialogs(page)
        finally:
            browser.close()


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", type=Path, help="a ComfyUI folder (the one with main.py)")
    ap.add_argument("--python", type=Path, help="ComfyUI's Python (default: COMFYUI/venv/bin/python)")
    ap.add_argument("--out", type=Path, default=ROOT / "editor_check_out", help="screenshots and logs")
    ap.add_argument("--quick", action="store_true", help="run the samplers at 2 steps, 64x64")
    ap.add_argument("--preview-method", default="none", choices=("none", "auto", "latent2rgb", "taesd"))
    ap.add_argument("--only", nargs="*", help="workflow names (file names without .json)")
    ap.add_argument("--run-timeout", type=float, default=600, help="seconds per workflow run")
    ap.add_argument("--chromium", default=CHROMIUM, help="the Chromium executable")
    ap.add_argument("--server", help="use this running ComfyUI (http://host:port) instead of starting one")
    args = ap.parse_args(argv)
    if not args.server and (args.comfyui is None or not (args.comfyui / "main.py").is_file()):
        ap.error("--comfyui must name a ComfyUI folder with main.py (or give --server)")
    if args.comfyui is not None:
        args.comfyui = args.comfyui.resolve()
        venv = args.comfyui / "venv" / "bin" / "python"
        args.python = args.python or (venv if venv.exists() else Path(sys.executable))
    args.folder = PACK_FOLDER
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which(args.chromium) is None:
        sys.exit(f"No Chromium at {args.chromium}: apt-get install chromium, or pass --chromium PATH.")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report()
    # SIGTERM as Ctrl-C, so that the finally blocks stop ComfyUI and the browser; SIGINT too when
    # the shell started this in the background with SIGINT ignored.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.server:
        browse(args, args.server.rstrip("/"), report)
        return report.summary()
    link_pack(args.comfyui)
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="editor_check_") as workdir:
        process = start_comfyui(args, Path(workdir), port)
        try:
            print(f"ComfyUI starting at {server} (log {args.out / 'comfyui.log'})", flush=True)
            wait_for_server(server, process, args.out / "comfyui.log", timeout=600)
            browse(args, server, report)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            stop_comfyui(process)
    return report.summary()


if __name__ == "__main__":
    sys.exit(main())
