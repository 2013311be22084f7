"""Prompts from workflows (issue 12, classes 1 and 2): bounded length, chunk count, nesting depth,
`embedding:` references and weights, each refusal naming the prompt; a long positive against a long
negative is never repeated to the least common multiple of their chunk counts (ComfyUI batches such
conds apart); equal lengths stay as they were; a normal run after a refusal equals a fresh one."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lora_fixtures import fresh_handle

from comfyui_diffusers_adapters.loaders import prompt_encoding as pe
from comfyui_diffusers_adapters.loaders.pipeline_handle import materialized
from comfyui_diffusers_adapters.loaders.sampling import SamplingSettings, encode_conditioning
from comfyui_diffusers_adapters.nodes.sampler import Sampler

ARGS = (1, 2, 5.0, 64, 64, 1, "euler", "normal", -1)


@pytest.fixture(scope="module")
def handle():
    return fresh_handle()


def words(n: int) -> str:
    return " ".join(f"w{i % 10}" for i in range(n))  # each "wN" is 2 tokens


def chunks(n: int) -> str:
    """A prompt of exactly n chunks (75 tokens each)."""
    return ", ".join(["cat"] * (75 * n // 2)) if n else ""


HOSTILE = {
    "too-long": "a " * (pe.MAX_PROMPT_CHARS // 2 + 1),
    "too-many-chunks": "a," * 5000,  # 10,000 tokens in 10,000 characters
    "deep-nesting": "(" * 5000 + "cat" + ")" * 5000,
    "nan-weight": "a (cat:nan) dog",
    "inf-weight": "a (cat:inf) dog",
    "overflow-weight": "a (cat:1e309) dog",
    "absurd-weight": "a (cat:1e30) dog",
    "absurd-negative-weight": "a (cat:-1000) dog",
    "nested-past-bound": "a (((cat:100))) dog" + ", ((((dog)):100))",
    "embedding-repeats": "embedding:x " * (pe.MAX_EMBEDDING_REFERENCES + 1),
}


@pytest.mark.parametrize("which", ["positive", "negative"])
@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE)
def test_hostile_prompts_are_refused_naming_the_prompt(handle, text, which):
    prompts = {"positive": "a cat", "negative": "", which: text}
    with pytest.raises(pe.PromptError, match=f"{which} prompt") as error:
        Sampler().sample(handle, prompts["positive"], prompts["negative"], *ARGS)
    assert len(str(error.value)) < 400


def test_bounds_leave_real_prompts_alone(handle):
    long_real = ", ".join(["masterpiece", "(best quality:1.2)", "((detailed))", "[blurry]"] * 60)
    assert len(pe.tokenize_chunks(long_real, handle.base.pipe.tokenizer)) < pe.MAX_CHUNKS
    pe.check_prompt("(" * pe.MAX_NESTING + "cat" + ")" * pe.MAX_NESTING, "positive prompt")
    pe.check_prompt(f"(cat:{pe.MAX_WEIGHT}) (dog:-{pe.MAX_WEIGHT}) (x:0)", "positive prompt")
    pe.check_prompt("a " * (pe.MAX_PROMPT_CHARS // 2), "positive prompt")
    with pytest.raises(pe.PromptError, match="negative prompt must be text"):
        pe.check_prompt(None, "negative prompt")  # the Sampler node refuses it first (NodeInputError)


def test_unbalanced_and_escaped_parentheses_are_not_nesting():
    pe.check_prompt(")" * 5000 + "cat", "positive prompt")
    pe.check_prompt("\\(" * 5000 + "cat", "positive prompt")


def test_a_run_after_a_refusal_equals_a_fresh_run():
    handle = fresh_handle()
    first = Sampler().sample(handle, "a (cat:1.2)", "blurry", *ARGS)[0]
    for text in HOSTILE.values():
        with pytest.raises(pe.PromptError):
            Sampler().sample(handle, text, "blurry", *ARGS)
    assert torch.equal(Sampler().sample(handle, "a (cat:1.2)", "blurry", *ARGS)[0], first)
    assert torch.equal(Sampler().sample(fresh_handle(), "a (cat:1.2)", "blurry", *ARGS)[0], first)


def conditioning(handle, positive, negative):
    with materialized(handle) as pipe:
        return encode_conditioning(pipe, SamplingSettings(positive, negative))


@pytest.mark.parametrize("pos,neg", [(49, 47), (47, 49), (50, 1), (7, 2), (5, 1)])
def test_unequal_long_prompts_are_never_repeated_to_their_lcm(handle, pos, neg):
    got = conditioning(handle, chunks(pos), chunks(neg))
    assert got["prompt_embeds"].shape == got["negative_prompt_embeds"].shape
    assert got["prompt_embeds"].shape[1] == 77 * max(pos, neg, 1)  # ComfyUI: lcm 2303 chunks for 49/47


@pytest.mark.parametrize("pos,neg", [(4, 1), (2, 1), (4, 2), (3, 2), (2, 3), (6, 4)])
def test_lengths_comfyui_concatenates_are_repeated_as_before(handle, pos, neg):
    """ComfyUI repeats to the lcm when that is at most 4 times the shorter (conds.CONDCrossAttn)."""
    got = conditioning(handle, chunks(pos), chunks(neg))
    lcm = math.lcm(pos, neg)
    assert got["prompt_embeds"].shape[1] == 77 * lcm
    assert got["negative_prompt_embeds"].shape[1] == 77 * lcm


@pytest.mark.parametrize("pos,neg", [(6, 1), (1, 5), (5, 3)])
def test_masked_lengths_give_the_image_of_the_exact_repeat(pos, neg):
    """Cross-attention over a sequence repeated to the lcm equals attention over the sequence alone;
    the padded, masked sequence equals it too (to float rounding): the image must match the lcm one."""
    handle = fresh_handle()
    positive, negative = chunks(pos), chunks(neg)
    ours = Sampler().sample(handle, positive, negative, *ARGS)[0]
    with materialized(handle) as pipe:
        tokenizers, encoders = [pipe.tokenizer], [pipe.text_encoder]
        p = pe.encode_prompt(positive, tokenizers, encoders).embeds
        n = pe.encode_prompt(negative, tokenizers, encoders).embeds
        p, n = pe.pad_to_same_length(p, n)
        from comfyui_diffusers_adapters.loaders.sampling import decode_latents
        from comfyui_diffusers_adapters.loaders.schedulers import make_scheduler

        original = pipe.scheduler
        pipe.scheduler = make_scheduler("euler", "normal", dict(original.config))
        try:
            latents = pipe(
                prompt_embeds=p,
                negative_prompt_embeds=n,
                num_inference_steps=2,
                guidance_scale=5.0,
                width=64,
                height=64,
                generator=torch.Generator("cpu").manual_seed(1),
                output_type="latent",
            ).images
        finally:
            pipe.scheduler = original
        reference = decode_latents(pipe, latents)
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-5)
    assert torch.equal(Sampler().sample(handle, positive, negative, *ARGS)[0], ours)


def test_equal_lengths_unchanged_and_no_mask(handle):
    got = conditioning(handle, chunks(3), chunks(3))
    assert got["prompt_embeds"].shape[1] == 77 * 3
    assert set(got) == {"prompt_embeds", "negative_prompt_embeds"}


# ------------------------------------------------------------------ under a memory limit
UNDER_LIMIT = textwrap.dedent(
    """
    import math, resource, sys
    sys.path.insert(0, "tests")
    import conftest  # noqa: F401  (imports the pack)
    import torch
    from lora_fixtures import fresh_handle
    from test_hardening_prompts import ARGS, HOSTILE, chunks
    from comfyui_diffusers_adapters.nodes.sampler import Sampler

    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    handle = fresh_handle()
    legit = Sampler().sample(handle, chunks(3), chunks(2), *ARGS)[0]  # warm: every layer has run once
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + int(sys.argv[1]), resource.RLIM_INFINITY))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hostile = [(text, "") for text in HOSTILE.values()] + [("a cat", text) for text in HOSTILE.values()]
    for positive, negative in hostile:
        try:
            Sampler().sample(handle, positive, negative, *ARGS)
        except MemoryError as e:
            print(f"MEMORY {e}")
        except Exception as e:
            print(f"REFUSED {type(e).__name__}: {str(e)[:100]}")
        else:
            print("SAMPLED")
    images = Sampler().sample(handle, chunks(49), chunks(47), *ARGS)[0]  # lcm 2,303 chunks in ComfyUI
    print("LONG_PAIR", tuple(images.shape), bool(torch.isfinite(images).all()))
    assert torch.equal(Sampler().sample(handle, chunks(3), chunks(2), *ARGS)[0], legit)
    print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """
)


@pytest.mark.slow
def test_hostile_prompts_under_a_memory_limit():
    """Under an address-space limit of 512 MB above the warmed-up process, every hostile prompt is
    refused with a PromptError (no MemoryError), a 49-chunk positive against a 47-chunk negative
    samples, a normal run afterwards equals the first one, and peak resident memory grows by less
    than 64 MB."""
    run = subprocess.run(
        [sys.executable, "-c", UNDER_LIMIT, str(512 * 2**20)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [
        line for line in run.stdout.splitlines() if line.split(" ")[0] in ("REFUSED", "MEMORY", "SAMPLED")
    ]
    assert len(lines) == 2 * len(HOSTILE), run.stdout
    assert all(line.startswith("REFUSED PromptError") for line in lines), "\n".join(lines)
    assert "LONG_PAIR (1, 64, 64, 3) True" in run.stdout, run.stdout
    growth_kb = int(run.stdout.split("GROWTH_KB ")[1].split()[0])
    assert growth_kb < 64 * 1024, run.stdout


def test_masked_lengths_on_sdxl_with_an_empty_and_a_real_negative():
    handle = fresh_handle("sdxl")
    for negative in ("", chunks(1)):
        got = conditioning(handle, chunks(6), negative)
        assert got["prompt_embeds"].shape[1] == 77 * 6 == got["negative_prompt_embeds"].shape[1]
        image = Sampler().sample(handle, chunks(6), negative, *ARGS)[0]
        assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
    unet = handle.base.pipe.unet
    assert "forward" not in vars(unet)  # the mask wrapper is gone after the run


@pytest.mark.parametrize("with_ip_adapter", [False, True], ids=["sdxl", "sd1-ip-adapter"])
def test_masked_run_equals_the_lcm_repeat(models_root, monkeypatch, with_ip_adapter):
    """The same run with the repeat allowed up to the lcm (MAX_REPEAT raised) gives the same image, on
    SDXL and with an IP-Adapter's processors (they mask the text tokens only)."""
    if with_ip_adapter:
        from test_ip_adapter import reference_image, setup_files

        from comfyui_diffusers_adapters.nodes.apply_ip_adapter import ApplyIPAdapter

        encoder_file, _, _ = setup_files(models_root, "base")
        handle = ApplyIPAdapter().apply(
            fresh_handle(), "base.safetensors", encoder_file, reference_image(), 0.8
        )["result"][0]
    else:
        handle = fresh_handle("sdxl")
    positive, negative = chunks(6), chunks(1)
    masked = Sampler().sample(handle, positive, negative, *ARGS)[0]
    monkeypatch.setattr(pe, "MAX_REPEAT", 6)
    repeated = Sampler().sample(handle, positive, negative, *ARGS)[0]
    torch.testing.assert_close(masked, repeated, rtol=0, atol=2e-5)
    assert not torch.equal(masked, Sampler().sample(handle, positive, "", *ARGS)[0])
