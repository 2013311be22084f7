"""Textual inversion edge tokens (issue 12, class 6): the tokenizer's special tokens refused when the
embedding is loaded; a token beside another embedding's sub-token names (`x` and `x_1`) takes only
its own vectors; `embedding:` without a name keeps the next word; a run after a refusal equals a
fresh one."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from embedding_files_lib import random_vectors, write_emb_params, write_sdxl
from lora_fixtures import fresh_handle

from comfyui_diffusers_adapters.loaders import embedding_files
from comfyui_diffusers_adapters.loaders import prompt_encoding as pe
from comfyui_diffusers_adapters.loaders.pipeline_handle import materialized
from comfyui_diffusers_adapters.loaders.sampling import SamplingSettings, encode_conditioning
from comfyui_diffusers_adapters.loaders.textual_inversion import TextualInversionError
from comfyui_diffusers_adapters.nodes.load_textual_inversion import LoadTextualInversion
from comfyui_diffusers_adapters.nodes.sampler import Sampler
from testlib import tiny_pipeline

ARGS = (1, 2, 5.0, 64, 64, 1, "euler", "normal", -1)


@pytest.fixture(autouse=True)
def fresh_caches():
    embedding_files.clear_embedding_cache()
    yield


def conditioning(handle, positive, negative=""):
    with materialized(handle) as pipe:
        return encode_conditioning(pipe, SamplingSettings(positive, negative))


def token_rows(handle, prompt: str) -> list[int]:
    """The prompt's token ids between the start and end tokens."""
    with materialized(handle) as pipe:
        ids = [t for t, _ in pe.tokenize_chunks(prompt, pipe.tokenizer)[0]]
        return ids[1 : ids.index(pipe.tokenizer.eos_token_id)]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("token", ["<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "!"])
def test_special_tokens_are_refused_when_loaded(models_root, family, token):
    path = models_root / "embeddings" / "e.safetensors"
    if family == "sdxl":
        write_sdxl(path, random_vectors(1, 64), random_vectors(1, 128))
    else:
        write_emb_params(path, random_vectors(1, 64))
    handle = fresh_handle(family)
    if token == "!" and family == "sd1":
        pytest.skip("'!' is a plain word of SD1's tokenizer (refused as such elsewhere)")
    with pytest.raises(TextualInversionError, match="special token|already a word") as error:
        LoadTextualInversion().load(handle, "e.safetensors", token)
    assert "e.safetensors" in str(error.value)
    image = Sampler().sample(handle, "a cat", "", *ARGS)[0]
    assert torch.equal(image, Sampler().sample(fresh_handle(family), "a cat", "", *ARGS)[0])


def test_prefix_token_takes_only_its_own_vectors(models_root):
    """`<x>` (1 vector) beside `<x>_1` (2 vectors): `<x>` must not expand to <x>, <x>_1, <x>_1_1."""
    write_emb_params(models_root / "embeddings" / "one.safetensors", random_vectors(1, 64, seed=1))
    write_emb_params(models_root / "embeddings" / "two.safetensors", random_vectors(2, 64, seed=2))
    handle = fresh_handle()
    node = LoadTextualInversion()
    both = node.load(node.load(handle, "one.safetensors", "<x>")["result"][0], "two.safetensors", "<x>_1")
    both = both["result"][0]
    rows = token_rows(both, "a <x> dog")
    assert len(rows) == 3  # a, <x>, dog
    rows = token_rows(both, "a <x>_1 dog")
    assert len(rows) == 4  # a, <x>_1, <x>_1_1, dog
    # <x>'s conditioning equals <x> alone on the pipeline
    only_x = node.load(fresh_handle(), "one.safetensors", "<x>")["result"][0]
    torch.testing.assert_close(conditioning(both, "a <x> dog"), conditioning(only_x, "a <x> dog"))


def test_prefix_token_loaded_the_other_way_round(models_root):
    write_emb_params(models_root / "embeddings" / "one.safetensors", random_vectors(1, 64, seed=1))
    write_emb_params(models_root / "embeddings" / "three.safetensors", random_vectors(3, 64, seed=3))
    node = LoadTextualInversion()
    first = node.load(fresh_handle(), "three.safetensors", "<y>")["result"][0]
    # <y>'s own sub-tokens are <y>_1, <y>_2: another embedding may not take them
    with pytest.raises(TextualInversionError, match="<y>_1"):
        node.load(first, "one.safetensors", "<y>_1")
    both = node.load(first, "one.safetensors", "<y>_3")["result"][0]  # not <y>'s: allowed, and exact
    rows = token_rows(both, "<y>")
    assert len(rows) == 3


def test_sub_token_of_another_embedding_in_the_tokenizer_never_expands(models_root):
    """Tokens added outside the pack's embeddings (a name that looks like a sub-token) stay single."""
    tok = copy.deepcopy(tiny_pipeline("sd1").tokenizer)
    tok.add_tokens(["<z>", "<z>_1"])
    ids = [t for t, _ in pe.tokenize_chunks("<z>", tok)[0]]
    assert ids[1] == tok.convert_tokens_to_ids("<z>") and ids[2] == tok.eos_token_id


def test_embedding_prefix_without_a_name_keeps_the_next_word(caplog):
    tok = tiny_pipeline("sd1").tokenizer
    with caplog.at_level(logging.WARNING):
        got = pe.tokenize_chunks("a photo of embedding: cat", tok)
    assert got == pe.tokenize_chunks("a photo of cat", tok)
    assert "embedding:" in caplog.text
    assert pe.tokenize_chunks("a cat embedding:", tok) == pe.tokenize_chunks("a cat", tok)
    assert pe.tokenize_chunks("embedding:\ncat", tok) == pe.tokenize_chunks("cat", tok)


def test_embedding_prefix_without_a_name_through_the_sampler(models_root):
    handle = fresh_handle()
    image = Sampler().sample(handle, "a photo of embedding: cat", "", *ARGS)[0]
    assert torch.equal(image, Sampler().sample(handle, "a photo of cat", "", *ARGS)[0])


def test_an_over_long_token_is_refused(models_root):
    write_emb_params(models_root / "embeddings" / "e.safetensors", random_vectors(1, 64))
    with pytest.raises(TextualInversionError, match="e.safetensors has 1000000 characters"):
        LoadTextualInversion().load(fresh_handle(), "e.safetensors", "<" + "z" * 999_998 + ">")
