"""Faults: an error, a KeyboardInterrupt or a ComfyUI-style interrupt at points of applying adapters
or of sampling leaves the pipeline bit-exactly as before (every parameter and buffer, the tokenizers'
vocabularies, the attention processors and their scales, the scheduler), and the next run succeeds
and gives the image a freshly built pipeline gives."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders import IPAdapterMixin, TextualInversionLoaderMixin
from ip_adapter_lib import flatten, ip_adapter_nested, write_vision_files
from lora_fixtures import fresh_handle, write_kohya
from safetensors.torch import save_file

from comfyui_diffusers_adapters.loaders import embedding_files, lora_files, lora_patcher
from comfyui_diffusers_adapters.loaders.pipeline_handle import materialized
from comfyui_diffusers_adapters.nodes import comfy_host
from comfyui_diffusers_adapters.nodes.apply_ip_adapter import ApplyIPAdapter
from comfyui_diffusers_adapters.nodes.load_lora import LoadLoRA
from comfyui_diffusers_adapters.nodes.load_textual_inversion import LoadTextualInversion
from comfyui_diffusers_adapters.nodes.sampler import Sampler
from testlib import tiny_pipeline

PROMPT, NEGATIVE = "a photo of <emb> riding a horse", "blurry"
IMAGE = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
VISION = "tiny_vit_transformers.safetensors"
FAULTS = {
    "error": lambda: RuntimeError("simulated failure"),
    "keyboard-interrupt": lambda: KeyboardInterrupt(),
    "comfy-interrupt": lambda: comfy_host.Interrupted("Interrupted by the user."),
}


class Fault:
    """Raises the chosen exception on the n-th call of what it wraps."""

    def __init__(self, kind: str, at: int = 1):
        self.kind, self.at, self.calls = kind, at, 0

    def tick(self) -> None:
        self.calls += 1
        if self.calls == self.at:
            raise FAULTS[self.kind]()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "models"
    for folder in comfy_host.MODEL_FOLDERS:
        (root / folder).mkdir(parents=True)
    write_kohya(root, "a.safetensors")
    write_kohya(root, "b.safetensors", seed=1)
    save_file({"emb_params": torch.randn(2, 64) * 0.5}, str(root / "embeddings" / "emb.safetensors"))
    save_file(
        flatten(ip_adapter_nested(tiny_pipeline("sd1").unet, "base")),
        str(root / "ipadapter" / "ip.safetensors"),
    )
    write_vision_files(root / "clip_vision")
    return root


@pytest.fixture(autouse=True)
def use_files(files):
    comfy_host.set_models_root(files)
    lora_files._cache.clear()
    embedding_files.clear_embedding_cache()
    comfy_host.request_interrupt(False)
    yield
    comfy_host.request_interrupt(False)


def chains(handle):
    """(before, after): the base with LoRA a, and the base with LoRA a at 0.5, LoRA b, an embedding and
    an IP-Adapter acting on the first half of the steps: every kind changes between them."""

    def lora(h, name, strength):
        return LoadLoRA().load(h, name, strength, strength, "unet and text encoders", "")["result"][0]

    before = lora(handle, "a.safetensors", 1.0)
    after = lora(lora(handle, "a.safetensors", 0.5), "b.safetensors", 0.8)
    after = LoadTextualInversion().load(after, "emb.safetensors", "<emb>")["result"][0]
    after = ApplyIPAdapter().apply(after, "ip.safetensors", VISION, IMAGE, 0.7, 0.0, 0.5)["result"][0]
    return before, after


def sample(handle) -> torch.Tensor:
    return Sampler().sample(handle, PROMPT, NEGATIVE, 5, 4, 5.0, 64, 64, 1, "euler", "normal", -1)[0]


def state(pipe) -> dict:
    """Everything a run could leave changed."""
    out = {}
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            out.update({f"{name}.{k}": v.clone() for k, v in module.state_dict().items()})
            out[f"{name}.config"] = dict(module.config) if name != "text_encoder" else module.config.to_dict()
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None:
            out[f"{name}.vocab"] = dict(tokenizer.get_vocab())
            out[f"{name}.added"] = dict(tokenizer.added_tokens_encoder)
    out["processors"] = {
        k: (type(p).__name__, repr(getattr(p, "scale", None))) for k, p in pipe.unet.attn_processors.items()
    }
    out["encoder_hid_proj"] = repr(pipe.unet.encoder_hid_proj)
    out["scheduler"] = (type(pipe.scheduler).__name__, dict(pipe.scheduler.config))
    return out


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.fixture(scope="module")
def reference(files):
    """The image of the `after` chain on a freshly built pipeline (the fresh-process result)."""
    comfy_host.set_models_root(files)
    return sample(chains(fresh_handle())[1])


@pytest.fixture
def shared():
    """A private pipeline per test (a failing test must not leave a broken one to the next)."""
    return fresh_handle()


# ------------------------------------------------------------------ faults while applying adapters
def _wrap_after(monkeypatch, owner, name: str, fault: Fault) -> None:
    """`owner.name` runs as usual, then the fault fires (the worst moment: the change was made)."""
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        fault.tick()
        return result

    monkeypatch.setattr(owner, name, wrapped)


def _wrap_before(monkeypatch, owner, name: str, fault: Fault) -> None:
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        fault.tick()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def inject(point: str, monkeypatch, fault: Fault, pipe) -> None:
    if point == "lora-first-layer":
        _wrap_before(monkeypatch, lora_patcher, "_write", fault)
    elif point == "lora-mid-merge":  # some layers written, the others not
        fault.at = 40
        _wrap_before(monkeypatch, lora_patcher, "_write", fault)
    elif point == "lora-inside-layer":  # a layer's backup taken, its new weight being computed
        fault.at = 10
        merge = "_merged" if hasattr(lora_patcher, "_merged") else "merged_weight"
        _wrap_before(monkeypatch, lora_patcher, merge, fault)
    elif point == "lora-after-last-layer":  # every layer written, the kind not yet marked done
        real = lora_patcher.LoraKind.reconcile

        def reconcile(self, base, current, wanted):
            real(self, base, current, wanted)
            fault.tick()

        monkeypatch.setattr(lora_patcher.LoraKind, "reconcile", reconcile)
    elif point == "ti-inside-diffusers":  # tokens added to the tokenizer, embeddings not yet
        _wrap_after(monkeypatch, type(pipe.tokenizer), "add_tokens", fault)
    elif point == "ti-after-diffusers":
        _wrap_after(monkeypatch, TextualInversionLoaderMixin, "load_textual_inversion", fault)
    elif point == "ip-after-load":
        _wrap_after(monkeypatch, IPAdapterMixin, "load_ip_adapter", fault)
    elif point == "ip-set-scale":
        _wrap_before(monkeypatch, IPAdapterMixin, "set_ip_adapter_scale", fault)
    else:
        raise AssertionError(point)


APPLY_POINTS = [
    "lora-first-layer",
    "lora-mid-merge",
    "lora-inside-layer",
    "lora-after-last-layer",
    "ti-inside-diffusers",
    "ti-after-diffusers",
    "ip-after-load",
    "ip-set-scale",
]


# An Exception and a BaseException that is not one (KeyboardInterrupt) take different paths through
# `except` clauses; ComfyUI's interrupt is an Exception, raised for real in the user-cancel case below.
@pytest.mark.parametrize("kind", ["error", "keyboard-interrupt"])
@pytest.mark.parametrize("point", APPLY_POINTS)
def test_a_fault_while_applying_leaves_the_pipeline_as_before(shared, reference, monkeypatch, point, kind):
    before, after = chains(shared)
    with materialized(before) as pipe:
        expected = state(pipe)
    fault = Fault(kind)
    with monkeypatch.context() as m:
        inject(point, m, fault, shared.base.pipe)
        with pytest.raises(type(FAULTS[kind]())):
            sample(after)
    assert fault.calls >= fault.at > 0, "the fault point was reached"
    assert_same_state(expected, state(shared.base.pipe))
    assert shared.base.applied == before.adapters
    assert torch.equal(sample(after), reference)  # the next run succeeds, as on a fresh pipeline


# ------------------------------------------------------------------ faults while sampling
@pytest.mark.parametrize(
    "point,kind",
    [
        ("step-callback", "error"),
        ("step-callback", "keyboard-interrupt"),
        ("unet-forward", "error"),
        ("unet-forward", "keyboard-interrupt"),
        ("user-cancel", "comfy-interrupt"),
    ],
)
def test_a_fault_while_sampling_leaves_the_pipeline_as_before(shared, reference, monkeypatch, point, kind):
    _, after = chains(shared)
    with materialized(after) as pipe:
        expected = state(pipe)  # the adapters are applied before sampling starts
    fault = Fault(kind, at=2)
    with monkeypatch.context() as m:
        if point == "step-callback":
            real_hook = comfy_host.step_hook

            def step_hook(total, *args, **kwargs):
                hook = real_hook(total, *args, **kwargs)

                def on_step(i, latents):
                    hook(i, latents)
                    fault.tick()

                return on_step

            m.setattr(comfy_host, "step_hook", step_hook)
        elif point == "unet-forward":
            _wrap_before(m, type(shared.base.pipe.unet), "forward", fault)
        else:  # the user presses Cancel during step 2: the next check raises
            real_update = comfy_host._QuietProgressBar.update_absolute

            def update(self, value, total=None, preview=None):
                fault.calls += 1
                if value == 2:
                    comfy_host.request_interrupt()
                return real_update(self, value, total, preview)

            m.setattr(comfy_host._QuietProgressBar, "update_absolute", update)
        with pytest.raises(type(FAULTS[kind]())):
            sample(after)
    assert fault.calls >= 2
    assert_same_state(expected, state(shared.base.pipe))
    assert torch.equal(sample(after), reference)


def test_the_fault_points_change_the_pipeline_when_nothing_fails(shared, reference):
    """Control: `before` and `after` differ in every compared part, so the checks above can fail."""
    before, after = chains(shared)
    with materialized(before) as pipe:
        a = state(pipe)
    with materialized(after) as pipe:
        b = state(pipe)
    changed = {
        k
        for k in a.keys() & b.keys()
        if not (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k])
    }
    assert {"tokenizer.vocab", "processors", "encoder_hid_proj"} <= changed
    assert any(k.startswith("unet.") and k.endswith(".weight") for k in changed)
    assert any(k.startswith("text_encoder.") and k.endswith(".weight") for k in changed)
    assert not torch.equal(sample(before), reference)


def test_a_handle_prints_short_after_sampling_with_every_kind():
    """ComfyUI writes str() of a failed node's inputs into the error and /history: a pipeline socket
    carrying LoRAs, an embedding and an IP-Adapter, after a run, must print in a line, not megabytes."""
    _, after = chains(fresh_handle())
    sample(after)
    text = str(after)
    assert len(text) < 2000 and "tensor(" not in text, text[:300]
    assert "LoraSpec" in text and "IPAdapterSpec" in text and "TextualInversionSpec" in text
    for spec in after.adapters:
        assert len(repr(spec)) < 400
    lora = lora_files.read_lora(comfy_host.resolve_model_path("loras", "a.safetensors"), after.base)
    assert "tensor(" not in repr(lora) and len(repr(lora)) < 400


def test_img2img_and_a_masked_run_keep_every_adapter_in_force():
    """LoRAs, an embedding and an IP-Adapter through the image-to-image path and a noise mask."""
    before, after = chains(fresh_handle())
    args = (PROMPT, NEGATIVE, 6, 4, 5.0, 64, 64, 1, "euler", "normal", -1)
    start = Sampler().sample(before, *args)[1]
    mask = torch.zeros(1, 64, 64)
    mask[..., 32:] = 1.0
    for latent, denoise in ((start, 0.6), ({**start, "noise_mask": mask}, 0.8)):
        ours = Sampler().sample(after, *args, latent_image=latent, denoise=denoise)
        plain = Sampler().sample(before, *args, latent_image=latent, denoise=denoise)
        assert ours[0].shape == (1, 64, 64, 3) and not torch.equal(ours[0], plain[0])
        assert torch.equal(ours[0], Sampler().sample(after, *args, latent_image=latent, denoise=denoise)[0])
