"""The weight-only (packed4) and native (nunchaku) methods' argument preparation, on the CPU,
against the test's independent values; the real kernel calls are marked cuda."""

import pytest
import torch
from safetensors.torch import load_file

from diffgen.linear import QuantLinear
from diffgen.loader import load_transformer
from diffgen.numerics.e2m1 import e2m1_to_float, unpack_e2m1
from diffgen.numerics.int4 import unpack_int4
from diffgen_nunchaku import native
from diffgen_nunchaku.weight_only import prepare_awq, prepare_svdq
import svdq_writer as W

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (SM80+ for packed4)")


def _loaded(checkpoint, family="flux1", precision="int4", **kw):
    pipe, path, _, records = checkpoint(family, precision)
    model = load_transformer(pipe / "transformer", weights_path=path, dtype="fp32", **kw)
    return model, records, path


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_packed4_arguments_decode_to_the_dense_weight(checkpoint, precision):
    model, records, _ = _loaded(checkpoint, precision=precision, device="cpu")
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        rec = records[name]
        w, b = W.dense_weight(rec, precision)
        x = torch.randn(4, layer.in_features, dtype=torch.float64)
        if rec.zeros is not None:
            weight, scale, zeros = prepare_awq(layer)
            dense = unpack_int4(weight).double() * scale.double().repeat_interleave(64, 1)
            got = x @ dense.t() + x.reshape(4, -1, 64).sum(-1) @ zeros.double().t() + layer.bias.double()
        else:
            parts, inv_smooth, bias = prepare_svdq(layer, layer.method.format, precision)
            got = (x @ layer.proj_down.double().t()) @ layer.proj_up.double().t() + bias.double()
            for p in parts:
                codes = unpack_int4(p.weight).double() if precision == "int4" else \
                    e2m1_to_float(unpack_e2m1(p.weight), torch.float64)
                g = 64 if precision == "int4" else 16
                dense = codes * p.scale.double().repeat_interleave(g, 1) * p.global_scale.double()
                if p.channel_scale is not None:
                    dense = dense * p.channel_scale.double()[:, None]
                got = got + (x[:, p.lo:p.hi] * inv_smooth[p.lo:p.hi].double()) @ dense.t()
        expected = x @ w.t() + (b if b is not None else 0)
        assert (got - expected).abs().max() / expected.abs().max() < 1e-5, name


def test_native_arguments_are_the_files_tensors(checkpoint):
    model, records, path = _loaded(checkpoint, device="cpu")
    raw = load_file(str(path))
    layer = model.get_submodule("transformer_blocks.0.attn.to_out.0")
    (args,) = native.nunchaku_arguments(layer, layer.method.format, "int4")
    prefix = "transformer_blocks.0.out_proj"
    assert torch.equal(args["qweight"], raw[f"{prefix}.qweight"])
    assert torch.equal(args["wscales"], raw[f"{prefix}.wscales"].float())
    assert torch.equal(args["smooth"], raw[f"{prefix}.smooth"].float())
    assert torch.equal(args["proj_down"], raw[f"{prefix}.lora_down"].float())
    assert torch.equal(args["proj_up"], raw[f"{prefix}.lora_up"].float())
    assert torch.equal(args["bias"], raw[f"{prefix}.bias"].float())
    # proj_out of a single block: two parts, each the file's own half (the MLP half's bias gets its shift back)
    layer = model.get_submodule("single_transformer_blocks.0.proj_out")
    attn, mlp = native.nunchaku_arguments(layer, layer.method.format, "int4")
    assert torch.equal(attn["qweight"], raw["single_transformer_blocks.0.out_proj.qweight"])
    assert torch.equal(mlp["qweight"], raw["single_transformer_blocks.0.mlp_fc2.qweight"])
    assert torch.equal(mlp["proj_down"], raw["single_transformer_blocks.0.mlp_fc2.lora_down"].float())
    awq = native.awq_arguments(model.get_submodule("transformer_blocks.0.norm1.linear"))
    rec = records["transformer_blocks.0.norm1.linear"]
    assert torch.equal(awq["scaling_factors"].double(), rec.scales.t())


def test_native_is_refused_with_reasons():
    from diffgen.platform import Platform
    from diffgen.quant import LayerSpec

    layer = LayerSpec("x", 128, 128, True, torch.bfloat16)
    hopper = Platform("cuda", "cuda:0", "H200", (9, 0))
    assert "Hopper has no 4-bit tensor cores" in native.native_reason(layer, hopper, None)
    assert "SM75, SM80, SM86 and SM89" in native.native_reason(layer, hopper, "int4")
    ada = Platform("cuda", "cuda:0", "L40S", (8, 9))
    assert "SM120" in native.native_reason(layer, ada, "nvfp4")
    reason = native.library_reason()  # this machine has no nunchaku (PyPI's unrelated one counts as none)
    assert reason is None or "github.com/nunchaku-ai/nunchaku" in reason


def test_plugins_report_says_how_to_install_nunchaku(monkeypatch):
    import sys
    import types

    from diffgen.platform import Platform
    from diffgen_nunchaku import plugin

    ada = Platform("cuda", "cuda:0", "RTX 4090", (8, 9))
    monkeypatch.setitem(sys.modules, "nunchaku", types.ModuleType("nunchaku"))  # PyPI's namesake: no ops
    monkeypatch.setitem(sys.modules, "nunchaku.ops", None)
    report = {k.name: k for k in plugin.check_platform(ada).kernels}
    int4 = report["svdq-nunchaku int4 (nunchaku's W4A4 kernels)"]
    assert not int4.available and "not nunchaku-ai's library" in int4.reason
    assert "github.com/nunchaku-ai/nunchaku/releases" in int4.reason and "unrelated PyPI project" in int4.reason


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_packed4_on_gpu_matches_the_reference(checkpoint, precision):
    pipe, path, _, records = checkpoint("flux1", precision)
    model = load_transformer(pipe / "transformer", weights_path=path, dtype="bf16", device="cuda")
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        if precision == "nvfp4" and torch.cuda.get_device_capability() < (8, 9):
            pytest.skip("E4M3 scales need SM89+")
        assert layer.method.name in ("svdq-packed4-w4a8", "awq-packed4"), (name, layer.method.name)
        w, b = W.dense_weight(records[name], precision)
        x = torch.randn(64, layer.in_features, device="cuda")
        expected = x.double() @ w.t().cuda() + (b.cuda() if b is not None else 0)
        got = layer(x.bfloat16()).double()
        # awq-packed4: bf16 activations and output against fp64, about 3 significant digits. W4A8:
        # activations and the weight each round to E4M3 (3 mantissa bits, at most 1/16 relative), which
        # costs about 1e-3 of cosine on random data
        floor = 0.999 if layer.method.name == "awq-packed4" else 0.997
        cos = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
        assert cos > floor, (name, layer.method.name, float(cos))


def test_packed4_and_native_keep_their_tensors_as_buffers(checkpoint):
    """.to() and offload move a layer's buffers; the prepared tensors must be among them."""
    from diffgen_nunchaku.weight_only import AwqPacked4Method, SvdqPacked4Method

    model, _, _ = _loaded(checkpoint, device="cpu")
    for name, cls, extra in [("single_transformer_blocks.0.proj_out", SvdqPacked4Method, "part1_weight"),
                             ("transformer_blocks.0.attn.to_q", SvdqPacked4Method, "part0_scale"),
                             ("transformer_blocks.0.norm1.linear", AwqPacked4Method, "zeros_folded"),
                             ("transformer_blocks.0.attn.to_k", native.SvdqNunchakuMethod, "nunchaku0_qweight"),
                             ("transformer_blocks.0.norm1_context.linear", native.AwqNunchakuMethod, "nunchaku_kernel")]:
        layer = model.get_submodule(name)
        before = layer.method.weight_bytes(layer)
        method = cls(layer.method.config, layer.method.layer)
        layer.method = method
        method.process_weights_after_loading(layer)
        assert extra in dict(layer.named_buffers()), name
        assert method.weight_bytes(layer) <= before * 1.6, name  # fp32 compute here; no second full copy


def _fake_nunchaku(monkeypatch):
    """Stand-ins for nunchaku's ops with their documented arguments, computing the documented math
    from the packed tensors with the test's own inverses (svdq_writer)."""
    import sys
    import types

    def quantize(input, lora_down=None, smooth=None, fp4=False, pad_size=256, **_):
        assert not fp4 and input.is_contiguous()
        k = input.shape[1]
        down = W.unpack_by_index(lora_down, (lora_down.shape[1], k), lambda m: W.pack_lowrank(m, down=True))
        s = W.unpack_by_index(smooth.reshape(1, -1), (k, 1), W.pack_scales).reshape(-1)
        x = input.double() / s.double()
        blocks = x.reshape(x.shape[0], -1, 64)
        scale = blocks.abs().amax(-1, keepdim=True) / 7
        q = (torch.round(blocks / torch.where(scale > 0, scale, 1)).clamp(-8, 7) * scale).reshape(x.shape)
        rows = -(-x.shape[0] // pad_size) * pad_size  # M padded to pad_size, as the kernel does
        pad = lambda t: torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])])  # noqa: E731
        return pad(q), torch.empty(0), pad(input.double() @ down.double().t())

    def gemm(act, wgt, out, ascales, wscales, lora_act_in, lora_up, bias, fp4, alpha, wcscales, act_unsigned, **_):
        assert not fp4 and not act_unsigned and alpha is None and wcscales is None
        n, k = wgt.shape[0], 2 * wgt.shape[1]
        codes = W.unpack_qweight_codes(wgt)
        scales = W.unpack_by_index(wscales, (n, k // 64), W.pack_scales)
        w = (codes - 16 * (codes >= 8)).double() * scales.double().repeat_interleave(64, 1)
        up = W.unpack_by_index(lora_up, tuple(lora_up.shape), lambda m: W.pack_lowrank(m, down=False))
        b = W.unpack_by_index(bias.reshape(1, -1), (n, 1), W.pack_scales).reshape(-1)
        y = act @ w.t() + lora_act_in @ up.double().t() + b.double()
        out.copy_(y[: out.shape[0]])

    def gemv(in_feats, kernel, scaling_factors, zeros, m, n, k, group_size=64):
        codes = W.unpack_awq_codes(kernel).double()
        w = codes * scaling_factors.t().double().repeat_interleave(64, 1) + zeros.t().double().repeat_interleave(64, 1)
        return (in_feats.double() @ w.t()).to(in_feats.dtype)

    modules = {"nunchaku": types.ModuleType("nunchaku"), "nunchaku.ops": types.ModuleType("nunchaku.ops"),
               "nunchaku.ops.gemm": types.SimpleNamespace(svdq_gemm_w4a4_cuda=gemm),
               "nunchaku.ops.quantize": types.SimpleNamespace(svdq_quantize_w4a4_act_fuse_lora_cuda=quantize),
               "nunchaku.ops.gemv": types.SimpleNamespace(awq_gemv_w4a16_cuda=gemv)}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def test_native_adapter_calls_the_ops_as_documented(checkpoint, monkeypatch):
    """Not nunchaku's kernels (none here): the adapter's calls, against stand-ins of the documented ops."""
    _fake_nunchaku(monkeypatch)
    assert native.library_reason() is None
    model, records, _ = _loaded(checkpoint, device="cpu")
    x = torch.randn(5, 640, dtype=torch.float64)
    for name in ("transformer_blocks.0.attn.to_out.0", "single_transformer_blocks.0.proj_out",
                 "transformer_blocks.0.norm1.linear"):
        layer = model.get_submodule(name)
        rec = records[name]
        cls = native.AwqNunchakuMethod if rec.zeros is not None else native.SvdqNunchakuMethod
        layer.method = cls(layer.method.config, layer.method.layer)
        layer.method.process_weights_after_loading(layer)
        xs = x[:, : layer.in_features].float()
        got = layer(xs).double()
        if rec.zeros is not None:
            w, b = W.dense_weight(rec, "int4")
            expected = xs.double() @ w.t() + b
        else:  # the unfused ops quantize signed: an unsigned part's shift sits in the bias instead
            _, bias = W.dense_weight(rec, "int4")
            signed = W.Record(rec.codes, rec.scales, rec.smooth, rec.down, rec.up, bias,
                              [(k0, k1, False) for k0, k1, _ in rec.unsigned])
            expected = W.quantized_forward(signed, "int4", xs)
        assert (got - expected).abs().max() / expected.abs().max() < 1e-4, name
