"""Batch rendering in one process (headless/batch): sweep specs and their refusals, exact ranges,
the same images as separate `cli.py run` calls, PNG metadata that restores the item, resume, a
failing item among good ones, contact sheet geometry and HTML escaping.

The runs use the demo's tiny SD1.x checkpoint and LoRA at 64x64 with 2 steps."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import batch_lib as lib
import numpy as np
import pytest
from batch_lib import BROKEN_LORA, LORA_STRENGTH_AT, ROOT, SEED_AT, SEEDS, STRENGTHS
from PIL import Image

from comfyui_diffusers_adapters.headless import batch, demo
from comfyui_diffusers_adapters.headless.batch import contact_sheet, manifest, sweep
from comfyui_diffusers_adapters.headless.runner import WorkflowRunner, WorkflowValidationError
from comfyui_diffusers_adapters.headless.standin_nodes import STANDIN_NODE_CLASS_MAPPINGS
from comfyui_diffusers_adapters.headless.ui_workflow import ui_to_api
from comfyui_diffusers_adapters.nodes import NODE_CLASS_MAPPINGS, comfy_host


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return lib.write_models(tmp_path_factory.mktemp("batch") / "models")


@pytest.fixture
def host(models, tmp_path):
    with lib.host_folders(models, tmp_path) as folder:
        yield folder


def _axes(spec: list, base: Path = ROOT) -> list[sweep.Axis]:
    return sweep.parse_spec(spec, base)


# ------------------------------------------------------------------ spec parsing
def test_ranges_are_exact_decimals():
    assert sweep.decimal_range(0.2, 1.2, 0.2) == [0.2, 0.4, 0.6, 0.8, 1.0, 1.2]
    assert sweep.decimal_range(0.1, 0.3, 0.1) == [0.1, 0.2, 0.3]  # 0.1 + 0.2 is 0.30000000000000004
    assert sweep.decimal_range(1, 10, 3) == [1, 4, 7, 10]
    assert all(isinstance(v, int) for v in sweep.decimal_range(1, 10, 3))
    assert sweep.decimal_range(1.0, 0.0, -0.5) == [1.0, 0.5, 0.0]


@pytest.mark.parametrize(
    "bounds, message",
    [
        ([0, 1, 0], "never goes"),
        ([1, 0, 0.5], "never goes"),
        ([0, 1, "x"], "not a number"),
        ([0, "nan", 1], "finite"),
        ([0, 1_000_000, 1], "at most 10000"),
        ([True, 2, 1], "must be numbers"),
    ],
)
def test_bad_ranges_are_refused(bounds, message):
    with pytest.raises(sweep.SweepError, match=message):
        sweep.decimal_range(*bounds)


@pytest.mark.parametrize(
    "spec, message",
    [
        ([], "at least one axis"),
        ({"axes": "seed"}, "at least one axis"),
        ([{"node": "Sampler", "values": [1]}], "'input' must name"),
        ([{"input": "seed", "values": [1]}], "'node' must be"),
        ([{"node": "S", "input": "seed"}], "exactly one of"),
        ([{"node": "S", "input": "seed", "values": [1], "range": [1, 2, 1]}], "exactly one of"),
        ([{"node": "S", "input": "seed", "values": []}], "no values"),
        ([{"node": "S", "input": "seed", "values": 3}], "must be a list"),
        ([{"node": "S", "input": "seed", "values": [[1]]}], "not a text, number"),
        ([{"node": "S", "input": "seed", "range": [1, 2]}], r"\[start, stop, step\]"),
        ([{"node": "S", "input": "seed", "values": [1], "valeus": 2}], "unknown field 'valeus'"),
        ([{"node": "S", "input": "seed", "lines": "missing.txt"}], "Cannot read the lines file"),
        ([{"node": "S", "input": "x", "values": [1]}] * 9, "at most 8"),
    ],
)
def test_bad_specs_are_refused_naming_the_problem(spec, message):
    with pytest.raises(sweep.SweepError, match=message):
        _axes(spec)


def test_lines_and_set_flags(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red fox\n\n  a blue bird  \n", encoding="utf-8")
    (axis,) = _axes([{"node": "Sampler", "input": "prompt", "lines": "prompts.txt"}], tmp_path)
    assert axis.values == ("a red fox", "a blue bird")
    assert sweep.parse_set_flag("Diffusers Sampler.seed=1,2,3").values == (1, 2, 3)
    assert sweep.parse_set_flag("My.title.v2.seed=[4, 5]") == sweep.Axis("My.title.v2", "seed", (4, 5))
    ranged = sweep.parse_set_flag('L.strength_model={"range": [0.2, 0.6, 0.2]}')
    assert ranged.values == (0.2, 0.4, 0.6)
    assert sweep.parse_set_flag("L.lora_name=a.safetensors,b.safetensors").values == (
        "a.safetensors",
        "b.safetensors",
    )
    with pytest.raises(sweep.SweepError, match="NODE.INPUT=VALUES"):
        sweep.parse_set_flag("seed=1,2")


def test_load_spec_reads_json_files(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"axes": [SEEDS]}), encoding="utf-8")
    assert sweep.load_spec(path)[0].values == (1, 2)
    path.write_text("[{", encoding="utf-8")
    with pytest.raises(sweep.SweepError, match="not valid JSON"):
        sweep.load_spec(path)


# ------------------------------------------------------------------ spec against the workflow
def test_axes_are_found_by_id_title_and_display_name(host):
    workflow = lib.workflow()
    sampler = lib.node(workflow, "Sampler")
    sampler["title"] = "My sampler"
    targets = lib.resolve(
        [
            {"node": str(sampler["id"]), "input": "seed", "values": [1]},
            {"node": "My sampler", "input": "steps", "values": [2]},
            STRENGTHS,
        ],
        workflow,
    )
    assert [t.node_id for t in targets] == [str(sampler["id"])] * 2 + [
        str(lib.node(workflow, "LoadLoRA")["id"])
    ]
    assert targets[2].values == (0.2, 0.7, 1.2)
    # the loader is upstream of the sampler: its axis varies slowest when the items run
    assert targets[2].depth < targets[0].depth


@pytest.mark.parametrize(
    "axis, error, message",
    [
        (
            {"node": "Nope", "input": "seed", "values": [1]},
            sweep.SweepError,
            "no node has the id or title 'Nope'",
        ),
        ({"node": "Diffusers Sampler", "input": "sed", "values": [1]}, sweep.SweepError, "no input 'sed'"),
        ({"node": "Diffusers Sampler", "input": "pipeline", "values": [1]}, sweep.SweepError, "linked"),
        (
            {"node": "Diffusers Sampler", "input": "steps", "values": [2, 0]},
            WorkflowValidationError,
            "minimum",
        ),
        (
            {"node": "LoRA Loader (Diffusers)", "input": "lora_name", "values": ["missing.safetensors"]},
            WorkflowValidationError,
            "missing.safetensors",
        ),
        (
            {"node": "Diffusers Sampler", "input": "seed", "values": ["abc"]},
            WorkflowValidationError,
            "convert",
        ),
    ],
)
def test_bad_axes_are_refused_before_anything_runs(host, axis, error, message):
    runner = lib.new_runner()
    with pytest.raises(error, match=message):
        lib.resolve([axis], runner=runner)
    assert runner.executed == []


def test_ambiguous_titles_and_too_many_items_are_refused(host):
    workflow = lib.workflow()
    for node in workflow["nodes"]:
        node["title"] = "Same"
    with pytest.raises(sweep.SweepError, match="nodes are called 'Same'"):
        lib.resolve([{"node": "Same", "input": "seed", "values": [1]}], workflow)
    big = [{**SEEDS, "range": [1, 200, 1]}, {**STRENGTHS, "range": [0.0, 1.0, 0.01]}]
    big[0].pop("values")
    with pytest.raises(sweep.SweepError, match="20200 items; at most 10000"):
        lib.resolve(big)


def test_the_saved_value_of_a_swept_input_does_not_matter(host):
    """A shared workflow names a checkpoint the user does not have; sweeping that input is enough."""
    workflow = lib.workflow()
    lib.node(workflow, "LoadDreamBooth")["widgets_values"][0] = "not_here.safetensors"
    with pytest.raises(WorkflowValidationError, match="not_here"):
        lib.resolve([SEEDS], workflow)
    checkpoints = {"node": "1", "input": "checkpoint", "values": [demo.DEMO_CHECKPOINT]}
    (target, _) = lib.resolve([checkpoints, SEEDS], workflow)
    assert (target.node_id, target.position, target.depth) == ("1", 0, 0)


def test_an_input_swept_twice_is_refused(host):
    with pytest.raises(sweep.SweepError, match="swept twice"):
        lib.resolve([SEEDS, {"node": "2", "input": "seed", "values": [3]}])


def test_api_prompts_are_swept_in_their_inputs(host):
    prompt = {k: v for k, v in ui_to_api(lib.workflow(), lib.new_runner().node_classes).items()}
    targets = lib.resolve([SEEDS, STRENGTHS], prompt)
    item = sweep.items_in_run_order(targets)[-1]
    changed = sweep.item_workflow(prompt, targets, item)
    assert changed["2"]["inputs"]["seed"] == 2 and changed["10"]["inputs"]["strength_model"] == 1.2
    assert prompt["2"]["inputs"]["seed"] == 42  # the base is not touched


def test_item_workflow_sets_the_widget_value_and_nothing_else(host):
    workflow = lib.workflow()
    targets = lib.resolve([SEEDS, STRENGTHS], workflow)
    items = sweep.items_in_run_order(targets)
    assert len(items) == 6
    item = next(i for i in items if i.coords == (1, 2))
    changed = sweep.item_workflow(workflow, targets, item)
    expected = copy.deepcopy(workflow)
    lib.node(expected, "Sampler")["widgets_values"][SEED_AT] = 2
    lib.node(expected, "LoadLoRA")["widgets_values"][LORA_STRENGTH_AT] = 1.2
    assert changed == expected
    # run order: the LoRA strength (upstream) changes slowest, the seed fastest
    assert [i.coords for i in items] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]


# ------------------------------------------------------------------ runs
@pytest.mark.slow
def test_a_2x3_sweep_gives_the_images_of_six_separate_runs(host, models, tmp_path):
    workflow = lib.workflow()
    targets = lib.resolve([SEEDS, STRENGTHS], workflow)
    report = batch.run_batch(lib.new_runner(), workflow, targets, tmp_path / "batch", stream=io.StringIO())
    assert (report.done, report.failed, report.images) == (6, 0, 6)
    singles = lib.separate_runs(tmp_path, workflow, models)
    record = json.loads((tmp_path / "batch" / "batch.json").read_text())["items"]
    for index, (seed, strength) in enumerate([(s, v) for s in (1, 2) for v in (0.2, 0.7, 1.2)]):
        (image,) = record[str(index)]["images"]
        assert record[str(index)]["values"] == {"Diffusers Sampler.seed": seed, SWEPT_STRENGTH: strength}
        assert np.array_equal(lib.pixels(tmp_path / "batch" / image), lib.pixels(singles[seed, strength])), (
            index
        )
    # the images differ along both axes (the sweep did change something)
    first = lib.pixels(singles[1, 0.2])
    assert not np.array_equal(first, lib.pixels(singles[2, 0.2]))
    assert not np.array_equal(first, lib.pixels(singles[1, 1.2]))


SWEPT_STRENGTH = "LoRA Loader (Diffusers).strength_model"


@pytest.mark.slow
def test_png_metadata_restores_the_item(host, tmp_path):
    workflow = lib.workflow()
    targets = lib.resolve([{**SEEDS, "values": [7]}, {**STRENGTHS, "range": [0.5, 0.5, 1]}], workflow)
    batch.run_batch(lib.new_runner(), workflow, targets, tmp_path / "b", stream=io.StringIO())
    with Image.open(tmp_path / "b" / "images" / "00000_0.png") as img:
        text = dict(img.text)
    (item,) = sweep.items_in_run_order(targets)
    assert json.loads(text["workflow"]) == sweep.item_workflow(workflow, targets, item)
    assert lib.node(json.loads(text["workflow"]), "Sampler")["widgets_values"][SEED_AT] == 7
    prompt = json.loads(text["prompt"])
    sampler_id = str(lib.node(workflow, "Sampler")["id"])
    assert prompt[sampler_id]["inputs"]["seed"] == 7
    assert json.loads(text[batch.SWEEP_KEY]) == {
        "index": 0,
        "values": {"Diffusers Sampler.seed": 7, SWEPT_STRENGTH: 0.5},
    }


class CountingRunner(WorkflowRunner):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.calls = 0

    def run(self, workflow, extra_pnginfo=None):
        self.calls += 1
        return super().run(workflow, extra_pnginfo)


@pytest.mark.slow
def test_rerun_skips_done_items_and_a_failing_item_does_not_stop_the_rest(host, tmp_path):
    workflow = lib.workflow()
    loras = {"node": "LoRA Loader (Diffusers)", "input": "lora_name", "values": [demo.DEMO_LORA, BROKEN_LORA]}
    targets = lib.resolve([loras, {**SEEDS, "values": [1, 2]}], workflow)
    runner = CountingRunner({**STANDIN_NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS})
    log = io.StringIO()
    report = batch.run_batch(runner, workflow, targets, tmp_path / "b", stream=log)
    assert (runner.calls, report.done, report.failed) == (4, 2, 2)
    items = json.loads((tmp_path / "b" / "batch.json").read_text())["items"]
    assert [items[str(i)]["status"] for i in range(4)] == ["done", "done", "failed", "failed"]
    assert BROKEN_LORA in items["2"]["error"]
    assert sorted(p.name for p in (tmp_path / "b" / "images").iterdir()) == ["00000_0.png", "00001_0.png"]
    assert "FAILED" in log.getvalue() and "images/s" in log.getvalue() and "ETA" in log.getvalue()
    assert not (tmp_path / "b" / ".partial").exists()

    # a rerun runs only what is not done (the failed items get another try)
    again = CountingRunner({**STANDIN_NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS})
    report = batch.run_batch(again, workflow, targets, tmp_path / "b", stream=io.StringIO())
    assert (again.calls, report.skipped, report.failed) == (2, 2, 2)
    # an image that went missing is rendered again; a changed workflow reruns its items
    (tmp_path / "b" / "images" / "00001_0.png").unlink()
    lib.node(workflow, "Sampler")["widgets_values"][1] = "a changed negative prompt"
    targets = lib.resolve([{**loras, "values": [demo.DEMO_LORA]}, {**SEEDS, "values": [1, 2]}], workflow)
    third = CountingRunner({**STANDIN_NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS})
    report = batch.run_batch(third, workflow, targets, tmp_path / "b", stream=io.StringIO())
    assert (third.calls, report.done) == (2, 2)


class InterruptedRunner(CountingRunner):
    """Ctrl-C while the third item runs."""

    def run(self, workflow, extra_pnginfo=None):
        if self.calls == 2:
            self.calls += 1
            raise KeyboardInterrupt
        return super().run(workflow, extra_pnginfo)


@pytest.mark.slow
def test_ctrl_c_leaves_finished_items_recorded_and_nothing_half_written(host, tmp_path):
    workflow = lib.workflow()
    targets = lib.resolve([{**SEEDS, "values": [1, 2, 3, 4]}], workflow)
    runner = InterruptedRunner({**STANDIN_NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS})
    with pytest.raises(KeyboardInterrupt):
        batch.run_batch(runner, workflow, targets, tmp_path / "b", stream=io.StringIO())
    items = json.loads((tmp_path / "b" / "batch.json").read_text())["items"]
    assert sorted(items) == ["0", "1"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["batch.json", "images"]
    assert comfy_host.output_directory() == (tmp_path / "b").resolve()  # not the scratch folder
    again = CountingRunner({**STANDIN_NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS})
    report = batch.run_batch(again, workflow, targets, tmp_path / "b", stream=io.StringIO())
    assert (again.calls, report.skipped, report.done) == (2, 2, 2)


def test_manifest_is_refused_when_it_is_not_ours(tmp_path):
    (tmp_path / "batch.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(manifest.ManifestError, match="not a version 1 batch manifest"):
        manifest.Manifest.open(tmp_path)
    (tmp_path / "batch.json").write_bytes(b"\xff{")
    with pytest.raises(manifest.ManifestError, match="delete it"):
        manifest.Manifest.open(tmp_path)


def test_manifest_write_is_atomic(tmp_path, monkeypatch):
    book = manifest.Manifest.open(tmp_path)
    book.record(0, {"status": "done", "images": []})
    book.save()
    before = (tmp_path / "batch.json").read_bytes()

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(manifest.json, "dump", fail)
    with pytest.raises(KeyboardInterrupt):
        book.save()
    assert (tmp_path / "batch.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["batch.json"]  # no temp file left behind


# ------------------------------------------------------------------ contact sheet and HTML
def _solid(folder: Path, name: str, colour: tuple[int, int, int], side: int = 32) -> str:
    (folder / "images").mkdir(exist_ok=True)
    Image.new("RGB", (side, side), colour).save(folder / "images" / name)
    return f"images/{name}"


def test_contact_sheet_grid(tmp_path):
    axes = [("Sampler.seed", [1, 2]), ("LoRA.strength", [0.2, 0.7, 1.2])]
    results = {}
    for r in range(2):
        for c in range(3):
            colour = (40 * r + 10, 60 * c + 10, 200)
            results[r, c] = ([_solid(tmp_path, f"{r}{c}.png", colour)], "")
    results[1, 2] = ([], "failed")
    (written,) = contact_sheet.write_sheets(axes, results, tmp_path, 32)
    with Image.open(written.path) as img:
        sheet = np.asarray(img.convert("RGB"))
    layout = written.layout
    assert (layout.rows, layout.cols, layout.cell) == (2, 3, 32)
    assert sheet.shape[:2] == (layout.size[1], layout.size[0])
    for r in range(2):
        for c in range(3):
            y, x = layout.top + r * 32 + 16, layout.left + c * 32 + 16
            expected = contact_sheet.EMPTY_CELL if (r, c) == (1, 2) else (40 * r + 10, 60 * c + 10, 200)
            assert tuple(sheet[y, x]) == expected, (r, c)


def test_one_axis_is_one_row_and_extra_axes_make_more_sheets(tmp_path):
    one = {(i,): ([_solid(tmp_path, f"{i}.png", (i * 50, 0, 0))], "") for i in range(4)}
    (written,) = contact_sheet.write_sheets([("seed", [1, 2, 3, 4])], one, tmp_path, 32)
    assert (written.layout.rows, written.layout.cols) == (1, 4)
    axes = [("a", [1, 2]), ("b", [1]), ("c", ["x", "y", "z"])]
    three = {
        (r, 0, k): ([_solid(tmp_path, f"{r}{k}.png", (0, 0, 0))], "") for r in range(2) for k in range(3)
    }
    sheets = contact_sheet.write_sheets(axes, three, tmp_path, 32)
    assert [s.path.name for s in sheets] == [f"contact_sheet_00{k}.png" for k in (1, 2, 3)]
    assert [s.page.title for s in sheets] == ["c = x", "c = y", "c = z"]
    assert all((s.layout.rows, s.layout.cols) == (2, 1) for s in sheets)


def test_huge_grids_shrink_their_cells():
    layout = contact_sheet.layout_for(["r"] * 100, 100, 512, 12, 40)
    assert max(layout.size) <= contact_sheet.MAX_SHEET_SIDE
    assert layout.cell >= contact_sheet.MIN_CELL


def test_index_html_escapes_every_value(tmp_path):
    hostile = '<script>alert("x")</script>'
    axes = [(f"Sampler.{hostile}", [hostile, "ok"]), ("b&c", ['"quoted"'])]
    name = _solid(tmp_path, 'a"b<c>.png', (1, 2, 3))
    results = {(0, 0): ([name], ""), (1, 0): ([], f"failed {hostile}")}
    sheets = contact_sheet.write_sheets(axes, results, tmp_path, 32)
    page = contact_sheet.index_html(axes, sheets, f"title {hostile}")
    assert "<script>" not in page and 'a"b' not in page
    assert "&lt;script&gt;" in page and "b&amp;c" in page and "&quot;quoted&quot;" in page
    assert 'href="images/a%22b%3Cc%3E.png"' in page
    # a long prompt is cut on the sheet but shown whole on the page
    long = "a very long prompt " * 10
    sheets = contact_sheet.write_sheets([("p", [long])], {(0,): ([name], "")}, tmp_path, 32)
    assert sheets[0].page.cols == [long] and long in contact_sheet.index_html([("p", [long])], sheets, "t")


def test_cli_batch_refuses_a_bad_sweep_with_status_2(host, models, tmp_path, capsys):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(lib.workflow()), encoding="utf-8")
    common = ["batch", str(path), "--models", str(models), "--output", str(tmp_path / "b")]
    assert lib.load_cli().main([*common, "--set", "Nope.seed=1,2"]) == 2
    assert "no node has the id or title 'Nope'" in capsys.readouterr().err
    assert lib.load_cli().main(common) == 2
    assert "--sweep" in capsys.readouterr().err
    assert lib.load_cli().main([*common, "--set", "Diffusers Sampler.steps=2,-1"]) == 2
    assert "minimum" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_cli_batch_runs_a_sweep(host, models, tmp_path, capsys):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(lib.workflow()), encoding="utf-8")
    (tmp_path / "spec.json").write_text(json.dumps([{**SEEDS, "values": [3]}]), encoding="utf-8")
    args = ["batch", str(path), "--sweep", str(tmp_path / "spec.json"), "--models", str(models)]
    assert lib.load_cli().main([*args, "--output", str(tmp_path / "b"), "--engine", "local"]) == 0
    assert "1 done, 0 already done, 0 failed" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "batch.json",
        "contact_sheet.png",
        "images",
        "index.html",
    ]
