"""Textual-inversion benchmarks: the pack against plain diffusers, and re-runs that reload nothing.

    python benchmarks/bench_textual_inversion.py [--reps N] [--threads N]

1. Embedding load time: the pack (LoadTextualInversion on a cold embedding-file cache + `materialized`:
   file read, validation, and diffusers' load into the tokenizer and text encoder) against plain
   diffusers on a deep copy of the same pipeline, for
   - an A1111 .pt (8 vectors) on the tiny SD1 pipeline, and on the same pipeline with an SD1.5-size
     text encoder (CLIPTextModel: hidden 768, 12 layers, vocab 49408, random weights):
     diffusers `pipe.load_textual_inversion(path, token=...)`;
   - an SDXL clip_l/clip_g .safetensors (8 vectors) on the tiny SDXL pipeline: diffusers'
     documented way, `safetensors.torch.load_file` and one `load_textual_inversion` per encoder.
   Between repetitions each side is undone untimed (pack: materialize the handle without it;
   diffusers: `unload_textual_inversion`). Pack and diffusers alternate (and which goes first), after a
   warm-up; medians; the loaded embedding rows of both are compared once. Target: pack <= 1.2x.
2. Re-runs: an API workflow (LoadDreamBooth -> LoadTextualInversion -> Sampler 64x64, 2 steps ->
   PreviewImage) run three times with one WorkflowRunner: unchanged (nothing executes, no embedding
   file is read, `load_textual_inversion` is not called), then with only the seed changed (only the
   sampler and the preview after it run; no read, no load).

CPU, fp32, 1 torch thread by default (steadier when other processes share the cores). The script
always exits 0; PASS/FAIL lines report the targets.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("DIFFUSERS_ADAPTERS_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pack import ROOT, SD15_TEXT, load_pack, pack_module, verdict  # noqa: E402

LOAD_TARGET = 1.2
VECTORS = 8


def test_helpers():
    """tests/embedding_files_lib.py and tests/testlib.py (the latter imports the pack by name)."""
    load_pack()
    if str(ROOT / "tests") not in sys.path:
        sys.path.append(str(ROOT / "tests"))
    import embedding_files_lib

    import testlib

    return embedding_files_lib, testlib


# ------------------------------------------------------------------------------ 1. load time
class Case:
    """One embedding file on one pipeline, loaded by the pack and by diffusers (on a deep copy)."""

    def __init__(self, label: str, pipe, family: str, folder: Path, file_name: str, token: str):
        base_models = pack_module("loaders.base_models")
        handle_mod = pack_module("loaders.pipeline_handle")
        self.label, self.family, self.token = label, family, token
        self.path = folder / file_name
        self.file_name = file_name
        base = base_models.BaseModel(pipe, family, label, torch.float32, torch.device("cpu"), "epsilon")
        self.empty = handle_mod.PipelineHandle(base)
        self.pipe = pipe
        self.dpipe = copy.deepcopy(pipe)
        self.node = pack_module("nodes.load_textual_inversion").LoadTextualInversion()
        self.materialized = handle_mod.materialized
        self.clear_cache = pack_module("loaders.embedding_files").clear_embedding_cache
        self.slots = (
            [("clip_l", "tokenizer", "text_encoder"), ("clip_g", "tokenizer_2", "text_encoder_2")]
            if family == "sdxl"
            else [(None, "tokenizer", "text_encoder")]
        )

    # pack
    def pack_load(self) -> float:
        self.clear_cache()
        t = time.perf_counter()
        handle, _ = self.node.load(self.empty, self.file_name, self.token)["result"]
        with self.materialized(handle):
            pass
        return time.perf_counter() - t

    def pack_undo(self) -> None:
        with self.materialized(self.empty):
            pass

    # diffusers
    def diffusers_load(self) -> float:
        pipe = self.dpipe
        t = time.perf_counter()
        if self.family == "sdxl":
            from safetensors.torch import load_file

            state = load_file(str(self.path))
            for key, tok_attr, enc_attr in self.slots:
                pipe.load_textual_inversion(
                    state[key],
                    token=self.token,
                    tokenizer=getattr(pipe, tok_attr),
                    text_encoder=getattr(pipe, enc_attr),
                )
        else:
            pipe.load_textual_inversion(str(self.path), token=self.token)
        return time.perf_counter() - t

    def diffusers_undo(self) -> None:
        pipe = self.dpipe
        for _, tok_attr, enc_attr in self.slots:
            pipe.unload_textual_inversion(
                tokenizer=getattr(pipe, tok_attr), text_encoder=getattr(pipe, enc_attr)
            )

    def rows(self, pipe) -> list[torch.Tensor]:
        """The embedding rows of the token and its sub-tokens, per encoder."""
        out = []
        for _, tok_attr, enc_attr in self.slots:
            tokenizer, encoder = getattr(pipe, tok_attr), getattr(pipe, enc_attr)
            names = [self.token] + [f"{self.token}_{i}" for i in range(1, VECTORS)]
            ids = tokenizer.convert_tokens_to_ids(names)
            out.append(encoder.get_input_embeddings().weight[ids].detach().clone())
        return out

    def same_result(self) -> bool:
        handle, _ = self.node.load(self.empty, self.file_name, self.token)["result"]
        with self.materialized(handle) as pipe:
            ours = self.rows(pipe)
        self.pack_undo()
        self.diffusers_load()
        theirs = self.rows(self.dpipe)
        self.diffusers_undo()
        vocab_back = all(
            len(getattr(p, tok)) == getattr(p, enc).get_input_embeddings().weight.shape[0]
            for p in (self.pipe, self.dpipe)
            for _, tok, enc in self.slots
        )
        return vocab_back and all(torch.equal(a, b) for a, b in zip(ours, theirs))


def get_vocab_calls(case: Case) -> tuple[int, int]:
    """How often each side calls `tokenizer.get_vocab()` (a full vocabulary dict) in one load."""
    classes = {type(getattr(case.pipe, tok)) for _, tok, _ in case.slots}
    counts = [0]
    originals = {cls: cls.get_vocab for cls in classes}

    def counting(fn):
        def counted(self):
            counts[0] += 1
            return fn(self)

        return counted

    for cls, fn in originals.items():
        cls.get_vocab = counting(fn)
    try:
        case.pack_load()
        pack, counts[0] = counts[0], 0
        case.diffusers_load()
        diffusers = counts[0]
    finally:
        for cls, fn in originals.items():
            cls.get_vocab = fn
    case.pack_undo()
    case.diffusers_undo()
    return pack, diffusers


def run_case(case: Case, reps: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        case.pack_load()
        case.pack_undo()
        case.diffusers_load()
        case.diffusers_undo()
    pack, diff = [], []
    for i in range(reps):
        gc.collect()
        order = ("pack", "diffusers") if i % 2 == 0 else ("diffusers", "pack")
        for who in order:
            if who == "pack":
                pack.append(case.pack_load())
                case.pack_undo()
            else:
                diff.append(case.diffusers_load())
                case.diffusers_undo()
    return statistics.median(pack), statistics.median(diff)


def bench_load(work: Path, reps: int) -> None:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    emb_lib, _ = test_helpers()
    tiny = pack_module("devtools.tiny_pipelines").build_tiny_pipeline
    folder = work / "models" / "embeddings"
    pack_module("nodes.comfy_host").set_models_root(work / "models")
    emb_lib.write_a1111_pt(folder / "a1111_sd1.pt", "benchneg", emb_lib.random_vectors(VECTORS, 64, 1))
    emb_lib.write_a1111_pt(folder / "a1111_sd15.pt", "benchneg", emb_lib.random_vectors(VECTORS, 768, 2))
    emb_lib.write_sdxl(
        folder / "sdxl.safetensors",
        emb_lib.random_vectors(VECTORS, 64, 3),
        emb_lib.random_vectors(VECTORS, 128, 4),
    )

    sd1 = tiny("sd1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        te15 = CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).eval()
    parts = {**sd1.components, "text_encoder": te15, "tokenizer": copy.deepcopy(sd1.tokenizer)}
    sd15 = StableDiffusionPipeline(**parts, requires_safety_checker=False)
    cases = [
        ("SD1 tiny, A1111 .pt", sd1, "sd1", "a1111_sd1.pt", reps * 2),
        ("SD1.5-size text encoder, A1111 .pt", sd15, "sd1", "a1111_sd15.pt", reps),
        ("SDXL tiny, clip_l/clip_g .safetensors", tiny("sdxl"), "sdxl", "sdxl.safetensors", reps * 2),
    ]
    print(
        f"1. Embedding load time ({VECTORS} vectors; medians; pack = node on a cold file cache + materialize)"
    )
    print(
        f"   {'case':40s} {'reps':>4s} {'pack ms':>9s} {'diffusers ms':>13s} {'ratio':>6s}  "
        "same rows  get_vocab calls pack/diffusers"
    )
    verdicts = []
    for label, pipe, family, file_name, n in cases:
        case = Case(label, pipe, family, folder, file_name, "<bench-neg>")
        same = case.same_result()
        vocab_calls = get_vocab_calls(case)
        pack, diff = run_case(case, n, warmup=2)
        ratio = pack / diff
        verdicts.append((label, ratio))
        print(
            f"   {label:40s} {n:4d} {pack * 1e3:9.2f} {diff * 1e3:13.2f} {ratio:6.2f}  "
            f"{same!s:9s}  {vocab_calls[0]}/{vocab_calls[1]}"
        )
        del case
        gc.collect()
    for label, ratio in verdicts:
        print(
            f"   {verdict(ratio <= LOAD_TARGET)}: {label}: pack/diffusers {ratio:.2f}x "
            f"(target <= {LOAD_TARGET}x)"
        )


# ------------------------------------------------------------------------------ 2. re-runs
@contextmanager
def counting():
    """Counts embedding file reads (`_read_uncached`), `read_embedding` calls by the node, and
    `load_textual_inversion` calls on any pipeline."""
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    files = pack_module("loaders.embedding_files")
    node_mod = pack_module("nodes.load_textual_inversion")
    counts = {"file reads": 0, "read_embedding": 0, "load_textual_inversion": 0}
    originals = (
        files._read_uncached,
        node_mod.read_embedding,
        TextualInversionLoaderMixin.load_textual_inversion,
    )

    def wrap(key, fn):
        def counted(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)

        return counted

    files._read_uncached = wrap("file reads", originals[0])
    node_mod.read_embedding = wrap("read_embedding", originals[1])
    TextualInversionLoaderMixin.load_textual_inversion = wrap("load_textual_inversion", originals[2])
    try:
        yield counts
    finally:
        files._read_uncached, node_mod.read_embedding = originals[:2]
        TextualInversionLoaderMixin.load_textual_inversion = originals[2]


def bench_reruns(work: Path) -> None:
    from diffusers import StableDiffusionPipeline

    emb_lib, testlib = test_helpers()
    pack = load_pack()
    node_id = pack_module("nodes.common").node_id
    runner_mod = pack_module("headless.runner")
    standins = pack_module("headless.standin_nodes")
    standins.set_temp_directory(work / "temp")
    models = work / "models"
    pack_module("nodes.comfy_host").set_models_root(models)
    testlib.write_single_file(models / "checkpoints" / "tiny_sd1.safetensors", "sd1")
    emb_lib.write_a1111_pt(
        models / "embeddings" / "bench_neg.pt", "benchneg", emb_lib.random_vectors(VECTORS, 64, 5)
    )
    pack_module("loaders.embedding_files").clear_embedding_cache()
    assert "load_textual_inversion" not in StableDiffusionPipeline.__dict__  # the mixin's is the one called

    workflow = {
        "1": {
            "class_type": node_id("LoadDreamBooth"),
            "inputs": {"checkpoint": "tiny_sd1.safetensors", "dtype": "fp32", "device": "cpu"},
        },
        "2": {
            "class_type": node_id("LoadTextualInversion"),
            "inputs": {"pipeline": ["1", 0], "embedding": "bench_neg.pt", "token": "<bench-neg>"},
        },
        "3": {
            "class_type": node_id("Sampler"),
            "inputs": {
                "pipeline": ["2", 0],
                "positive": "a castle on a hill",
                "negative": "<bench-neg>, blurry",
                "seed": 1,
                "steps": 2,
                "cfg": 5.0,
                "width": 64,
                "height": 64,
                "batch_size": 1,
                "sampler_name": "euler",
                "scheduler": "normal",
                "clip_skip": -1,
            },
        },
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    runner = runner_mod.WorkflowRunner({**standins.STANDIN_NODE_CLASS_MAPPINGS, **pack.NODE_CLASS_MAPPINGS})
    reseeded = copy.deepcopy(workflow)
    reseeded["3"]["inputs"]["seed"] = 2
    names = {k: v["class_type"].removeprefix("DiffusersAdapters") for k, v in workflow.items()}
    print(
        "\n2. Re-runs with one WorkflowRunner "
        "(loader -> LoadTextualInversion -> Sampler 64x64 2 steps -> Preview)"
    )
    results = {}
    for label, prompt in (
        ("first run", workflow),
        ("unchanged re-run", workflow),
        ("seed-only change", reseeded),
    ):
        with counting() as counts:
            t = time.perf_counter()
            runner.run(prompt)
            seconds = time.perf_counter() - t
        executed = list(runner.executed)
        results[label] = (executed, dict(counts))
        shown = ", ".join(f"{n} ({names[n]})" for n in executed) or "none"
        print(f"   {label:17s} {seconds:6.2f} s  executed: {shown}")
        print(f"   {'':17s}           {', '.join(f'{k} {v}' for k, v in counts.items())}")

    first_ex, first = results["first run"]
    first_ok = first_ex == ["1", "2", "3", "4"]
    first_ok = first_ok and first["file reads"] == first["load_textual_inversion"] == 1
    print(
        f"   {verdict(first_ok)}"
        ": first run executes every node, reads the embedding once and loads it once (the counters work)"
    )
    ex, c = results["unchanged re-run"]
    print(
        f"   {verdict(ex == [] and not any(c.values()))}: unchanged re-run executes nothing, "
        "reads no embedding file and never calls load_textual_inversion"
    )
    ex, c = results["seed-only change"]
    print(
        f"   {verdict(ex == ['3', '4'] and not any(c.values()))}: seed-only change runs only the sampler "
        "(and the preview fed by it); the TI node is cached and the embedding is neither read nor reloaded"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per side (tiny cases: 2x)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_pack()
    import diffusers
    import transformers

    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}, CPU fp32, {args.threads} thread(s)"
    )
    with tempfile.TemporaryDirectory(prefix="bench-ti-") as tmp:
        work = Path(tmp)
        with torch.no_grad():
            bench_load(work / "load", args.reps)
            bench_reruns(work / "rerun")
    return 0


if __name__ == "__main__":
    sys.exit(main())
