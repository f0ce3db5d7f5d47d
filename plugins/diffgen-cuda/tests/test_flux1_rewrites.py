"""diffgen_cuda.flux1: fused Q/K/V and FLUX.1 blocks that hand quantized linears a prepared input.

Q/K/V fusion computes the same dot products (only fp32 summation order may differ), so a fused
model matches an unfused one to rounding. For the blocks: on the CPU the prepared inputs come from
Fp8ScaledMMMethod's PyTorch producers (torch._scaled_mm runs on the CPU), which are the very ops of
diffusers' blocks. So a rewritten model must give diffusers' own forward's numbers bit for bit,
with the same layers: any slip in the rewrite's wiring (an operand, a gate, the text/image order)
shows. The Triton producers that replace these on CUDA are tested against the same references in
test_producers_gpu.py.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffgen
from diffgen.builtin.fp8_methods import Fp8ScaledMMMethod
from diffgen.linear import QuantLinear
from diffgen.platform import resolve
from diffgen.rewrites import apply_rewrites, undo_rewrites
from diffgen.testing.rewrites import assert_rewrites_exact
from diffgen.tiny.transformers import save_tiny_transformer, tiny_transformer, tiny_transformer_inputs
from diffgen_cuda import flux1

WEIGHTS = "diffusion_pytorch_model.safetensors"
ATTENTIONS = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
BLOCKS = ["transformer_blocks.0", "single_transformer_blocks.0"]
CPU, _ = resolve("cpu")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_tiny_transformer("flux1", tmp_path_factory.mktemp("flux") / "transformer", seed=0, dtype=torch.float32)


@pytest.fixture(scope="module")
def inputs():
    return tiny_transformer_inputs("flux1", tiny_transformer("flux1", seed=0), seed=1)


def bf16(inputs):
    return {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0].float()


def static_fp8_checkpoint(src, dst, input_scales=None):
    """diffgen's per-tensor fp8 checkpoint made static, as ModelOpt exports are: one input_scale
    per quantized linear (``input_scales`` overrides some)."""
    diffgen.quantize(src, dst, scheme="per-tensor")
    tensors = load_file(dst / WEIGHTS)
    for name in [n for n in tensors if n.endswith(".weight_scale")]:
        layer = name[: -len(".weight_scale")]
        tensors[f"{layer}.input_scale"] = torch.tensor((input_scales or {}).get(layer, 4.0 / 448))
    save_file(tensors, dst / WEIGHTS)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["activation_scheme"] = "static"
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# -- Q/K/V fusion ----------------------------------------------------------------------------
def assert_same_output(a, b, inputs):
    ya, yb = run(a, inputs), run(b, inputs)
    assert torch.allclose(ya, yb, rtol=1e-5, atol=1e-5 * yb.abs().max().item())


def test_loading_fuses_qkv_exactly(flux_dir, inputs):
    fused = diffgen.load_transformer(flux_dir, quantization="fp8", device="cpu", dtype=torch.float32)
    plain = diffgen.load_transformer(flux_dir, quantization="fp8", device="cpu", dtype=torch.float32, rewrites=False)
    # On the CPU the fp8 reference runs: it fuses, but takes no prepared input, so no block is rewritten.
    assert fused.diffgen_rewrites == {name: "flux1-fused-qkv" for name in ATTENTIONS}
    assert plain.diffgen_rewrites == {}
    double = fused.get_submodule("transformer_blocks.0.attn")
    assert double.fused_projections and isinstance(double.to_qkv, QuantLinear)
    assert isinstance(double.to_added_qkv, QuantLinear)
    assert not hasattr(double, "to_q") and not hasattr(double, "add_q_proj")  # no weight held twice
    single = fused.get_submodule("single_transformer_blocks.0.attn")
    assert single.to_qkv.out_features == 3 * plain.get_submodule("single_transformer_blocks.0.attn.to_q").out_features
    assert single.to_qkv.method.layer.name == "single_transformer_blocks.0.attn.to_qkv"
    assert_same_output(fused, plain, inputs)


def test_static_scales_fuse_with_per_channel_weight_scales(flux_dir, inputs, tmp_path):
    """ModelOpt-style: per-tensor weight scales that differ per projection, one input scale."""
    ckpt = static_fp8_checkpoint(flux_dir, tmp_path / "fp8")
    fused = diffgen.load_transformer(ckpt, device="cpu", dtype=torch.float32)
    plain = diffgen.load_transformer(ckpt, device="cpu", dtype=torch.float32, rewrites=False)
    qkv = fused.get_submodule("transformer_blocks.0.attn.to_qkv")
    assert qkv.method.scheme == "per-channel" and qkv.weight_scale.shape == (qkv.out_features,)
    parts = [plain.get_submodule(f"transformer_blocks.0.attn.to_{p}") for p in "qkv"]
    assert torch.equal(qkv.weight_scale, torch.cat([p.weight_scale.reshape(1).expand(p.out_features) for p in parts]))
    x = torch.randn(7, qkv.in_features) * 3
    assert torch.allclose(qkv(x), torch.cat([p(x) for p in parts], dim=-1), rtol=1e-5, atol=1e-5)
    assert_same_output(fused, plain, inputs)


def test_unequal_input_scales_block_scales_and_16bit_parts_are_not_fused(flux_dir, tmp_path):
    ckpt = static_fp8_checkpoint(flux_dir, tmp_path / "fp8", {"transformer_blocks.0.attn.to_k": 5.0 / 448})
    model = diffgen.load_transformer(ckpt, device="cpu", dtype=torch.float32)
    assert list(model.diffgen_rewrites) == ["single_transformer_blocks.0.attn"]
    assert isinstance(model.get_submodule("transformer_blocks.0.attn.to_k"), QuantLinear)

    diffgen.quantize(flux_dir, tmp_path / "block", scheme="block")
    assert diffgen.load_transformer(tmp_path / "block", device="cpu", dtype=torch.float32).diffgen_rewrites == {}

    partial = diffgen.load_transformer(flux_dir, quantization="fp8", device="cpu", dtype=torch.float32,
                                       quantization_ignored_layers=["transformer_blocks.0.attn.add_v_proj"])
    assert list(partial.diffgen_rewrites) == ["single_transformer_blocks.0.attn"]
    assert type(partial.get_submodule("transformer_blocks.0.attn.add_v_proj")) is torch.nn.Linear


# -- blocks with prepared inputs -------------------------------------------------------------
def _rowwise_scaled_mm_on_cpu() -> bool:
    q = torch.zeros(2, 16, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(q, q.t(), scale_a=torch.ones(2, 1), scale_b=torch.ones(1, 2), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


# The PyTorch producers end in torch._scaled_mm with row-wise scales, which runs on the CPU from
# torch 2.13 (torch 2.11's CPU path takes per-tensor scales only).
needs_cpu_scaled_mm = pytest.mark.skipif(not _rowwise_scaled_mm_on_cpu(),
                                         reason="this torch's CPU torch._scaled_mm takes per-tensor scales only")


class CountingProducers(Fp8ScaledMMMethod):
    """The reference producers, asking for prepared inputs, counting their calls."""

    prepared_inputs = True
    calls: Counter = Counter()

    def prepare_norm_modulate(self, *args):
        self.calls["norm_modulate"] += 1
        return super().prepare_norm_modulate(*args)

    def prepare_gelu_concat(self, *args):
        self.calls["gelu_concat"] += 1
        return super().prepare_gelu_concat(*args)


def load_counting(path, **kwargs):
    """A bf16 model whose quantized linears run CountingProducers, not rewritten."""
    model = diffgen.load_transformer(path, device="cpu", dtype=torch.bfloat16, rewrites=False, **kwargs)
    for layer in model.modules():
        if isinstance(layer, QuantLinear):
            layer.method = CountingProducers(layer.method.config, layer.method.layer)
            layer.method.process_weights_after_loading(layer)
    return model


def load(path, **kwargs):
    """A bf16 model whose quantized linears run CountingProducers, Q/K/V fused, blocks not rewritten."""
    model = load_counting(path, **kwargs)
    assert apply_rewrites(model, [flux1.FuseFluxAttentionQKV()], CPU) == {a: "flux1-fused-qkv" for a in ATTENTIONS}
    return model


def assert_blocks_exact(model, inputs, expected_calls, blocks=BLOCKS):
    done = assert_rewrites_exact(model, inputs, flux1.REWRITES[1:], CPU, run=run)
    assert list(done) == blocks
    CountingProducers.calls.clear()
    run(model, inputs)
    assert CountingProducers.calls == expected_calls  # the producers did run
    undo_rewrites(model)


ALL_CALLS = Counter(norm_modulate=5, gelu_concat=3)


@needs_cpu_scaled_mm
def test_rewritten_blocks_give_diffusers_numbers_dynamic(flux_dir, inputs):
    # Double block: Q/K/V, added Q/K/V and both feed-forwards' first linears; single: one norm for Q/K/V and
    # proj_mlp. GELU feeds ff.net.2 and ff_context.net.2, and the single block's proj_out with the attention.
    assert_blocks_exact(load(flux_dir, quantization="fp8"), bf16(inputs), ALL_CALLS)


@needs_cpu_scaled_mm
def test_rewritten_blocks_give_diffusers_numbers_static(flux_dir, inputs, tmp_path):
    assert_blocks_exact(load(static_fp8_checkpoint(flux_dir, tmp_path / "fp8")), bf16(inputs), ALL_CALLS)


@needs_cpu_scaled_mm
def test_16bit_linears_get_the_16bit_value(flux_dir, inputs):
    """An ignore list keeps proj_mlp and one ff.net.2 in bf16: the norm pass also writes its bf16 output
    for proj_mlp, and ff.net.2 gets plain GELU."""
    model = load(flux_dir, quantization="fp8", quantization_ignored_layers=[
        "single_transformer_blocks.0.proj_mlp", "transformer_blocks.0.ff.net.2"])
    assert type(model.get_submodule("single_transformer_blocks.0.proj_mlp")) is torch.nn.Linear
    assert_blocks_exact(model, bf16(inputs), Counter(norm_modulate=5, gelu_concat=2))


def test_unequal_static_scales_on_one_input_leave_the_block_alone(flux_dir, inputs, tmp_path):
    ckpt = static_fp8_checkpoint(flux_dir, tmp_path / "fp8", {"single_transformer_blocks.0.proj_mlp": 5.0 / 448})
    model = load(ckpt)
    declined = {}
    assert apply_rewrites(model, flux1.REWRITES[1:], CPU, declined=declined) == {BLOCKS[0]: "flux1-double-block"}
    assert "static scales" in declined[BLOCKS[1]][1]


def test_methods_without_prepared_inputs_leave_blocks_alone(flux_dir):
    # On the CPU the fp8 family runs its reference method, which takes no prepared input.
    model = diffgen.load_transformer(flux_dir, quantization="fp8", device="cpu", dtype=torch.bfloat16, rewrites=False)
    declined = {}
    assert apply_rewrites(model, flux1.REWRITES, CPU, declined=declined) == {a: "flux1-fused-qkv" for a in ATTENTIONS}
    assert all("prepared input" in declined[b][1] for b in BLOCKS)


def test_where_the_prologue_kernel_runs_weight_only_blocks_are_rewritten(flux_dir, inputs, monkeypatch):
    """With fused (so quantized) Q/K/V and no linear taking a prepared input, a block still gets the
    rewritten forward where the prologue kernel loads: the kernel alone beats diffusers' ops. The
    kernel declines CPU tensors, so here the forward runs diffusers' ops and gives their numbers."""
    monkeypatch.setattr(flux1, "prologue_kernels", lambda platform: ("kernel", "operator"))
    model = diffgen.load_transformer(flux_dir, quantization="fp8", device="cpu", dtype=torch.bfloat16, rewrites=False)
    assert apply_rewrites(model, flux1.REWRITES[:1], CPU) == {a: "flux1-fused-qkv" for a in ATTENTIONS}
    done = assert_rewrites_exact(model, bf16(inputs), flux1.REWRITES[1:], CPU, run=run)
    assert list(done) == BLOCKS
    assert all(model.get_submodule(b).diffgen_qk_norm_rope == ("kernel", "operator") for b in BLOCKS)


@needs_cpu_scaled_mm
def test_batch_of_two_and_attention_kwargs(flux_dir):
    """Two samples take their own modulation rows; joint_attention_kwargs (IP-Adapter, masks) make
    the blocks fall back to diffusers' forward."""
    batch = bf16(tiny_transformer_inputs("flux1", tiny_transformer("flux1", seed=0), seed=2, batch=2))
    model = load(flux_dir, quantization="fp8")
    assert_blocks_exact(model, batch, ALL_CALLS)
    apply_rewrites(model, flux1.REWRITES, CPU)
    CountingProducers.calls.clear()
    stock = run(model, {**batch, "joint_attention_kwargs": {"attention_mask": None}})
    assert not CountingProducers.calls
    undo_rewrites(model)
    assert torch.equal(stock, run(model, batch))


@needs_cpu_scaled_mm
def test_compiled_blocks_trace_the_rewritten_forward(flux_dir, inputs):
    """Under torch.compile the rewritten forward is traced in one graph per block, producers included."""
    model, x = load(flux_dir, quantization="fp8"), bf16(inputs)
    stock = run(model, x)
    apply_rewrites(model, flux1.REWRITES, CPU)
    for name in BLOCKS:
        model.get_submodule(name).compile(backend="eager", fullgraph=True)
    CountingProducers.calls.clear()
    try:
        assert torch.equal(run(model, x), stock)
        assert CountingProducers.calls == ALL_CALLS  # counted while tracing
    finally:
        torch._dynamo.reset()


@needs_cpu_scaled_mm
def test_the_prologue_is_diffusers_ops_where_no_kernel_runs(flux_dir, inputs, monkeypatch):
    """On the CPU the rewrite loads no prologue kernel; the prologue is then qk_norm_rope, diffusers' ops."""
    calls = Counter()
    original = flux1.qk_norm_rope

    def counting(*args):
        calls["qk_norm_rope"] += 1
        return original(*args)

    monkeypatch.setattr(flux1, "qk_norm_rope", counting)
    model = load(flux_dir, quantization="fp8")
    assert_rewrites_exact(model, bf16(inputs), flux1.REWRITES[1:], CPU, run=run)
    assert all(model.get_submodule(b).diffgen_qk_norm_rope is None for b in BLOCKS)
    assert calls["qk_norm_rope"] == 2


def test_installed_plugin_publishes_the_rewrites(flux_dir):
    from diffgen.plugins import get_plugin_host

    host = get_plugin_host()
    if host.plugins["cuda"].distribution != "diffgen-cuda":
        pytest.skip("diffgen-cuda is not installed (registered from the source tree): no entry points")
    published = [type(r) for r in host.rewrites()]
    assert [t for t in published if t.__module__ == flux1.__name__] == [type(r) for r in flux1.REWRITES]
    report = diffgen.inspect(flux_dir, quantization="fp8")
    assert {r["rewrite"]: r["modules"] for r in report["rewrites"]} == \
        {"flux1-fused-qkv": 2, "flux1-double-block": 1, "flux1-single-block": 1}
