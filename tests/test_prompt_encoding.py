"""ComfyUI-style prompt encoding: parser, chunking, weighting, and parity with diffusers' encode_prompt."""

from __future__ import annotations

import ast
import copy
import logging
import os
import random
import re
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from comfyui_diffusers_adapters.loaders import prompt_encoding as pe
from comfyui_diffusers_adapters.loaders.tokenizers import END_OF_TEXT, OPEN_CLIP_PAD, clip_tokenizer

BOS, EOS = 49406, 49407
COMFYUI = Path(os.environ.get("COMFYUI_PATH", "COMFYUI_PATH-not-set"))  # a ComfyUI checkout, if any


def _config(hidden: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=49408,
        max_position_embeddings=77,
        **extra,
    )


class _DiffusersCompatCLIPTextModel(CLIPTextModel):
    """diffusers 0.42.1's SD pipeline reads `text_encoder.text_model.final_layer_norm` with clip_skip, which
    transformers 5's CLIPTextModel lacks (diffusers #14124). Same weights and forward; test use only."""

    @property
    def text_model(self):
        return self


@pytest.fixture(scope="module")
def sd1():
    torch.manual_seed(0)
    return clip_tokenizer(END_OF_TEXT), _DiffusersCompatCLIPTextModel(_config(64)).eval()


@pytest.fixture(scope="module")
def sdxl():
    torch.manual_seed(1)
    te = CLIPTextModel(_config(64)).eval()
    te2 = CLIPTextModelWithProjection(_config(128, projection_dim=32)).eval()
    return [clip_tokenizer(END_OF_TEXT), clip_tokenizer(OPEN_CLIP_PAD)], [te, te2]


def _ids(chunk):
    return [t for t, _ in chunk]


def _words(n: int) -> str:
    """n single-token words."""
    vocab = ["cat", "dog", "red", "blue", "tree", "house", "sky", "car"]
    return " ".join(vocab[i % len(vocab)] for i in range(n))


# --------------------------------------------------------------------------- 1. parity with diffusers

PROMPTS = [
    "a photo of a cat",
    "",
    "masterpiece, best quality, 1girl, looking at viewer; odd: punctuation! \\ 3.5 [x] <y>",
    _words(75),  # exactly one full chunk
]


@pytest.mark.parametrize("pad", [END_OF_TEXT, OPEN_CLIP_PAD])
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("diffusers_skip, comfy_skip", [(None, -1), (1, -2)])
def test_sd_matches_diffusers_encode_prompt(sd1, prompt, pad, diffusers_skip, comfy_skip):
    from diffusers import StableDiffusionPipeline

    _, te = sd1
    tok = clip_tokenizer(pad)
    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=te,
        tokenizer=tok,
        unet=None,
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    expected, _ = pipe.encode_prompt(
        prompt,
        device="cpu",
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
        clip_skip=diffusers_skip,
    )
    got = pe.encode_prompt(prompt, [tok], [te], clip_skip=comfy_skip)
    assert got.pooled is None
    assert got.embeds.shape == (1, 77, 64)
    assert torch.equal(got.embeds, expected)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("diffusers_skip, comfy_skip", [(None, -1), (1, -2)])
def test_sdxl_matches_diffusers_encode_prompt(sdxl, prompt, diffusers_skip, comfy_skip):
    from diffusers import StableDiffusionXLPipeline

    (tok, tok2), (te, te2) = sdxl
    pipe = StableDiffusionXLPipeline(
        vae=None,
        text_encoder=te,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=None,
        scheduler=None,
    )
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt,
        device="cpu",
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
        clip_skip=diffusers_skip,
    )
    got = pe.encode_prompt(prompt, [tok, tok2], [te, te2], clip_skip=comfy_skip)
    assert got.embeds.shape == (1, 77, 192)
    assert torch.equal(got.embeds, embeds)
    assert torch.equal(got.pooled, pooled)


def test_clip_skip_picks_different_layers(sd1, sdxl):
    tok, te = sd1
    a, b = (pe.encode_prompt("a cat", [tok], [te], clip_skip=s).embeds for s in (-1, -2))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError):
        pe.encode_prompt("a cat", [tok], [te], clip_skip=-4)  # 2 layers: -3 is the embeddings, -4 nothing
    with pytest.raises(ValueError):
        pe.encode_prompt("a cat", [tok], [te], clip_skip=0)
    toks, tes = sdxl
    with pytest.raises(ValueError):
        pe.encode_prompt("a cat", toks, tes, clip_skip=-3)


# ------------------------------------------------------------------------------------------ 2. parser

PARSER_TABLE = [
    ("", []),
    ("a cat", [("a cat", 1.0)]),
    ("(cat)", [("cat", 1.0 * 1.1)]),
    ("((cat))", [("cat", 1.0 * 1.1 * 1.1)]),
    ("(((cat)))", [("cat", 1.0 * 1.1 * 1.1 * 1.1)]),
    ("(cat:1.5)", [("cat", 1.5)]),
    ("a (b:0.5) c", [("a ", 1.0), ("b", 0.5), (" c", 1.0)]),
    ("a (b) (c:1.3)", [("a ", 1.0), ("b", 1.1), (" ", 1.0), ("c", 1.3)]),
    # explicit weights replace the nesting weight; an inner explicit weight wins
    ("((a:1.2))", [("a", 1.2)]),
    ("((a) b:1.5)", [("a", 1.5 * 1.1), (" b", 1.5)]),
    # the last colon counts; what follows must be a float, or it is all text at weight * 1.1
    ("((a:2) b)", [("a", 2.0), (" b", 1.1)]),
    ("(a:1.2:1.3)", [("a:1.2", 1.3)]),
    ("(a:b)", [("a:b", 1.1)]),
    ("(:1.2)", [(":1.2", 1.1)]),
    ("(a: 0.5 )", [("a", 0.5)]),
    ("(a:1e1)", [("a", 10.0)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:0)", [("a", 0.0)]),
    # escapes
    ("\\(a\\)", [("(a)", 1.0)]),
    ("(a \\(b\\):1.3)", [("a (b)", 1.3)]),
    ("(a:1.2\\))", [("a:1.2)", 1.1)]),
    ("\\", [("\\", 1.0)]),
    # unbalanced
    ("a (b", [("a ", 1.0), ("(b", 1.0)]),
    ("(a(b)", [("a", 1.1), ("(b", 1.1)]),
    ("a) (b)", [("a) (b)", 1.0)]),
    ("(a))b(c)", [("a", 1.1), (")b(c)", 1.0)]),
    (")", [(")", 1.0)]),
    ("()", []),
    ("a () b", [("a ", 1.0), (" b", 1.0)]),
]


@pytest.mark.parametrize("text, expected", PARSER_TABLE)
def test_parse_prompt_weights_table(text, expected):
    assert pe.parse_prompt_weights(text) == expected


def _comfy_functions(names: set[str], extra_globals: dict | None = None) -> dict:
    """ComfyUI's own pure functions/classes from comfy/sd1_clip.py, without importing the module (its
    imports need CUDA and ComfyUI's runtime). Skips when no ComfyUI checkout is around."""
    source = COMFYUI / "comfy" / "sd1_clip.py"
    if not source.is_file():
        pytest.skip(f"no ComfyUI checkout at {COMFYUI} (set COMFYUI_PATH)")
    tree = ast.parse(source.read_text(encoding="utf-8"))
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name in names]
    assert {n.name for n in nodes} == names
    namespace = {"re": re, "logging": logging, **(extra_globals or {})}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(source), "exec"), namespace)
    return namespace


def _comfy_parse(ns, text):
    return [
        (ns["unescape_important"](t), w) for t, w in ns["token_weights"](ns["escape_important"](text), 1.0)
    ]


def test_parser_matches_comfyui_source():
    ns = _comfy_functions({"parse_parentheses", "token_weights", "escape_important", "unescape_important"})
    for text, expected in PARSER_TABLE:
        assert _comfy_parse(ns, text) == expected, text
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("ab :1.5()()\\") for _ in range(rng.randint(0, 24)))
        assert pe.parse_prompt_weights(text) == _comfy_parse(ns, text), repr(text)


# ------------------------------------------------------------------------------------------ 3. chunks


def test_empty_prompt_is_one_chunk():
    tok = clip_tokenizer(END_OF_TEXT)
    assert pe.tokenize_chunks("", tok) == [[(BOS, 1.0), (EOS, 1.0)] + [(EOS, 1.0)] * 75]
    tok2 = clip_tokenizer(OPEN_CLIP_PAD)
    assert pe.tokenize_chunks("", tok2) == [[(BOS, 1.0), (EOS, 1.0)] + [(0, 1.0)] * 75]


def test_long_prompt_splits_at_75_tokens():
    tok = clip_tokenizer(END_OF_TEXT)
    words = _words(160)
    ids = tok(words, add_special_tokens=False)["input_ids"]
    assert len(ids) == 160
    chunks = pe.tokenize_chunks(words, tok)
    assert len(chunks) == 3
    assert all(len(c) == 77 for c in chunks)
    assert _ids(chunks[0]) == [BOS, *ids[:75], EOS]
    assert _ids(chunks[1]) == [BOS, *ids[75:150], EOS]
    assert _ids(chunks[2]) == [BOS, *ids[150:], EOS] + [EOS] * 65


def test_short_segment_moves_whole_to_next_chunk():
    tok = clip_tokenizer(OPEN_CLIP_PAD)
    head = _words(74)
    chunks = pe.tokenize_chunks(head + " (green apple pie:1.2)", tok)
    pie = tok("green apple pie", add_special_tokens=False)["input_ids"]
    assert len(pie) == 3
    assert len(chunks) == 2
    assert _ids(chunks[0]) == [BOS, *tok(head + " ", add_special_tokens=False)["input_ids"], EOS, 0]
    assert chunks[1][:5] == [(BOS, 1.0), *[(t, 1.2) for t in pie], (EOS, 1.0)]
    assert chunks[1][5:] == [(0, 1.0)] * 72
    # a segment of 8+ tokens is split instead
    eight = _words(8)
    chunks = pe.tokenize_chunks(head + " (" + eight + ":1.2)", tok)
    assert [w for _, w in chunks[0][75:77]] == [1.2, 1.0]
    assert [w for _, w in chunks[1][1:9]] == [1.2] * 7 + [1.0]


def test_chunking_matches_comfyui_tokenizer():
    """ComfyUI's SDTokenizer.tokenize_with_weights, run from its source on our tokenizer, random prompts."""
    ns = _comfy_functions(
        {"parse_parentheses", "token_weights", "escape_important", "unescape_important", "SDTokenizer"},
        {"CLIPTokenizer": None},
    )
    rng = random.Random(1)
    vocab = ["cat", "a", "photograph", "blue", "sky,", "masterpiece", "of", "the", "tree", "hyperrealistic"]
    for pad, pad_id in ((END_OF_TEXT, EOS), (OPEN_CLIP_PAD, 0)):
        tok = clip_tokenizer(pad)
        comfy = object.__new__(ns["SDTokenizer"])
        comfy.__dict__.update(
            tokenizer=tok, max_length=77, min_length=None, min_padding=None, pad_left=False,
            tokenizer_adds_end_token=True, tokens_start=1, start_token=BOS, end_token=EOS,
            pad_token=pad_id, pad_to_max_length=True, embedding_directory=None, max_word_length=8,
            embedding_identifier="embedding:", embedding_key="clip_l", disable_weights=False,
        )  # fmt: skip
        for _ in range(150):
            parts = []
            for _ in range(rng.randint(0, 40)):
                text = " ".join(rng.choice(vocab) for _ in range(rng.choice([1, 2, 3, 6, 9, 30])))
                shape = rng.random()
                parts.append(
                    text
                    if shape < 0.5
                    else f"({text})"
                    if shape < 0.7
                    else f"({text}:{rng.uniform(0, 2):.2f})"
                )
            prompt = " ".join(parts)
            assert pe.tokenize_chunks(prompt, tok) == comfy.tokenize_with_weights(prompt), prompt


def _encode_ids(te, ids, layer=None, norm=False):
    with torch.no_grad():
        out = te(torch.tensor([ids]), output_hidden_states=True)
    if layer is None:
        return out.last_hidden_state
    z = out.hidden_states[layer]
    return te.final_layer_norm(z) if norm else z


def test_long_prompt_chunks_equal_hand_encoding(sd1):
    tok, te = sd1
    prompt = _words(100)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    got = pe.encode_prompt(prompt, [tok], [te]).embeds
    assert got.shape == (1, 154, 64)
    first = _encode_ids(te, [BOS, *ids[:75], EOS])
    second = _encode_ids(te, [BOS, *ids[75:], EOS] + [EOS] * 50)
    assert torch.equal(got[:, :77], first)
    assert torch.equal(got[:, 77:], second)
    skipped = pe.encode_prompt(prompt, [tok], [te], clip_skip=-2).embeds
    assert torch.equal(skipped[:, 77:], _encode_ids(te, [BOS, *ids[75:], EOS] + [EOS] * 50, -2, norm=True))


def test_sdxl_long_prompt_and_pooled_from_first_chunk(sdxl):
    (tok, tok2), (te, te2) = sdxl
    prompt = _words(80)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    got = pe.encode_prompt(prompt, [tok, tok2], [te, te2])
    assert got.embeds.shape == (1, 154, 192)
    second_l = _encode_ids(te, [BOS, *ids[75:], EOS] + [EOS] * 70, -2)
    second_g = _encode_ids(te2, [BOS, *ids[75:], EOS] + [0] * 70, -2)
    assert torch.equal(got.embeds[:, 77:], torch.cat([second_l, second_g], dim=-1))
    with torch.no_grad():
        pooled = te2(torch.tensor([[BOS, *ids[:75], EOS]])).text_embeds
    assert torch.equal(got.pooled, pooled)


# ----------------------------------------------------------------------------------------- 4. weights


def _weighted(z, z_empty, weights):
    z = z.clone()
    for position, w in weights.items():
        z[0, position] = (z[0, position] - z_empty[0, position]) * w + z_empty[0, position]
    return z


def test_weights_sd1_follow_comfyui_formula(sd1):
    tok, te = sd1
    cat, dog, red = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("cat", "dog", "red"))
    ids = [BOS, cat, dog, red, EOS] + [EOS] * 72
    empty = [BOS, EOS] + [EOS] * 75
    got = pe.encode_prompt("(cat:1.5) ((dog)) red", [tok], [te]).embeds
    expected = _weighted(_encode_ids(te, ids), _encode_ids(te, empty), {1: 1.5, 2: 1.1 * 1.1})
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert torch.equal(got[:, 3:], _encode_ids(te, ids)[:, 3:])  # weight 1 positions untouched
    got = pe.encode_prompt("(cat:0.5) dog red", [tok], [te], clip_skip=-2).embeds
    expected = _weighted(_encode_ids(te, ids, -2, True), _encode_ids(te, empty, -2, True), {1: 0.5})
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_weights_sdxl_follow_comfyui_formula(sdxl):
    (tok, tok2), (te, te2) = sdxl
    cat, dog = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("cat", "dog"))
    got = pe.encode_prompt("a (cat:1.3) dog", [tok, tok2], [te, te2])
    a = tok("a", add_special_tokens=False)["input_ids"][0]
    expected = []
    for encoder, pad in ((te, EOS), (te2, 0)):
        z = _encode_ids(encoder, [BOS, a, cat, dog, EOS] + [pad] * 72, -2)
        z_empty = _encode_ids(encoder, [BOS, EOS] + [pad] * 75, -2)
        expected.append(_weighted(z, z_empty, {2: 1.3}))
    torch.testing.assert_close(got.embeds, torch.cat(expected, dim=-1), rtol=0, atol=1e-6)
    unweighted = pe.encode_prompt("a cat dog", [tok, tok2], [te, te2])
    assert torch.equal(got.pooled, unweighted.pooled)  # ComfyUI's pooled output ignores weights
    assert not torch.allclose(got.embeds, unweighted.embeds)


def test_weight_one_equals_unweighted(sd1, sdxl):
    tok, te = sd1
    plain = pe.encode_prompt("cat dog", [tok], [te]).embeds
    assert torch.equal(pe.encode_prompt("(cat:1.0) dog", [tok], [te]).embeds, plain)
    toks, tes = sdxl
    plain = pe.encode_prompt("cat dog", toks, tes)
    one = pe.encode_prompt("(cat:1) dog", toks, tes)
    assert torch.equal(one.embeds, plain.embeds) and torch.equal(one.pooled, plain.pooled)


# ------------------------------------------------------------------------------------------- 5. padding


def test_pad_to_same_length_repeats_to_lcm():
    a = torch.randn(1, 77, 8)
    b = torch.randn(1, 154, 8)
    pa, pb = pe.pad_to_same_length(a, b)
    assert pa.shape == pb.shape == (1, 154, 8)
    assert torch.equal(pa, torch.cat([a, a], dim=1)) and pb is b
    pb2, pa2 = pe.pad_to_same_length(b, a)
    assert torch.equal(pa2, pa) and pb2 is b
    c = torch.randn(1, 231, 8)
    pb3, pc = pe.pad_to_same_length(b, c)
    assert pb3.shape == pc.shape == (1, 462, 8)
    assert torch.equal(pc, c.repeat(1, 2, 1))
    assert pe.pad_to_same_length(a, a) == (a, a)
    with pytest.raises(ValueError):
        pe.pad_to_same_length(a, torch.randn(1, 154, 9))


def test_padded_negative_gives_same_cross_attention():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 8), torch.randn(1, 77, 8)
    k2, _ = pe.pad_to_same_length(k, torch.randn(1, 154, 8))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.testing.assert_close(sdpa(q, k2, k2), sdpa(q, k, k))


# ------------------------------------------------------------------------------------------------ misc


def test_encoders_left_untouched_and_dtype_kept(sd1):
    tok, te = sd1
    model = copy.deepcopy(te).to(torch.bfloat16).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = pe.encode_prompt("(cat:1.2) " + _words(90), [tok], [model])
    assert out.embeds.dtype == torch.bfloat16 and not out.embeds.requires_grad
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_added_tokens_stay_single_tokens(sd1):
    tok, te = sd1
    tok = copy.deepcopy(tok)
    tok.add_tokens(["<my-style>"])
    new_id = len(tok) - 1
    chunk = pe.tokenize_chunks("a <my-style> cat, (<my-style>:1.3)", tok)[0]
    assert chunk.count((new_id, 1.0)) == 1 and chunk.count((new_id, 1.3)) == 1


def test_embedding_syntax_is_set_aside(caplog):
    tok = clip_tokenizer(END_OF_TEXT)
    with caplog.at_level(logging.WARNING):
        chunks = pe.tokenize_chunks("a embedding:easynegative, cat", tok)
    assert "easynegative" in caplog.text
    assert chunks == pe.tokenize_chunks("a , cat", tok)
