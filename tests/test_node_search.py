"""Searching ComfyUI's node list for what the pack does finds the pack's node on the first screen.

ComfyUI's frontend (1.35.9, the one ComfyUI 0.8 ships) ranks search results by the node id and the
display name only (NodeSearchService: Fuse keys "name" and "display_name"), with FuseSearch's
auxiliary scores: exact match, then a name starting with the query, then the query as a whole word,
then as a substring; within each, nodes used more often first (its sorted-custom-node-map.json),
then shorter names. `aux_score` is a port of that function (no Python package has it). The rivals
are every ComfyUI 0.8 core node the queries match, with the frontend's usage counts.
"""

from __future__ import annotations

import re

import pytest

from comfyui_diffusers_adapters.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# (id, display name, usage count) of ComfyUI 0.8's core nodes that these queries match.
CORE_RIVALS = [
    ("CreateHookLora", "Create Hook LoRA", 3),
    ("CreateHookLoraModelOnly", "Create Hook LoRA (MO)", 1),
    ("CreateHookModelAsLora", "Create Hook Model as LoRA", 1),
    ("CreateHookModelAsLoraModelOnly", "Create Hook Model as LoRA (MO)", 0),
    ("DiffusersLoader", "DiffusersLoader", 12),
    ("LoraLoader", "Load LoRA", 861),
    ("LoraLoaderModelOnly", "LoraLoaderModelOnly", 447),
    ("LoraModelLoader", "Load LoRA Model", 84),
    ("LoraSave", "Extract and Save Lora", 0),
    ("SaveLoRA", "Save LoRA Weights", 0),
    ("TrainLoraNode", "Train LoRA", 41),
    ("WanCameraEmbedding", "WanCameraEmbedding", 11),
]
# query -> the pack node it must bring up, and the most results above it (the first screen of the
# search box shows about eight).
QUERIES = {
    "lora": ("DiffusersAdaptersLoadLoRA", 5),
    "ip-adapter": ("DiffusersAdaptersApplyIPAdapter", 1),
    "embedding": ("DiffusersAdaptersLoadTextualInversion", 2),
    "faceid": ("DiffusersAdaptersFaceIDEmbed", 1),
    "dreambooth": ("DiffusersAdaptersLoadDreamBooth", 1),
    "diffusers": ("DiffusersAdaptersLoadDreamBooth", 10),
}
WORDS = re.compile(r" |\b|(?<=[a-z])(?=[A-Z])|(?=[A-Z][a-z])")


def aux_single(query: str, text: str) -> list[float]:
    """FuseSearch.calcAuxSingle: [match kind, position and length, length] (lower is better)."""
    words = [w.lower() for w in WORDS.split(text)]
    text = text.lower()
    if text == query:
        return [0, 0, 0]
    if text.startswith(query):
        return [1, 0, len(text)]
    if query in words:
        return [2, text.index(query) + len(text) * 0.5, len(text)]
    if query in text:
        return [3, text.index(query) + len(text) * 0.5, len(text)]
    return [9, 0, 0]


def aux_score(query: str, name: str, display: str, uses: float) -> list[float]:
    """calcAuxScores then NodeDef.postProcessSearchScores: the better of id and display name, with
    the usage count (negated) right after the match kind."""
    best = min(aux_single(query, name), aux_single(query, display))
    return [best[0], -uses, *best[1:]]


def ranking(query: str) -> list[str]:
    pack = [(name, NODE_DISPLAY_NAME_MAPPINGS[name], 0) for name in NODE_CLASS_MAPPINGS]
    found = [n for n in CORE_RIVALS + pack if query in n[0].lower() or query in n[1].lower()]
    return [n[0] for n in sorted(found, key=lambda n: aux_score(query, *n))]


@pytest.mark.parametrize("query", sorted(QUERIES))
def test_search_brings_the_pack_node_to_the_first_screen(query):
    node, place = QUERIES[query]
    order = ranking(query)
    assert node in order[:place], f"{query!r}: {node} is not in the first {place} of {order}"


def test_the_port_ranks_as_the_frontend_did_before_the_rename():
    """What the issue saw in the editor: "Load LoRA (Diffusers)" came 11th for "lora"."""
    display = NODE_DISPLAY_NAME_MAPPINGS["DiffusersAdaptersLoadLoRA"]
    NODE_DISPLAY_NAME_MAPPINGS["DiffusersAdaptersLoadLoRA"] = "Load LoRA (Diffusers)"
    try:
        assert ranking("lora").index("DiffusersAdaptersLoadLoRA") == 10
    finally:
        NODE_DISPLAY_NAME_MAPPINGS["DiffusersAdaptersLoadLoRA"] = display


@pytest.mark.parametrize("query", sorted(QUERIES))
def test_search_aliases_name_the_query(query):
    """SEARCH_ALIASES, for ComfyUI versions whose frontend searches them."""
    node, _ = QUERIES[query]
    assert query in NODE_CLASS_MAPPINGS[node].SEARCH_ALIASES


def test_every_node_has_search_aliases_and_keeps_its_id():
    for name, node_class in NODE_CLASS_MAPPINGS.items():
        aliases = node_class.SEARCH_ALIASES
        assert aliases and all(isinstance(a, str) and a == a.lower() for a in aliases), name
        assert name == f"DiffusersAdapters{node_class.__name__}"
