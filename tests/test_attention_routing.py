"""``--attention`` / ``attention=``: a plugin's attention backend takes the transformer's attention
calls (diffgen.attention). A fake backend, registered in-process, computes attention from its
definition in float64 and counts its calls; the routed model must match the unrouted one."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffgen.attention import (SDPA, AttentionBackend, AttentionCall, install_attention, register_attention_backend,
                               remove_attention, unregister_attention_backend)
from diffgen.cli import main
from diffgen.errors import DiffgenError
from diffgen.loader import load_transformer
from diffgen.tiny.pipelines import build_tiny_pipeline
from diffgen.tiny.transformers import save_tiny_transformer, tiny_transformer, tiny_transformer_inputs

from .conftest import run


class DefinitionAttention(AttentionBackend):
    """softmax(q k^T * scale) v written out in float64: independent of PyTorch's SDPA."""

    name = "definition"
    description = "float64 attention from its definition (test)"

    def __init__(self, unavailable: str | None = None, head_dims=None):
        self.unavailable, self.head_dims, self.shapes = unavailable, head_dims, []

    def unavailable_reason(self, platform):
        return self.unavailable

    def call_unsupported_reason(self, call: AttentionCall):
        if self.head_dims and call.query.shape[-1] not in self.head_dims:
            return f"head dim {call.query.shape[-1]}"
        return None

    def attention(self, call: AttentionCall) -> torch.Tensor:
        q, k, v = (x.double().transpose(1, 2) for x in (call.query, call.key, call.value))  # [B, H, L, D]
        scale = call.scale if call.scale is not None else 1 / math.sqrt(q.shape[-1])
        self.shapes.append((tuple(call.query.shape), tuple(call.key.shape)))
        out = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v
        return out.transpose(1, 2).to(call.query.dtype)


@pytest.fixture
def backend():
    fake = DefinitionAttention()
    register_attention_backend(fake)
    yield fake
    unregister_attention_backend(fake.name)


def attention_modules(model) -> int:
    return sum(1 for m in model.modules() if hasattr(getattr(m, "processor", None), "_attention_backend"))


# fp32 models on the CPU; SDPA (fp32) and the float64 definition differ by rounding only: the tiny
# models' outputs are O(1), and 1e-4 is ~1000 fp32 ulps, far below any routing mistake (a dropped
# head or a wrong layout changes outputs at O(1)).
TOL = 1e-4


@pytest.mark.parametrize("family", ["flux1", "wan"])
def test_the_flag_routes_every_attention_call_and_the_output_is_unchanged(family, backend, tmp_path):
    path = save_tiny_transformer(family, tmp_path / family, seed=0, dtype=torch.float32)
    plain = load_transformer(path, device="cpu", dtype=torch.float32)
    routed = load_transformer(path, device="cpu", dtype=torch.float32, attention="definition")
    inputs = tiny_transformer_inputs(family, tiny_transformer(family, seed=0), seed=1)
    assert plain.diffgen_attention.backend == SDPA
    expected = run(plain, inputs)
    got = run(routed, inputs)
    stats = routed.diffgen_attention
    assert stats.backend == "definition" and stats.modules == attention_modules(routed) > 0
    assert stats.calls == len(backend.shapes) == stats.modules and not stats.fallbacks  # one forward
    if family == "wan":  # self attention over the video tokens, cross attention over the text: Lq != Lk
        assert any(q[1] != k[1] for q, k in backend.shapes)
    torch.testing.assert_close(got, expected, rtol=TOL, atol=TOL)
    remove_attention(routed)
    backend.shapes.clear()
    torch.testing.assert_close(run(routed, inputs), expected, rtol=TOL, atol=TOL)
    assert not backend.shapes  # undone: diffusers' dispatch again


def test_calls_the_backend_declines_fall_back_to_sdpa_and_are_counted(backend):
    backend.head_dims = (128,)  # the tiny FLUX.1 has head dim 16
    model = tiny_transformer("flux1", seed=0)
    inputs = tiny_transformer_inputs("flux1", model, seed=1)
    expected = run(model, inputs)
    stats = install_attention(model, backend)
    torch.testing.assert_close(run(model, inputs), expected, rtol=0, atol=0)  # SDPA itself ran
    assert stats.calls == 0 and stats.fallbacks == {"head dim 16": stats.modules}


def masked_sdpa(q, k, v, mask):
    out = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask)
    return out.transpose(1, 2)


def test_masks_padding_masks_and_what_falls_back(backend):
    import diffusers.models.attention_dispatch as dispatch

    model = tiny_transformer("flux1", seed=0)
    stats = install_attention(model, backend)
    routed = next(m.processor._attention_backend for m in model.modules() if hasattr(m, "processor"))
    q, k, v = torch.randn(2, 5, 2, 16), torch.randn(2, 7, 2, 16), torch.randn(2, 7, 2, 16)
    # A mask that is not a key-padding mask (it differs per query): diffusers' dispatch runs it.
    causal_like = torch.ones(5, 7, dtype=torch.bool).tril()[None, None]
    got = dispatch.dispatch_attention_fn(q, k, v, attn_mask=causal_like, backend=routed)
    torch.testing.assert_close(got, masked_sdpa(q, k, v, causal_like), rtol=TOL, atol=TOL)
    assert stats.fallbacks == {"attention mask": 1} and stats.calls == 0
    # Key padding, different per batch element, bool and additive: the backend gets the kept keys.
    padding = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    padding[0, ..., 5:] = False
    padding[1, ..., 2] = False
    additive = torch.zeros(2, 1, 1, 7).masked_fill(~padding, -math.inf)
    for mask in (padding, additive):
        got = dispatch.dispatch_attention_fn(q, k, v, attn_mask=mask, backend=routed)
        torch.testing.assert_close(got, masked_sdpa(q, k, v, padding), rtol=TOL, atol=TOL)
    assert stats.calls == 4 and [shape[1][1] for shape in backend.shapes] == [5, 6, 5, 6]
    # Masks that mask nothing are dropped.
    dispatch.dispatch_attention_fn(q, k, v, attn_mask=torch.ones(2, 1, 1, 7, dtype=torch.bool), backend=routed)
    dispatch.dispatch_attention_fn(q, k, v, attn_mask=torch.zeros(2, 7), backend=routed)
    assert stats.calls == 6
    dispatch.dispatch_attention_fn(q, k, v, attn_mask=torch.randn(2, 1, 1, 7), backend=routed)  # a bias
    dispatch.dispatch_attention_fn(q, k, v, is_causal=True, backend=routed)
    dispatch.dispatch_attention_fn(q, k, v, dropout_p=0.1, backend=routed)
    assert stats.fallbacks == {"attention mask": 2, "causal": 1, "dropout": 1} and stats.calls == 6


def test_a_backend_that_cannot_run_here_is_an_error_before_any_weight_is_read(tmp_path):
    fake = DefinitionAttention(unavailable="needs an FP8 GPU")
    register_attention_backend(fake)
    try:
        with pytest.raises(DiffgenError, match="--attention definition cannot run on cpu.*needs an FP8 GPU"):
            load_transformer(tmp_path / "missing", device="cpu", attention="definition")
    finally:
        unregister_attention_backend(fake.name)


def test_an_unknown_backend_is_an_error_naming_the_known_ones(flux_dir):
    with pytest.raises(DiffgenError, match="--attention fp8: no installed plugin.*known here: sdpa"):
        load_transformer(flux_dir, device="cpu", attention="fp8")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return build_tiny_pipeline("flux1", tmp_path_factory.mktemp("flux1"), seed=0)


def test_generate_flag_routes_and_perf_json_and_inspect_say_which_attention_ran(backend, flux, tmp_path, capsys):
    perf = tmp_path / "perf.json"
    argv = ["generate", "--model-path", str(flux), "--prompt", "a fox", "--height", "32", "--width", "32",
            "--num-inference-steps", "2", "--dtype", "fp32", "--device", "cpu", "--output-path", str(tmp_path),
            "--quiet", "--perf-json", str(perf), "--attention", "definition"]
    assert main(argv) == 0
    attention = json.loads(perf.read_text())["attention"]["transformer"]
    assert attention["backend"] == "definition" and attention["fallbacks"] == {}
    assert attention["calls"] == len(backend.shapes) > 0 and attention["calls"] % attention["modules"] == 0
    assert main(["inspect", str(flux / "transformer"), "--device", "cpu", "--attention", "definition"]) == 0
    assert "attention * definition: float64 attention from its definition (test) (available)" in capsys.readouterr().out


def test_generate_says_when_the_asked_backend_handed_calls_back(flux, tmp_path, capsys):
    """A backend that declines every call (here: a head dim it lacks) leaves the run on diffusers'
    attention; generate says so with the reason and the counts, instead of a silent SDPA run."""
    picky = DefinitionAttention(head_dims=(128,))
    register_attention_backend(picky)
    try:
        argv = ["generate", "--model-path", str(flux), "--prompt", "a fox", "--height", "32", "--width", "32",
                "--num-inference-steps", "2", "--dtype", "fp32", "--device", "cpu", "--output-path", str(tmp_path),
                "--perf-json", str(tmp_path / "perf.json"), "--attention", "definition"]
        assert main(argv) == 0
    finally:
        unregister_attention_backend(picky.name)
    stats = json.loads((tmp_path / "perf.json").read_text())["attention"]["transformer"]
    fallbacks = stats["fallbacks"]["head dim 16"]
    assert stats["calls"] == 0 and fallbacks > 0 and not picky.shapes
    assert (f"diffgen: transformer: --attention definition ran 0 of {fallbacks} attention calls; the rest ran "
            f"diffusers' attention: {fallbacks} x head dim 16") in capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("family", ["flux1", "wan", "qwen_image"])
def test_the_sdpa_kernel_of_every_eager_call_is_counted(family, tmp_path):
    """diffusers' native attention counts which PyTorch SDPA kernel each eager call took, as PyTorch
    chose it: forcing one kernel with torch's own sdpa_kernel context must show up as that kernel
    alone, for every attention call of a forward (Qwen-Image passes a text mask, Wan cross attention
    has Lq != Lk)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    path = save_tiny_transformer(family, tmp_path / family, seed=0, dtype=torch.float32)
    model = load_transformer(path, device="cpu", dtype=torch.float32)
    inputs = tiny_transformer_inputs(family, tiny_transformer(family, seed=0), seed=1)
    stats = model.diffgen_attention
    calls = attention_modules(model)
    expected = run(model, inputs)
    assert sum(stats.sdpa_kernels.values()) == calls > 0 and set(stats.sdpa_kernels) <= {"flash", "math"}
    for forced, name in ((SDPBackend.MATH, "math"), (SDPBackend.FLASH_ATTENTION, "flash")):
        stats.sdpa_kernels.clear()
        with sdpa_kernel([forced]):
            torch.testing.assert_close(run(model, inputs), expected, rtol=TOL, atol=TOL)
        assert stats.sdpa_kernels == {name: calls}
    stats.sdpa_kernels.clear()
    other = tiny_transformer(family, seed=0)  # a model diffgen did not load: not counted, not disturbed
    run(other, inputs)
    assert not stats.sdpa_kernels and getattr(other, "diffgen_attention", None) is None


def test_compiled_attention_is_not_counted(flux_dir):
    model = load_transformer(flux_dir, device="cpu", dtype=torch.float32)
    inputs = tiny_transformer_inputs("flux1", tiny_transformer("flux1", seed=0), seed=1)
    block = model.transformer_blocks[0]
    block.compile(backend="eager", fullgraph=True)  # the counting wrapper must not break the graph
    try:
        run(model, inputs)
    finally:
        torch._dynamo.reset()
    # the compiled block's attention made its choice when traced; the other blocks ran eagerly
    assert sum(model.diffgen_attention.sdpa_kernels.values()) == attention_modules(model) - 1
    model.diffgen_attention.sdpa_kernels.clear()
    whole = torch.compile(load_transformer(flux_dir, device="cpu", dtype=torch.float32), backend="eager",
                          fullgraph=True)  # the counting hooks too must trace without a break
    try:
        run(whole, inputs)
    finally:
        torch._dynamo.reset()
    assert not whole.diffgen_attention.sdpa_kernels


def test_perf_json_says_which_sdpa_kernel_ran(flux, tmp_path):
    perf = tmp_path / "perf.json"
    assert main(["generate", "--model-path", str(flux), "--prompt", "a fox", "--height", "32", "--width", "32",
                 "--num-inference-steps", "2", "--dtype", "fp32", "--device", "cpu", "--output-path", str(tmp_path),
                 "--quiet", "--perf-json", str(perf)]) == 0
    attention = json.loads(perf.read_text())["attention"]["transformer"]
    transformer = load_transformer(flux / "transformer", device="cpu", dtype=torch.float32)
    assert attention["backend"] == SDPA and attention["calls"] == 0  # no backend routed
    # every attention module once per step, each call counted with the kernel PyTorch chose
    assert sum(attention["sdpa_kernels"].values()) == 2 * attention_modules(transformer)
    assert set(attention["sdpa_kernels"]) <= {"flash", "math"}
