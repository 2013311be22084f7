"""Textual inversion end to end: prompts encoded as computed by hand, negative embeddings, SDXL,
`embedding:name`, bundled embeddings, exact removal, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from embedding_files_lib import lora_bundle_keys, random_vectors, write_a1111_pt, write_emb_params, write_sdxl
from lora_fixtures import fresh_handle
from safetensors.torch import save_file

from comfyui_diffusers_adapters.loaders import embedding_files, lora_files
from comfyui_diffusers_adapters.loaders.pipeline_handle import materialized
from comfyui_diffusers_adapters.loaders.sampling import SamplingSettings, encode_conditioning
from comfyui_diffusers_adapters.loaders.textual_inversion import TextualInversionError
from comfyui_diffusers_adapters.nodes.load_lora import LoadLoRA, UnloadLoRA
from comfyui_diffusers_adapters.nodes.load_textual_inversion import LoadTextualInversion
from comfyui_diffusers_adapters.nodes.sampler import Sampler
from testlib import tiny_pipeline


@pytest.fixture(autouse=True)
def fresh_caches():
    embedding_files.clear_embedding_cache()
    lora_files._cache.clear()
    yield


def by_hand(encoder, tokenizer, words: str, vectors: torch.Tensor | None, layer: int | None = None):
    """The text encoder's output for `words` followed by the embedding's vectors, computed without the
    pack or diffusers' loader: a copy of the encoder with the vectors appended to its embedding matrix."""
    encoder = copy.deepcopy(encoder)
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    if vectors is not None:
        table = encoder.get_input_embeddings()
        start = table.weight.shape[0]
        grown = torch.nn.Embedding(start + vectors.shape[0], table.weight.shape[1])
        grown.weight.data = torch.cat([table.weight.data, vectors.to(table.weight.dtype)])
        encoder.set_input_embeddings(grown)
        ids = ids + list(range(start, start + vectors.shape[0]))
    ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    ids += [tokenizer.pad_token_id] * (77 - len(ids))
    with torch.no_grad():
        out = encoder(torch.tensor([ids]), output_hidden_states=True)
    return out, (out.last_hidden_state if layer is None else out.hidden_states[layer])


def conditioning(handle, positive, negative=""):
    with materialized(handle) as pipe:
        return encode_conditioning(pipe, SamplingSettings(positive, negative))


def test_a1111_multi_vector_embedding_encodes_as_computed_by_hand(models_root):
    vectors = random_vectors(3, 64, seed=1)
    write_a1111_pt(models_root / "embeddings" / "mychar.pt", "mychar", vectors)
    handle = fresh_handle()
    ti, info = LoadTextualInversion().load(handle, "mychar.pt", "")["result"]
    assert "token 'mychar', 3 vector(s)" in info
    got = conditioning(ti, "a photo of mychar", "mychar")
    src = tiny_pipeline("sd1")
    _, want = by_hand(src.text_encoder, src.tokenizer, "a photo of", vectors)
    torch.testing.assert_close(got["prompt_embeds"], want, rtol=1e-5, atol=1e-6)
    _, want_negative = by_hand(src.text_encoder, src.tokenizer, "", vectors)
    torch.testing.assert_close(got["negative_prompt_embeds"], want_negative, rtol=1e-5, atol=1e-6)


def test_negative_embedding_changes_only_the_negative_prompt(models_root):
    write_emb_params(models_root / "embeddings" / "EasyNegative.safetensors", random_vectors(2, 64, seed=2))
    handle = fresh_handle()
    plain = conditioning(handle, "a cat", "blurry")
    ti = LoadTextualInversion().load(handle, "EasyNegative.safetensors", "")["result"][0]
    with_neg = conditioning(ti, "a cat", "blurry, EasyNegative")
    assert torch.equal(plain["prompt_embeds"], with_neg["prompt_embeds"])
    assert not torch.equal(plain["negative_prompt_embeds"], with_neg["negative_prompt_embeds"])
    image_a = Sampler().sample(ti, "a cat", "EasyNegative", 1, 2, 5.0, 64, 64, 1, "euler", "normal", -1)[0]
    image_b = Sampler().sample(ti, "a cat", "", 1, 2, 5.0, 64, 64, 1, "euler", "normal", -1)[0]
    assert not torch.equal(image_a, image_b)


def test_sdxl_embedding_feeds_both_encoders(models_root):
    clip_l, clip_g = random_vectors(2, 64, seed=3), random_vectors(2, 128, seed=4)
    write_sdxl(models_root / "embeddings" / "xlstyle.safetensors", clip_l, clip_g)
    handle = fresh_handle("sdxl")
    ti = LoadTextualInversion().load(handle, "xlstyle.safetensors", "<xl>")["result"][0]
    got = conditioning(ti, "a house <xl>")
    src = tiny_pipeline("sdxl")
    _, first = by_hand(src.text_encoder, src.tokenizer, "a house", clip_l, layer=-2)
    out2, second = by_hand(src.text_encoder_2, src.tokenizer_2, "a house", clip_g, layer=-2)
    torch.testing.assert_close(got["prompt_embeds"], torch.cat([first, second], dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["pooled_prompt_embeds"], out2.text_embeds, rtol=1e-5, atol=1e-6)


def test_prompt_syntax_loads_embeddings_without_a_node(models_root):
    vectors = random_vectors(2, 64, seed=5)
    (models_root / "embeddings" / "sub").mkdir()
    write_emb_params(models_root / "embeddings" / "sub" / "neg.safetensors", vectors)
    handle = fresh_handle()
    args = (1, 2, 5.0, 64, 64, 1, "euler", "normal", -1)
    with_syntax = Sampler().sample(handle, "a cat", "(embedding:sub/neg:1.2), blurry", *args)[0]
    without = Sampler().sample(handle, "a cat", "blurry", *args)[0]
    assert not torch.equal(with_syntax, without)
    ti = LoadTextualInversion().load(handle, "sub/neg.safetensors", "embedding:sub/neg")["result"][0]
    assert torch.equal(
        Sampler().sample(ti, "a cat", "(embedding:sub/neg:1.2), blurry", *args)[0], with_syntax
    )
    with pytest.raises(FileNotFoundError, match="embedding:nothere"):
        Sampler().sample(handle, "a cat, embedding:nothere", "", *args)


def test_removal_restores_tokenizer_and_embedding_matrix_exactly(models_root):
    write_emb_params(models_root / "embeddings" / "a.safetensors", random_vectors(3, 64, seed=6))
    write_a1111_pt(models_root / "embeddings" / "b.pt", "bzzkq", random_vectors(1, 64, seed=7))
    handle = fresh_handle()
    pipe = handle.base.pipe
    vocab, size = dict(pipe.tokenizer.get_vocab()), len(pipe.tokenizer)
    matrix, config_size = (
        pipe.text_encoder.get_input_embeddings().weight.clone(),
        pipe.text_encoder.config.vocab_size,
    )
    a = LoadTextualInversion().load(handle, "a.safetensors", "<a>")["result"][0]
    both = LoadTextualInversion().load(a, "b.pt", "")["result"][0]
    with materialized(both):
        assert len(pipe.tokenizer) == size + 4
    with materialized(a):
        assert len(pipe.tokenizer) == size + 3
    with materialized(handle):
        pass
    assert pipe.tokenizer.get_vocab() == vocab and len(pipe.tokenizer) == size
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, matrix)
    assert pipe.text_encoder.config.vocab_size == config_size


def test_errors(models_root):
    write_emb_params(models_root / "embeddings" / "wide.safetensors", random_vectors(1, 32, seed=8))
    write_emb_params(models_root / "embeddings" / "one.safetensors", random_vectors(1, 64, seed=9))
    write_emb_params(models_root / "embeddings" / "two.safetensors", random_vectors(1, 64, seed=10))
    handle = fresh_handle()
    with pytest.raises(TextualInversionError, match="32.*64"):
        LoadTextualInversion().load(handle, "wide.safetensors", "")
    with pytest.raises(TextualInversionError, match="already a word"):
        LoadTextualInversion().load(handle, "one.safetensors", "cat")
    first = LoadTextualInversion().load(handle, "one.safetensors", "<x>")["result"][0]
    with pytest.raises(TextualInversionError, match="already used"):
        LoadTextualInversion().load(first, "two.safetensors", "<x>")
    xl = fresh_handle("sdxl")
    with pytest.raises(TextualInversionError, match="clip_l and clip_g"):
        LoadTextualInversion().load(xl, "one.safetensors", "<y>")


def test_lora_with_bundled_embeddings_loads_them_and_unload_removes_them(models_root):
    from lora_fixtures import kohya_lora

    src = tiny_pipeline("sd1")
    torch.manual_seed(0)
    state = {
        k: v * 0.05 if v.dim() else v for k, v in kohya_lora(src.unet, "lora_unet_", device="cpu").items()
    }
    vectors = random_vectors(2, 64, seed=11)
    state.update(lora_bundle_keys("zkw", vectors))
    save_file(state, str(models_root / "loras" / "bundled.safetensors"))
    handle = fresh_handle()
    with_lora = LoadLoRA().load(handle, "bundled.safetensors", 1.0, 1.0, "unet and text encoders", "")[
        "result"
    ][0]
    got = conditioning(with_lora, "a zkw")
    _, want = by_hand(src.text_encoder, src.tokenizer, "a", vectors)
    torch.testing.assert_close(got["prompt_embeds"], want, rtol=1e-5, atol=1e-6)
    unloaded = UnloadLoRA().unload(with_lora)[0]
    assert unloaded.adapters == ()
    with materialized(unloaded) as pipe:
        assert "zkw" not in pipe.tokenizer.get_vocab()
