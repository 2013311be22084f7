"""Textual inversion through diffusers' `load_textual_inversion`, with exact removal.

An embedding becomes one spec on the pipeline socket; applying it adds its token (and the
`token_1`, `token_2`... sub-tokens of a multi-vector embedding) to each text encoder it has
vectors for. Removal names every sub-token, and restores the text encoder's vocab size, so the
tokenizer and the embedding matrix are exactly as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..converters.embeddings import Embedding, embedding_width_family
from .base_models import BaseModel
from .embedding_files import read_embedding
from .file_stamps import file_stamp
from .pipeline_handle import KeyedSpec, PipelineHandle, StackKind
from .prompt_encoding import EMBEDDING_PREFIX, register_vector_tokens, unregister_vector_tokens

TEXTUAL_INVERSION = StackKind("textual_inversion")
# A token is added to the tokenizer's trie: bounded. `embedding:name` tokens hold a file name (at most
# 4096 bytes, comfy_host); real tokens have a few dozen characters.
MAX_TOKEN_CHARS = 4096 + len(EMBEDDING_PREFIX)
# SDXL files name their two vector sets after the encoders; single-encoder files use "".
_SLOTS = {"sdxl": (("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2"))}


class TextualInversionError(ValueError):
    """An embedding that does not fit the pipeline or clashes with a token."""


def sub_tokens(token: str, n: int) -> list[str]:
    """The tokens diffusers adds for an n-vector embedding: token, token_1, ..., token_{n-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def _slots(embedding: Embedding, base: BaseModel, name: str) -> list[tuple[str, str, torch.Tensor]]:
    """(tokenizer attribute, text encoder attribute, vectors) for each encoder the embedding feeds."""
    wanted = _SLOTS.get(base.family, (("", "text_encoder", "tokenizer"),))
    slots = []
    for key, encoder_attr, tokenizer_attr in wanted:
        vectors = embedding.vectors.get(key)
        if vectors is None and len(embedding.vectors) == 1 and not key:
            vectors = next(iter(embedding.vectors.values()))
        width = base.layout.token_widths[encoder_attr]
        if vectors is None or vectors.shape[-1] != width:
            raise TextualInversionError(_misfit(embedding, base, name, encoder_attr, width))
        slots.append((tokenizer_attr, encoder_attr, vectors))
    return slots


def _width(width: int) -> str:
    family = embedding_width_family(width)
    return f"{width} ({family})" if family else str(width)


def _misfit(embedding: Embedding, base: BaseModel, name: str, encoder_attr: str, width: int) -> str:
    got = ", ".join(_width(v.shape[-1]) for v in embedding.vectors.values())
    message = (
        f"{name} does not fit this {base.family_name} pipeline: its vectors are {got} wide, but "
        f"the {encoder_attr} needs {_width(width)}"
    )
    if base.family == "sdxl":
        return message + " and the file must have clip_l and clip_g vectors."
    if base.family == "flux":  # diffusers' Flux pipeline feeds textual inversion to CLIP-L only
        t5 = base.layout.token_widths.get("text_encoder_2")
        return (
            message + f". Flux.1 takes textual inversion for its CLIP-L text encoder only ({width} wide, "
            f"e.g. an SD1.x embedding); embeddings for T5 ({t5} wide) are not supported."
        )
    return message + "."


@dataclass(frozen=True, eq=False, repr=False)
class TextualInversionSpec(KeyedSpec):
    """One embedding on the pipeline socket, under `token`."""

    key: tuple  # (file identity, token)
    embedding: Embedding
    token: str
    slots: tuple  # ((tokenizer attr, text encoder attr, vectors), ...)
    label: str = ""
    bundled_in: str = ""  # the LoRA file that carried this embedding (`bundle_emb.*`), if any

    kind = TEXTUAL_INVERSION

    def apply(self, pipe) -> Callable[[], None]:
        undos: list[Callable[[], None]] = []
        try:
            for tokenizer_attr, encoder_attr, vectors in self.slots:
                tokenizer, encoder = getattr(pipe, tokenizer_attr), getattr(pipe, encoder_attr)
                tokens = sub_tokens(self.token, vectors.shape[0])
                # make_spec checked the token; diffusers refuses one already in the tokenizer.
                vocab_size = encoder.config.vocab_size
                # Registered first: diffusers adds the tokens, then grows the embedding matrix, then
                # fills it, so an error or interrupt in between leaves part of it to take out.
                undos.append(_remover(pipe, tokenizer, encoder, tokens, vocab_size))
                pipe.load_textual_inversion(
                    vectors, token=self.token, tokenizer=tokenizer, text_encoder=encoder
                )
                # Prompts expand the token to exactly these sub-tokens (prompt_encoding).
                register_vector_tokens(tokenizer, tokens)
        except BaseException:
            for undo in reversed(undos):
                undo()
            raise

        def undo_all() -> None:
            for undo in reversed(undos):
                undo()

        return undo_all


def _remover(pipe, tokenizer, encoder, tokens: list[str], vocab_size: int) -> Callable[[], None]:
    """Takes out the tokens (those of them the tokenizer has: also after a half-done load) and their
    rows of the embedding matrix."""

    def remove() -> None:
        unregister_vector_tokens(tokenizer, tokens[0])
        present = [t for t in tokens if t in tokenizer.added_tokens_encoder]
        if present:
            pipe.unload_textual_inversion(tokens=present, tokenizer=tokenizer, text_encoder=encoder)
        table = encoder.get_input_embeddings()
        if table.weight.shape[0] > vocab_size:  # grown, but the tokens were never added
            table.weight = torch.nn.Parameter(table.weight.data[:vocab_size].clone())
            table.num_embeddings = vocab_size
        encoder.config.vocab_size = vocab_size  # diffusers leaves the enlarged size behind

    return remove


def make_spec(
    embedding: Embedding, token: str, base: BaseModel, identity: tuple, label: str, bundled_in: str = ""
) -> TextualInversionSpec:
    """A validated spec: the embedding fits the pipeline's encoders and the token is new."""
    if len(token) > MAX_TOKEN_CHARS:
        raise TextualInversionError(
            f"The token for {label} has {len(token)} characters; at most {MAX_TOKEN_CHARS} "
            "(real tokens have a few dozen)."
        )
    if not token.strip() or any(c.isspace() for c in token):
        raise TextualInversionError(f"Token {token!r} must be one word without spaces.")
    slots = _slots(embedding, base, label)
    for tokenizer_attr, _, vectors in slots:
        _refuse_special(token, label, getattr(base.pipe, tokenizer_attr))
        vocab = base.layout.vocabularies[tokenizer_attr]
        words = [t for t in sub_tokens(token, vectors.shape[0]) if t in vocab or t.lower() + "</w>" in vocab]
        if words:
            raise TextualInversionError(
                f"The token {words[0]!r} for {label} is already a word of the tokenizer; "
                "choose another token "
                "(for example <name>)."
            )
    return TextualInversionSpec((identity, token), embedding, token, tuple(slots), label, bundled_in)


def _refuse_special(token: str, label: str, tokenizer) -> None:
    """The tokenizer's special tokens (start, end, pad) are not words a prompt can hold: diffusers
    would refuse them only when sampling. Compared without case, as CLIP lowercases prompts."""
    specials = {t.lower() for t in tokenizer.all_special_tokens}  # fixed when the tokenizer is made
    if token.lower() in specials:
        raise TextualInversionError(
            f"The token {token!r} for {label} is a special token of the tokenizer "
            f"({', '.join(sorted(specials))}); choose another token (for example <name>)."
        )


def _token_names(spec: TextualInversionSpec) -> set[str]:
    """Every token the spec adds: its token and the sub-tokens of its longest vector set."""
    return set(sub_tokens(spec.token, max(vectors.shape[0] for _, _, vectors in spec.slots)))


def check_token_unique(specs: tuple, spec: TextualInversionSpec) -> None:
    """Two different embeddings may not share a token, or a sub-token (a 3-vector `x` adds `x_1` and
    `x_2`, so another embedding may not be `x_1`), on one pipeline."""
    names = _token_names(spec)
    for other in specs:
        if not isinstance(other, TextualInversionSpec) or other == spec:
            continue
        shared = sorted(names & _token_names(other))
        if shared:
            which = "token" if shared[0] in (spec.token, other.token) else "sub-token"
            raise TextualInversionError(
                f"The {which} {shared[0]!r} of {spec.label} is already used by {other.label} on this "
                f"pipeline (an n-vector embedding adds token, token_1 .. token_n-1); give {spec.label} "
                "another token."
            )


_EMBEDDING_WORD = re.compile(r"embedding:([^\s()\[\]]+)")


def embedding_names(text: str) -> list[str]:
    """Names written as `embedding:name` in a prompt (ComfyUI syntax), in order, without duplicates."""
    names = [m.group(1).rstrip(",").rstrip(":") for m in _EMBEDDING_WORD.finditer(text)]
    # "(embedding:name:1.2)" : the weight belongs to the parentheses, not to the name
    names = [re.sub(r":[0-9.]+$", "", n) for n in names]
    return list(dict.fromkeys(n for n in names if n))


def embedding_file(name: str, resolve: Callable[[str], Path]) -> Path:
    """The file of `embedding:name`: the name as given, or with a usual extension added."""
    for candidate in (name, *(name + ext for ext in (".safetensors", ".pt", ".bin", ".pth"))):
        try:
            return resolve(candidate)
        except FileNotFoundError:
            continue
    raise FileNotFoundError(
        f"The prompt uses embedding:{name}, but no file {name}(.safetensors/.pt/.bin) "
        "is in models/embeddings."
    )


def with_embedding(handle: PipelineHandle, path: Path, token: str, label: str) -> tuple[PipelineHandle, str]:
    """The handle with the embedding file at `path` under `token` (empty: the name the file stores,
    else the file's stem), and the node's info text."""
    embedding = read_embedding(path)
    token = token.strip() or embedding.name or path.stem
    spec = make_spec(embedding, token, handle.base, file_stamp(path), label)
    check_token_unique(handle.adapters, spec)
    if spec not in handle.adapters:
        handle = handle.with_adapter(spec)
    vectors = next(iter(embedding.vectors.values())).shape[0]
    return handle, f"{label}: token {token!r}, {vectors} vector(s), {embedding.format} format"


def with_prompt_embeddings(
    handle: PipelineHandle, prompts: tuple[str, ...], resolve: Callable[[str], Path]
) -> PipelineHandle:
    """The handle plus every embedding a prompt names as `embedding:name` (ComfyUI's syntax), read
    from `resolve(file name)` under the token `embedding:name`. An unknown name is an error naming it."""
    for name in embedding_names(" ".join(prompts)):
        path = embedding_file(name, resolve)
        label = EMBEDDING_PREFIX + name
        spec = make_spec(read_embedding(path), label, handle.base, file_stamp(path), label)
        if spec not in handle.adapters:
            check_token_unique(handle.adapters, spec)
            handle = handle.with_adapter(spec)
    return handle
