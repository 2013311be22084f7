"""Re-save workflows as ComfyUI's editor saves them with the nodes as they are now.

    .venv/bin/python scripts/resave_workflows.py [example_workflows/*.json]

Widget values are re-read by name (a widget added since gets its default), sockets follow the
node's INPUT_TYPES (links kept), nodes grow to the height their widgets need, and the saved view
is set to show the whole graph in a 1600x1000 window. Positions are kept: move overlapping nodes
by hand (tests/test_workflow_widgets.py says which).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pack_modules():
    spec = importlib.util.spec_from_file_location("_diffusers_adapters_cli", ROOT / "cli.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    pack = cli.load_pack()
    layout = importlib.import_module(f"{cli.PACK_NAME}.headless.editor_layout")
    standins = importlib.import_module(f"{cli.PACK_NAME}.headless.standin_nodes")
    return layout, {**standins.STANDIN_NODE_CLASS_MAPPINGS, **pack.NODE_CLASS_MAPPINGS}


def main(paths: list[str]) -> int:
    layout, classes = _pack_modules()
    for path in [Path(p) for p in paths] or sorted((ROOT / "example_workflows").glob("*.json")):
        workflow = json.loads(path.read_text(encoding="utf-8"))
        layout.resave_workflow(workflow, classes)
        layout.fit_view(workflow)
        path.write_text(json.dumps(workflow, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
