"""Prompt encoding for diffusers pipelines with ComfyUI's semantics.

ComfyUI parses `(text:1.2)` / `((text))` weights, splits a prompt into 77-token chunks (start + 75 + end),
encodes each chunk, concatenates them along the token axis and weights tokens by interpolating from the
empty prompt's embedding. diffusers truncates at 77 tokens and knows no weights; this module produces
`prompt_embeds` (and SDXL's `pooled_prompt_embeds`) the way ComfyUI would, to pass to a pipeline.
"""

from __future__ import annotations

import logging
import math
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch

logger = logging.getLogger(__name__)

CHUNK_LENGTH = 77  # CLIP's context: start token + 75 prompt tokens + end token
# ComfyUI keeps a word (a weighted segment's tokens) in one chunk unless it has this many tokens or more.
MAX_UNSPLIT_WORD = 8
NESTING_WEIGHT = 1.1
EMBEDDING_PREFIX = "embedding:"

# Escaped parentheses are swapped for control characters while parsing, as ComfyUI does.
_ESCAPES = (("\\)", "\0\1"), ("\\(", "\0\2"))
_EMBEDDING_SPLIT = re.compile(r"[ \n]" + re.escape(EMBEDDING_PREFIX))

# Bounds real prompts never meet (issue 12). Long ComfyUI prompts have a few hundred tokens (3 to 6
# chunks, 1,000 to 3,000 characters); emphasis nests a few levels; weights are about 0.5 to 1.5 and
# rarely beyond +-3; a prompt names a handful of embeddings.
MAX_PROMPT_CHARS = 20_000  # tokenized in about 30 ms
MAX_CHUNKS = 50  # 3,750 tokens: 50 text-encoder passes per encoder
MAX_NESTING = 32  # parentheses; the parser recurses once per level
MAX_WEIGHT = 100.0  # |weight| of a segment after nesting; non-finite weights are refused too
MAX_EMBEDDING_REFERENCES = 32  # `embedding:` occurrences in one prompt (each may read a file)
# ComfyUI (comfy/conds.py, CONDCrossAttn.can_concat) repeats a shorter cond to the lcm of both lengths
# only while that is at most 4 times the shorter; past that it runs the conds in separate batches.
MAX_REPEAT = 4

TokenWeights = list[tuple[int, float]]


class PromptError(ValueError):
    """A prompt past one of the bounds above; the message names the prompt."""


# ---------------------------------------------------------------------------------------------- parsing


def _escape(text: str) -> str:
    for literal, placeholder in _ESCAPES:
        text = text.replace(literal, placeholder)
    return text


def _unescape(text: str) -> str:
    for literal, placeholder in _ESCAPES:
        text = text.replace(placeholder, literal[-1])
    return text


def _split_top_level(text: str) -> list[str]:
    """Split into plain runs and top-level `( ... )` groups (groups keep their parentheses).

    Unbalanced input behaves as in ComfyUI: a stray `)` drives the depth negative and is kept as text
    (so are later parentheses until the depth is back to zero), an unclosed `(` group runs to the end.
    """
    parts: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(":
            if depth == 0 and current:
                parts.append(current)
                current = ""
            current += char
            depth += 1
        elif char == ")":
            depth -= 1
            current += char
            if depth == 0:
                parts.append(current)
                current = ""
        else:
            current += char
    if current:
        parts.append(current)
    return parts


def _parse(text: str, weight: float) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for part in _split_top_level(text):
        if len(part) < 2 or not (part.startswith("(") and part.endswith(")")):
            out.append((part, weight))
            continue
        inner = part[1:-1]
        inner_weight = weight * NESTING_WEIGHT
        colon = inner.rfind(":")
        if colon > 0:  # `(text:1.2)` sets the weight (it does not multiply); a bad number is plain text
            try:
                inner_weight = float(inner[colon + 1 :])
                inner = inner[:colon]
            except ValueError:
                pass
        out.extend(_parse(inner, inner_weight))
    return out


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """Split a prompt into `(segment, weight)` pairs with ComfyUI's syntax.

    `(a:1.2)` gives weight 1.2, each unweighted `( )` level multiplies by 1.1, `\\(` and `\\)` are literal
    parentheses. Same result as ComfyUI's `token_weights(escape_important(text), 1.0)` with the segments
    unescaped.
    """
    return [(_unescape(segment), weight) for segment, weight in _parse(_escape(text), 1.0)]


def _nesting(escaped: str) -> int:
    """The deepest level of `( )` (stray `)` count down, as in the parser; an upper bound of its
    recursion)."""
    brackets = re.sub(r"[^()]+", "", escaped)
    return max(accumulate(1 if c == "(" else -1 for c in brackets), default=0)


def check_prompt(text: str, what: str = "prompt") -> list[tuple[str, float]]:
    """The prompt's `(segment, weight)` pairs (parse_prompt_weights), or PromptError naming `what`
    when the prompt is past a bound: length, nesting, `embedding:` references, or a weight that is
    not finite or beyond +-MAX_WEIGHT."""
    if not isinstance(text, str):
        raise PromptError(f"The {what} must be text, got {type(text).__name__}.")
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptError(
            f"The {what} has {len(text)} characters; at most {MAX_PROMPT_CHARS} are read "
            "(long real prompts have a few thousand)."
        )
    depth = _nesting(_escape(text))
    if depth > MAX_NESTING:
        raise PromptError(f"The {what} nests parentheses {depth} levels deep; at most {MAX_NESTING}.")
    references = text.count(EMBEDDING_PREFIX)
    if references > MAX_EMBEDDING_REFERENCES:
        raise PromptError(
            f"The {what} has {references} {EMBEDDING_PREFIX} references; at most {MAX_EMBEDDING_REFERENCES}."
        )
    segments = parse_prompt_weights(text)
    for segment, weight in segments:
        if not (math.isfinite(weight) and abs(weight) <= MAX_WEIGHT):
            shown = segment.strip()[:30]
            raise PromptError(
                f"The {what} gives {shown!r} the weight {weight:g}; weights must be finite and between "
                f"-{MAX_WEIGHT:g} and {MAX_WEIGHT:g} (usual ones are 0.5 to 1.5)."
            )
    return segments


# ----------------------------------------------------------------------------------------- tokenizing


# tokenizer -> {token: (token, token_1, ...)}: the tokens each textual-inversion token stands for,
# recorded by whoever added them (loaders/textual_inversion.py). Names alone cannot tell `x_1` of a
# 2-vector `x` from the token of another embedding called `x_1`.
_VECTOR_TOKENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register_vector_tokens(tokenizer, tokens: Sequence[str]) -> None:
    """Record that the prompt word `tokens[0]` stands for all of `tokens` (a multi-vector embedding)."""
    _VECTOR_TOKENS.setdefault(tokenizer, {})[tokens[0]] = tuple(tokens)


def unregister_vector_tokens(tokenizer, token: str) -> None:
    _VECTOR_TOKENS.get(tokenizer, {}).pop(token, None)


def _multi_vector_ids(tokenizer) -> dict[int, list[int]]:
    """Added token id -> ids of all its vectors, for the multi-vector embeddings registered on the
    tokenizer (diffusers adds `tok`, `tok_1`, `tok_2`, ... and the prompt names only `tok`)."""
    added = tokenizer.added_tokens_encoder
    expansion = {}
    for token, tokens in _VECTOR_TOKENS.get(tokenizer, {}).items():
        if len(tokens) > 1 and all(t in added for t in tokens):
            expansion[added[token]] = [added[t] for t in tokens]
    return expansion


def _token_ids(text: str, tokenizer, expansion: dict[int, list[int]]) -> list[int]:
    # The tokenizer's own call, so tokens added later (textual inversion) stay single tokens.
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return [i for token_id in ids for i in expansion.get(token_id, [token_id])]


def _embedding_token_ids(name: str, tokenizer, expansion: dict[int, list[int]]) -> list[int] | None:
    """Token ids standing for the textual-inversion embedding `name` (all vectors of a multi-vector
    embedding), or None when it is not loaded. The sampler loads `embedding:name` under that token."""
    token_id = tokenizer.added_tokens_encoder.get(EMBEDDING_PREFIX + name)
    if token_id is None:
        return None
    return expansion.get(token_id, [token_id])


def _embedding_group(
    text: str, tokenizer, weight: float, expansion: dict[int, list[int]]
) -> tuple[TokenWeights | None, str]:
    """Handle `embedding:name rest`: the embedding's tokens (None if unknown) and the text left over."""
    name, *rest = text[len(EMBEDDING_PREFIX) :].strip("\n").split()
    leftover = " ".join(rest)
    ids = _embedding_token_ids(name, tokenizer, expansion)
    if ids is None:
        stripped = name.strip(",")  # "embedding:name," : retry without the commas, keep them as text
        if stripped != name:
            ids = _embedding_token_ids(stripped, tokenizer, expansion)
            leftover = f"{name[len(stripped) :]} {leftover}"
            name = stripped
    if ids is None:
        logger.warning("embedding:%s is not loaded, ignoring it", name)
        return None, leftover
    return [(token, weight) for token in ids], leftover


def _token_groups(segments: Sequence[tuple[str, float]], tokenizer) -> list[TokenWeights]:
    """Tokenize parsed segments into groups ComfyUI keeps together: one per segment piece or embedding."""
    expansion = _multi_vector_ids(tokenizer) if tokenizer.added_tokens_encoder else {}
    groups: list[TokenWeights] = []
    for segment, weight in segments:
        pieces = _EMBEDDING_SPLIT.split(segment)
        pieces = pieces[:1] + [EMBEDDING_PREFIX + piece for piece in pieces[1:]]
        for piece in filter(None, pieces):
            if piece.startswith(EMBEDDING_PREFIX):
                after = piece[len(EMBEDDING_PREFIX) :]
                if after[:1].isspace() or not after:
                    # `embedding:` without a name: dropped as ComfyUI drops the word, the next word kept
                    logger.warning("embedding: without a name, ignoring it")
                    piece = after
                else:
                    group, piece = _embedding_group(piece, tokenizer, weight, expansion)
                    if group is not None:
                        groups.append(group)
                if not piece.strip():
                    continue
            groups.append([(token, weight) for token in _token_ids(piece, tokenizer, expansion)])
    return groups


def _chunk(groups: Sequence[TokenWeights], start: int, end: int, pad: int) -> list[TokenWeights]:
    """Pack token groups into start + 75 + end chunks, padded; ComfyUI's rule for splitting groups."""
    room = CHUNK_LENGTH - 1  # positions a chunk offers before its end token (start token included)

    def close(chunk: TokenWeights) -> None:
        chunk.append((end, 1.0))
        chunk.extend([(pad, 1.0)] * (CHUNK_LENGTH - len(chunk)))

    chunks: list[TokenWeights] = [[(start, 1.0)]]
    for group in groups:
        splittable = len(group) >= MAX_UNSPLIT_WORD
        group = list(group)
        while group:
            chunk = chunks[-1]
            free = room - len(chunk)
            if len(group) <= free:
                chunk.extend(group)
                break
            if splittable:  # fill this chunk, carry the rest over
                chunk.extend(group[:free])
                group = group[free:]
            close(chunk)
            chunks.append([(start, 1.0)])
    close(chunks[-1])
    return chunks


def tokenize_chunks(text: str, tokenizer, what: str = "prompt") -> list[TokenWeights]:
    """Tokenize a weighted prompt into 77-long chunks of `(token_id, weight)`, as ComfyUI does.

    Each chunk is start token + up to 75 prompt tokens + end token, padded with the tokenizer's pad token.
    A segment of fewer than 8 tokens that does not fit moves whole to the next chunk; longer ones are
    split. The empty prompt gives one chunk. A prompt past a bound (check_prompt, MAX_CHUNKS) raises
    PromptError naming `what`.
    """
    groups = _token_groups(check_prompt(text, what), tokenizer)
    tokens = sum(len(group) for group in groups)
    if tokens > MAX_CHUNKS * (CHUNK_LENGTH - 2):  # before building the chunks
        raise _too_many_chunks(what, -(-tokens // (CHUNK_LENGTH - 2)))
    chunks = _chunk(groups, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    if len(chunks) > MAX_CHUNKS:
        raise _too_many_chunks(what, len(chunks))
    return chunks


def _too_many_chunks(what: str, chunks: int) -> PromptError:
    return PromptError(
        f"The {what} makes {chunks} chunks of 75 tokens; at most {MAX_CHUNKS} "
        f"({MAX_CHUNKS * (CHUNK_LENGTH - 2)} tokens; long real prompts have a few hundred)."
    )


# ------------------------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class PromptEmbeds:
    """Encoded prompt: `embeds` [1, 77 * n_chunks, dim]; `pooled` [1, proj_dim] for SDXL-style, else None."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None


def _has_projection(encoder) -> bool:
    from transformers import CLIPTextModelWithProjection

    return isinstance(encoder, CLIPTextModelWithProjection)


def _final_layer_norm(encoder) -> torch.nn.Module:
    # transformers 5's CLIPTextModel has no `.text_model` level; CLIPTextModelWithProjection still does.
    return getattr(encoder, "text_model", encoder).final_layer_norm


def _encode_chunk(
    ids: list[int], encoder, clip_skip: int, sdxl_style: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    param = next(encoder.parameters())
    input_ids = torch.tensor([ids], dtype=torch.long, device=param.device)
    out = encoder(input_ids, output_hidden_states=True)
    pooled = out.text_embeds if _has_projection(encoder) else None
    layers = len(out.hidden_states) - 1
    if sdxl_style:  # penultimate layer by default, no final norm (diffusers' and ComfyUI's SDXL)
        index = clip_skip - 1
    elif clip_skip == -1:
        return out.last_hidden_state, pooled
    else:
        index = clip_skip
    if -index > len(out.hidden_states):
        raise ValueError(f"clip_skip {clip_skip} is deeper than the text encoder ({layers} layers)")
    if sdxl_style:
        return out.hidden_states[index], pooled
    return _final_layer_norm(encoder)(out.hidden_states[index]), pooled


def _encode_one(
    text: str, tokenizer, encoder, clip_skip: int, sdxl_style: bool, what: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    chunks = tokenize_chunks(text, tokenizer, what)
    outputs, pooled = [], None
    for chunk in chunks:
        z, chunk_pooled = _encode_chunk([token for token, _ in chunk], encoder, clip_skip, sdxl_style)
        if pooled is None:
            pooled = chunk_pooled  # ComfyUI pools the first chunk only
        outputs.append(z)

    if any(weight != 1.0 for chunk in chunks for _, weight in chunk):
        empty_ids = [token for token, _ in tokenize_chunks("", tokenizer)[0]]
        z_empty = _encode_chunk(empty_ids, encoder, clip_skip, sdxl_style)[0][0].float()
        for k, chunk in enumerate(chunks):
            weights = torch.tensor([w for _, w in chunk], dtype=torch.float32, device=z_empty.device)
            if bool((weights != 1.0).any()):
                z = outputs[k].float()
                # ComfyUI: z = (z - z_empty) * w + z_empty per token position; w == 1 leaves z as it was
                weighted = (z - z_empty) * weights[:, None] + z_empty
                weighted = torch.where((weights != 1.0)[:, None], weighted, z)
                outputs[k] = weighted.to(outputs[k].dtype)
    return torch.cat(outputs, dim=1), pooled


def encode_prompt(
    text: str, tokenizers: Sequence, text_encoders: Sequence, clip_skip: int = -1, what: str = "prompt"
) -> PromptEmbeds:
    """Encode a ComfyUI-syntax prompt of any length for a diffusers pipeline.

    One encoder (SD1/SD2): clip_skip -1 is the final output, -2 the penultimate layer with the final norm
    (diffusers' `clip_skip=1`), and so on. Two encoders (SDXL), or one CLIPTextModelWithProjection (SDXL
    refiner): clip_skip -1 is the penultimate layer without norm (diffusers' default), -2 one deeper;
    outputs are concatenated on the feature axis and `pooled` is the last encoder's projection of the
    first chunk. Token weights interpolate from the empty prompt's embedding like ComfyUI. A prompt
    past a bound raises PromptError naming `what` ("positive prompt"...).
    """
    if len(tokenizers) != len(text_encoders) or len(text_encoders) not in (1, 2):
        raise ValueError("encode_prompt takes one or two tokenizers and as many text encoders")
    if clip_skip > -1:
        raise ValueError(f"clip_skip must be -1 or lower (ComfyUI's CLIP Set Last Layer), got {clip_skip}")
    sdxl_style = len(text_encoders) == 2 or _has_projection(text_encoders[0])

    embeds, pooled = [], None
    with torch.no_grad():
        for tokenizer, encoder in zip(tokenizers, text_encoders):
            z, encoder_pooled = _encode_one(text, tokenizer, encoder, clip_skip, sdxl_style, what)
            embeds.append(z)
            pooled = encoder_pooled if encoder_pooled is not None else pooled
    last = next(text_encoders[-1].parameters())
    length = min(z.shape[1] for z in embeds)  # ComfyUI cuts to the shorter (tokenizers may differ)
    embeds = torch.cat([z[:, :length].to(device=last.device, dtype=last.dtype) for z in embeds], dim=-1)
    return PromptEmbeds(embeds=embeds, pooled=pooled)


def pad_to_same_length(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat `[batch, tokens, dim]` embeds along the token axis to the lcm of both lengths (ComfyUI).

    Cross-attention over a sequence repeated whole gives the same result, so positive and negative
    prompts of different chunk counts can go to diffusers together.
    """
    if a.shape[1] == b.shape[1]:
        return a, b
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(f"embeds differ in more than the token axis: {tuple(a.shape)} vs {tuple(b.shape)}")
    length = math.lcm(a.shape[1], b.shape[1])

    def repeat(x: torch.Tensor) -> torch.Tensor:
        return x if x.shape[1] == length else x.repeat(1, length // x.shape[1], 1)

    return repeat(a), repeat(b)


def match_lengths(
    a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """`[batch, tokens, dim]` embeds of one length, for diffusers, which takes positive and negative
    together; and, when they had to be padded, the `[batch, tokens]` masks of their real tokens.

    As ComfyUI: repeated to the lcm of both lengths while that is at most MAX_REPEAT times the shorter
    (pad_to_same_length; equal lengths are returned as they are). Past that, ComfyUI runs the two
    conds in separate batches; here the shorter is padded with zeros to the longer and its padding is
    masked out of cross-attention (the sampler passes the masks to the UNet), which gives the same
    attention without repeating anything (49 against 47 chunks would be 2,303 chunks at the lcm).
    """
    la, lb = a.shape[1], b.shape[1]
    if la == lb or math.lcm(la, lb) // min(la, lb) <= MAX_REPEAT:
        return (*pad_to_same_length(a, b), None)
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(f"embeds differ in more than the token axis: {tuple(a.shape)} vs {tuple(b.shape)}")
    length = max(la, lb)

    def padded(x: torch.Tensor) -> torch.Tensor:
        pad = x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])
        return torch.cat([x, pad], dim=1) if pad.shape[1] else x

    def mask(x: torch.Tensor) -> torch.Tensor:
        real = torch.arange(length, device=x.device) < x.shape[1]
        return real.expand(x.shape[0], length)

    return padded(a), padded(b), (mask(a), mask(b))
