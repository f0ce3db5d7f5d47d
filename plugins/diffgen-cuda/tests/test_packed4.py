"""diffgen_cuda.packed4, the 4-bit path other format plugins call: its checks and reasons on the
CPU, and on a CUDA GPU every code/scale/group combination against the definition written here
(codes times group scales times the global scale), eager and compiled: the dequantize pass bit
for bit in every output type, ``linear`` and ``linear_fp8``."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
import torch.nn.functional as F

from diffgen.numerics.e2m1 import e2m1_to_float, pack_e2m1
from diffgen.platform import Platform
from diffgen.quant import LayerSpec
from diffgen_cuda import packed4

gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                         reason="needs a CUDA GPU of SM89+ with Triton")


def _layer(dtype=torch.bfloat16):
    return LayerSpec("blocks.0.ff", 128, 64, True, dtype)


def test_reasons_name_what_is_missing(monkeypatch):
    from diffgen_cuda import fused

    cpu = Platform("cpu", "cpu", "x86")
    assert "CUDA" in packed4.unavailable_reason(_layer(), cpu, scales=packed4.E8M0)
    # the GPU checks below, as on a machine where Triton imports
    monkeypatch.setattr(fused, "triton_unavailable_reason", lambda platform: None)
    ampere = Platform("cuda", "cuda:0", "A100", (8, 0))
    assert "SM89+" in packed4.unavailable_reason(_layer(), ampere, scales=packed4.E4M3)
    turing = Platform("cuda", "cuda:0", "T4", (7, 5))
    assert "SM80+" in packed4.unavailable_reason(_layer(), turing, scales=packed4.FLOAT)
    hopper = Platform("cuda", "cuda:0", "H100", (9, 0))
    assert packed4.unavailable_reason(_layer(), hopper, scales=packed4.E4M3) is None
    assert "bf16 or fp16" in packed4.unavailable_reason(_layer(torch.float32), hopper, scales=packed4.E8M0)


def test_the_layout_is_checked_before_any_kernel_runs():
    weight = torch.zeros(8, 32, dtype=torch.uint8)  # Kp = 64
    packed4._check(weight, torch.zeros(8, 4, dtype=torch.uint8), 64, packed4.E2M1, packed4.E8M0, 16)
    for scale, k, group, kind in [(torch.zeros(8, 3, dtype=torch.uint8), 64, 32, packed4.E8M0),  # 3 groups, not 2
                                  (torch.zeros(8, 2, dtype=torch.float16), 64, 32, packed4.E8M0),  # fp16 called E8M0
                                  (torch.zeros(8, 4, dtype=torch.uint8), 65, 16, packed4.E8M0),  # 65 inputs in 64
                                  (torch.zeros(8, 1, dtype=torch.uint8), 64, 128, packed4.E8M0)]:  # group 128
        with pytest.raises(ValueError, match="packed4"):
            packed4._check(weight, scale, k, packed4.E2M1, kind, group)


def test_linear_sends_a_few_rows_to_the_gemv_and_more_to_the_pass(monkeypatch):
    """Which kernel ``linear`` calls and with what, on the CPU (kernels replaced by recorders): up
    to GEMV_ROWS rows of any leading shape go to w4_gemv with the row factor; more rows to the
    pass, whose weight F.linear multiplies; the layout is checked first either way."""
    import sys
    import types

    from diffgen_cuda import kernels

    calls = []

    def gemv(x, weight, scale, global_scale, row_factor, bias, **kw):
        calls.append(("gemv", tuple(x.shape), row_factor, kw))
        return torch.full((x.shape[0], weight.shape[0]), 2.0)

    def dequantize(weight, scale, global_scale, k, dtype, row_factor, **kw):
        calls.append(("pass", k, row_factor, kw))
        return torch.ones(weight.shape[0], k, dtype=dtype)

    fake = types.SimpleNamespace(GEMV_ROWS=4, w4_gemv=gemv, w4_dequantize=dequantize)
    monkeypatch.setitem(sys.modules, "diffgen_cuda.kernels.w4_gemm", fake)
    monkeypatch.setattr(kernels, "w4_gemm", fake, raising=False)
    weight, scale = torch.zeros(6, 32, dtype=torch.uint8), torch.zeros(6, 4, dtype=torch.uint8)  # Kp = 64
    rows = torch.arange(6.0)
    kind = dict(codes=packed4.E2M1, scales=packed4.E8M0, group=16)

    few = packed4.linear(torch.ones(1, 3, 60), weight, scale, torch.ones(()), None, 60, row_factor=rows, **kind)
    assert few.shape == (1, 3, 6) and bool((few == 2).all())
    assert calls[-1][:2] == ("gemv", (3, 60)) and calls[-1][2] is rows and calls[-1][3] == kind

    many = packed4.linear(torch.ones(2, 5, 60), weight, scale, torch.ones(()), torch.arange(6.0), 60,
                          row_factor=rows, **kind)
    assert calls[-1][:2] == ("pass", 60) and calls[-1][2] is rows
    assert many.shape == (2, 5, 6) and torch.equal(many[0, 0], 60 + torch.arange(6.0))  # ones @ ones^T + bias

    calls.clear()
    for x in (torch.ones(1, 60), torch.ones(9, 60)):  # a scale of the wrong width: refused before any kernel
        with pytest.raises(ValueError, match="packed4"):
            packed4.linear(x, weight, scale[:, :3], torch.ones(()), None, 60, **kind)
    with pytest.raises(ValueError, match="input of 59 features"):
        packed4.linear(torch.ones(1, 59), weight, scale, torch.ones(()), None, 60, **kind)
    assert calls == []


def test_linear_chunks_a_large_layer_and_gives_the_whole_layers_result(monkeypatch):
    """``chunk_bytes``: a layer whose 16-bit weight holds several chunks of MIN_CHUNK_ROWS+ rows is
    dequantized and multiplied chunk by chunk (on the CPU, with a recorder standing in for the pass
    that decodes each byte to two weights); the output, bias included, is the whole layer's."""
    import sys
    import types

    from diffgen_cuda import kernels

    passes = []

    def dequantize(weight, scale, global_scale, k, dtype, row_factor, **kw):
        passes.append((weight.shape[0], None if row_factor is None else row_factor.shape[0]))
        w = weight.to(dtype).repeat_interleave(2, dim=1)[:, :k] - 7
        return w if row_factor is None else w * row_factor[:, None].to(dtype)

    fake = types.SimpleNamespace(GEMV_ROWS=4, w4_dequantize=dequantize)
    monkeypatch.setitem(sys.modules, "diffgen_cuda.kernels.w4_gemm", fake)
    monkeypatch.setattr(kernels, "w4_gemm", fake, raising=False)
    g = torch.Generator().manual_seed(0)
    n, k = 5000, 64
    weight = torch.randint(0, 16, (n, k // 2), generator=g, dtype=torch.uint8)
    scale = torch.zeros(n, k // 16, dtype=torch.uint8)
    rows, bias, x = torch.rand(n, generator=g), torch.randn(n, generator=g), torch.randn(2, 7, k, generator=g)
    kind = dict(codes=packed4.E2M1, scales=packed4.E8M0, group=16)
    chunk = 2048 * 2 * k  # 2,048 rows of 16-bit weights
    assert packed4.chunk_rows(n, k, chunk) == 2048
    assert packed4.chunk_rows(n, k, None) is None and packed4.chunk_rows(n, k, chunk // 2) is None  # < 2048 rows
    assert packed4.chunk_rows(2048, k, chunk) is None  # one chunk is the whole layer

    whole = packed4.linear(x, weight, scale, torch.ones(()), bias, k, row_factor=rows, **kind)
    assert passes == [(n, n)]
    passes.clear()
    chunked = packed4.linear(x, weight, scale, torch.ones(()), bias, k, row_factor=rows, chunk_bytes=chunk, **kind)
    assert passes == [(2048, 2048), (2048, 2048), (904, 904)]
    assert chunked.shape == (2, 7, n)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(whole, F.linear(x, dequantize(weight, scale, None, k, x.dtype, rows), bias))
    no_bias = packed4.linear(x, weight, scale, torch.ones(()), None, k, chunk_bytes=chunk, **kind)
    torch.testing.assert_close(no_bias, F.linear(x, dequantize(weight, scale, None, k, x.dtype, None)))
    # traced, the loop is one operator (its fake gives the shape) and gives the eager bits
    traced = torch.compile(lambda x: packed4.linear(x, weight, scale, torch.ones(()), bias, k, row_factor=rows,
                                                    chunk_bytes=chunk, **kind), backend="aot_eager", fullgraph=True)
    assert torch.equal(traced(x), chunked)


def _definition(codes, scale_values, global_scale, kind, group, k):
    values = e2m1_to_float(codes) if kind == packed4.E2M1 else (codes.int() - (codes.int() >= 8).int() * 16).float()
    return (values * scale_values.repeat_interleave(group, dim=1) * global_scale)[:, :k]


def _scales(scales, shape, g):
    """Random block scales of a kind, and their values (exponents near 0, E4M3 and 16-bit in a few binades)."""
    if scales == packed4.E8M0:
        scale = torch.randint(120, 131, shape, generator=g, dtype=torch.uint8)
        return scale, torch.pow(2.0, scale.float() - 127)
    if scales == packed4.E4M3:
        scale = (torch.rand(shape, generator=g) * 4 + 0.01).to(torch.float8_e4m3fn)
    else:
        scale = (torch.rand(shape, generator=g) + 0.05).to(torch.bfloat16)
    return scale, scale.float()


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("codes", [packed4.E2M1, packed4.INT4])
@pytest.mark.parametrize("scales, group", [(packed4.E4M3, 16), (packed4.E8M0, 32), (packed4.FLOAT, 64),
                                           (packed4.E8M0, 16), (packed4.FLOAT, 32)])
@pytest.mark.parametrize("compiled", [False, True])
def test_linear_is_the_definition(codes, scales, group, compiled):
    n, k = 192, 200  # k not a multiple of the group: the padded columns must not leak
    kp = -(-k // group) * group
    g = torch.Generator().manual_seed(3)
    code = torch.randint(0, 16, (n, kp), generator=g, dtype=torch.uint8)
    scale, values = _scales(scales, (n, kp // group), g)
    global_scale = torch.tensor(0.75)
    w = _definition(code, values, global_scale, codes, group, k)
    x = torch.randn(37, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    args = (pack_e2m1(code).cuda(), scale.cuda(), global_scale.cuda())
    fn = lambda x: packed4.linear(x, *args, bias.cuda(), k, codes=codes, scales=scales, group=group)  # noqa: E731
    if compiled:
        torch._dynamo.reset()  # every case compiles this one lambda: start each from a clean cache
        fn = torch.compile(fn, fullgraph=True)
    got = fn(x.cuda()).float().cpu()
    expected = x.float() @ w.T + bias.float()
    # the weight is exact in bf16 (4-bit codes times a power of two or a bf16/E4M3 scale times
    # 0.75); the bf16 GEMM rounds its output once, so compare relative to the output's scale
    assert ((got - expected).abs().max() / expected.abs().max()) < 8e-3


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("codes", [packed4.E2M1, packed4.INT4])
@pytest.mark.parametrize("scales, group", [(packed4.E4M3, 16), (packed4.E8M0, 32), (packed4.FLOAT, 64)])
@pytest.mark.parametrize("rows", [1, 3])
def test_a_few_rows_go_to_the_gemv_and_give_the_definition(codes, scales, group, rows):
    """Up to GEMV_ROWS rows (modulation) read the packed weight in w4_gemv, with a factor per
    output row (the NVFP4 methods' per-row global scale); eager, and one case compiled."""
    from diffgen_cuda.kernels import w4_gemm

    assert rows <= w4_gemm.GEMV_ROWS
    n, k = 300, 1000  # neither a multiple of the tiles; k not one of the group
    kp = -(-k // group) * group
    g = torch.Generator().manual_seed(5)
    code = torch.randint(0, 16, (n, kp), generator=g, dtype=torch.uint8)
    scale, values = _scales(scales, (n, kp // group), g)
    row_factor = torch.rand(n, generator=g) + 0.5
    w = _definition(code, values, torch.tensor(1.0), codes, group, k) * row_factor[:, None]
    x = torch.randn(1, rows, k, generator=g).to(torch.bfloat16)  # [B, L, K]: the rows are B * L
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    args = (pack_e2m1(code).cuda(), scale.cuda(), torch.ones(()).cuda(), bias.cuda(), k)
    fn = lambda x: packed4.linear(x, *args, codes=codes, scales=scales, group=group,  # noqa: E731
                                  row_factor=row_factor.cuda())
    got = fn(x.cuda())
    assert got.shape == (1, rows, n) and got.dtype == torch.bfloat16
    expected = x.float() @ w.T + bias.float()
    assert ((got.float().cpu() - expected).abs().max() / expected.abs().max()) < 8e-3
    if codes == packed4.E2M1 and group == 16:
        torch._dynamo.reset()
        assert torch.equal(torch.compile(fn, fullgraph=True)(x.cuda()), got)
    with pytest.raises(ValueError, match="packed4"):  # the GEMV path checks the layout as the pass does
        packed4.linear(x.cuda(), args[0], args[1][:, :-1], *args[2:], codes=codes, scales=scales, group=group)


@gpu
@pytest.mark.cuda
def test_a_chunked_layer_gives_the_definition_eager_and_compiled():
    """``chunk_bytes`` on the GPU: the chunks' passes and GEMMs (the GEMMs writing column slices of
    one output) against the definition, with a bias and a per-row factor; compiled = eager bits."""
    n, k, group = 5000, 256, 16
    g = torch.Generator().manual_seed(9)
    code = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale, values = _scales(packed4.E4M3, (n, k // group), g)
    row_factor = torch.rand(n, generator=g) + 0.5
    w = _definition(code, values, torch.tensor(1.0), packed4.E2M1, group, k) * row_factor[:, None]
    x = torch.randn(300, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    args = (pack_e2m1(code).cuda(), scale.cuda(), torch.ones(()).cuda(), bias.cuda(), k)
    chunk = 2048 * 2 * k
    assert packed4.chunk_rows(n, k, chunk) == 2048  # three chunks: 2048, 2048, 904 rows
    fn = lambda x: packed4.linear(x, *args, codes=packed4.E2M1, scales=packed4.E4M3, group=group,  # noqa: E731
                                  row_factor=row_factor.cuda(), chunk_bytes=chunk)
    got = fn(x.cuda())
    expected = x.float() @ w.T + bias.float()
    assert got.shape == (300, n) and ((got.float().cpu() - expected).abs().max() / expected.abs().max()) < 8e-3
    torch._dynamo.reset()
    assert torch.equal(torch.compile(fn, fullgraph=True)(x.cuda()), got)


# every code kind with every scale kind and group, into both output types the methods use (bf16,
# FP8); fp16 and fp32 outputs on a few
_PASSES = [(codes, scales, group, dtype) for codes in (packed4.E2M1, packed4.INT4)
           for scales, group in ((packed4.E4M3, 16), (packed4.E8M0, 32), (packed4.FLOAT, 64), (packed4.E4M3, 32),
                                 (packed4.E8M0, 16), (packed4.FLOAT, 16))
           for dtype in (torch.bfloat16, torch.float8_e4m3fn)]
_PASSES += [(packed4.E2M1, packed4.E4M3, 16, torch.float16), (packed4.INT4, packed4.FLOAT, 64, torch.float32),
            (packed4.E2M1, packed4.E8M0, 32, torch.float32)]


def _pass_cases(g, codes, scales, group, dtype):
    """(packed, scale, global, row factor, k, the definition in dtype) for FLUX.1-like aligned rows,
    rows and widths that end mid-tile with padding (k = kp - 6), and an odd k."""
    for n, k in [(130, 1536), (37, 1000 // group * group - 6), (5, 2 * group + 1)]:
        kp = -(-k // group) * group
        code = torch.randint(0, 16, (n, kp), generator=g, dtype=torch.uint8)
        scale, values = _scales(scales, (n, kp // group), g)
        global_scale = torch.tensor(0.75)
        row = None
        if dtype == torch.float8_e4m3fn:  # onto the per-row grid, as linear_fp8 does
            _, factor, one = packed4.row_scales(scale, global_scale.expand(n), codes=codes, scales=scales)
            global_scale, row = one, factor
        w = _definition(code, values, global_scale, codes, group, k)
        yield pack_e2m1(code), scale, global_scale, row, k, (w if row is None else w * row[:, None]).to(dtype)


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("codes, scales, group, dtype", _PASSES)
@pytest.mark.parametrize("kind", ["tiles", "pairs"])
def test_the_dequantize_pass_writes_the_definition_bit_for_bit(codes, scales, group, dtype, kind):
    """Each element is one fp32 product, (code * scale) * global (* row factor for FP8, as
    linear_fp8 calls it), rounded once to the output type: torch's elementwise fp32 multiplies and
    its round-to-nearest-even casts give the same bits, so the gate is equality. Both passes."""
    from diffgen_cuda.kernels import w4_gemm

    for packed, scale, global_scale, row, k, expected in _pass_cases(torch.Generator().manual_seed(11), codes, scales,
                                                                      group, dtype):
        got = w4_gemm.w4_dequantize(packed.cuda(), scale.cuda(), global_scale.cuda(),
                                    k, dtype, None if row is None else row.cuda(), codes=codes, scales=scales,
                                    group=group, kind=kind).cpu()
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), (expected.shape, kind)


def test_the_pair_decode_arithmetic_gives_every_bytes_two_codes():
    """nibble_decode's integer steps (the ones its PTX runs) on all 256 bytes: the low nibble's and
    the high nibble's codes times UNIT, signed zeros included, against the formats' tables."""
    from diffgen_cuda import nibble_decode

    byte = torch.arange(256, dtype=torch.uint8)
    for codes in (packed4.E2M1, packed4.INT4):
        lo, hi = nibble_decode.decode_bytes(byte, codes)
        for got, nibble in ((lo, byte & 15), (hi, byte >> 4)):
            want = _definition(nibble[:, None], torch.ones(256, 1), 1.0, codes, 1, 1)[:, 0]
            got = got / nibble_decode.UNIT[codes]
            assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit()), codes
        assert f"{nibble_decode.SPREAD[codes]:#x}" in nibble_decode.ptx(codes)


PAIR_PASS_CHECK = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from test_packed4 import _PASSES, _pass_cases
    from diffgen_cuda.kernels import w4_gemm
    assert not w4_gemm.PTX
    g = torch.Generator().manual_seed(5)
    checked = 0
    for codes, scales, group, dtype in _PASSES:
        for packed, scale, global_scale, row, k, expected in _pass_cases(g, codes, scales, group, dtype):
            args = (packed, scale, global_scale, k, dtype, row)
            pairs = w4_gemm.w4_dequantize(*args, codes=codes, scales=scales, group=group, kind="pairs")
            tiles = w4_gemm.w4_dequantize(*args, codes=codes, scales=scales, group=group, kind="tiles")
            assert torch.equal(pairs.view(torch.uint8), tiles.view(torch.uint8)), (codes, scales, group, dtype, k)
            if dtype in (torch.float16, torch.float32):
                assert torch.equal(pairs.view(torch.uint8), expected.view(torch.uint8)), (codes, dtype, k)
            checked += 1
    print(checked)
""")


def test_the_pair_pass_under_tritons_interpreter():
    """The pair pass (its decode written in Triton, as the interpreter cannot run PTX) on the
    CPU for every case of the GPU test above: the same bits as the interleaving pass, and the
    definition's bits where the interpreter's own casts round as the GPU does (fp16, fp32; its
    bf16 and E4M3 casts do not, so those are compared with the other pass, which uses them too)."""
    pytest.importorskip("triton")
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", PAIR_PASS_CHECK, str(Path(__file__).parent)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) == 3 * len(_PASSES)


@pytest.mark.parametrize("codes", [packed4.INT4, packed4.E2M1])
@pytest.mark.parametrize("scales", [packed4.FLOAT, packed4.E8M0, packed4.E4M3])
def test_row_scales_put_every_row_on_the_fp8_grid(codes, scales):
    """What linear_fp8's dequantize pass writes (code * scale * factor) fits E4M3 (|v| <= 448) and
    times the row scale is the weight, output-channel scales included."""
    n, groups, group = 24, 4, 16
    g = torch.Generator().manual_seed(7)
    code = torch.randint(0, 16, (n, groups * group), generator=g, dtype=torch.uint8)
    code[3] = 0  # an all-zero row keeps a usable scale
    if scales == packed4.E8M0:
        scale = torch.randint(118, 136, (n, groups), generator=g, dtype=torch.uint8)
        values = torch.pow(2.0, scale.float() - 127)
    elif scales == packed4.E4M3:
        scale = (torch.rand(n, groups, generator=g) * 8 + 0.01).to(torch.float8_e4m3fn)
        values = scale.float()
    else:
        scale = (torch.rand(n, groups, generator=g) + 0.01).to(torch.bfloat16)
        values = scale.float()
    global_scale, channel = torch.tensor(0.3), torch.rand(n, generator=g) + 0.5
    scale_b, factor, one = packed4.row_scales(scale, global_scale, codes=codes, scales=scales, channel_scale=channel)
    assert scale_b.shape == (1, n) and factor.shape == (n,) and float(one) == 1.0
    weight = _definition(code, values, global_scale, codes, group, groups * group)
    w8 = _definition(code, values, torch.tensor(1.0), codes, group, groups * group) * factor[:, None]
    assert w8.abs().max() <= 448 * (1 + 1e-6)
    assert torch.allclose(w8 * (scale_b.reshape(-1) / channel)[:, None], weight, rtol=1e-6, atol=0)
    assert torch.isfinite(factor).all() and (scale_b > 0).all()


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("codes, scales, group", [(packed4.INT4, packed4.FLOAT, 64), (packed4.E2M1, packed4.E4M3, 16),
                                                  (packed4.E2M1, packed4.E8M0, 32)])
def test_linear_fp8_stays_near_the_definition(codes, scales, group):
    n, k = 256, 512
    g = torch.Generator().manual_seed(4)
    code = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale, values = _scales(scales, (n, k // group), g)
    w = _definition(code, values, torch.tensor(1.0), codes, group, k)
    x = torch.randn(300, k, generator=g).to(torch.bfloat16)
    rows = packed4.row_scales(scale.cuda(), torch.ones(()).cuda(), codes=codes, scales=scales)
    got = packed4.linear_fp8(x.cuda(), pack_e2m1(code).cuda(), scale.cuda(), rows, None, k, codes=codes,
                             scales=scales, group=group).float().cpu()
    expected = x.float() @ w.T
    # E4M3 activations and weights (3 mantissa bits each): cosine about 0.999 on random data
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.998
