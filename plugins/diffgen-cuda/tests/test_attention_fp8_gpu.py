"""The FP8 attention kernel on a GPU (SM89+ with Triton), against its reference and exact attention.

Kernel against ``reference_attention_fp8`` (the same quantization in float32 PyTorch on the same
GPU): relative RMS error < 5e-3 and max error < 3% of the output's largest value. What may differ:
the bf16 output's rounding (relative RMS ~1e-3), fp32 summation order (the MMA's, the K mean's;
the latter can move an INT8 code across a rounding boundary, ~1e-3 as the CPU tests measured), and
exp2's approximate instruction moving a rare P across an E4M3 rounding boundary (one element
off by 1/16 of its weight). A wrong block index, scale or mask shows at O(1).
Kernel against exact attention (fp32 SDPA): the CPU tests' bounds (test_attention_fp8.BOUNDS),
plus the bf16 inputs' own rounding; long sequences too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffgen_cuda.attention_fp8 import CONFIGS, attention_fp8, device_reason, launch_config, reference_attention_fp8

gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                         reason="needs a CUDA GPU with FP8 tensor cores (SM89+) and Triton")
pytestmark = [gpu, pytest.mark.cuda]

BOUNDS = {"gaussian": (0.06, 0.998), "outliers": (0.10, 0.995), "peaked": (0.08, 0.997)}


def inputs(B, H, Lq, Lk, D, case="gaussian", heads_first=False, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, device="cuda", generator=g) for L in (Lq, Lk, Lk))
    if case == "outliers":
        k[..., :4] += 40.0
        q[..., :2] *= 10
    elif case == "peaked":
        q, k = q * 4, k * 2
    q, k, v = (x.to(dtype) for x in (q, k, v))
    return (q, k, v) if heads_first else tuple(x.transpose(1, 2).contiguous() for x in (q, k, v))


def errors(got, want):
    got, want = got.double().flatten(), want.double().flatten()
    rel = ((got - want).norm() / want.norm()).item()
    return rel, F.cosine_similarity(got, want, dim=0).item(), ((got - want).abs().max() / want.abs().max()).item()


def exact(q, k, v, heads_first):
    if not heads_first:
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    return out if heads_first else out.transpose(1, 2)


def _runs_here(config):
    reason = device_reason(config, torch.cuda.get_device_capability())
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("heads_first", [False, True])
# tails; cross; tiny; and 3 x 4096 x 4096, where the Gluon kernel with 64-key blocks gave NaN on an H100
@pytest.mark.parametrize("shape", [(2, 3, 777, 1000), (1, 2, 4096, 512), (1, 1, 64, 7), (1, 3, 4096, 4096)])
def test_kernel_matches_its_reference(config, D, heads_first, shape):
    _runs_here(config)
    B, H, Lq, Lk = shape
    q, k, v = inputs(B, H, Lq, Lk, D, "outliers", heads_first)
    cfg = launch_config(config)
    got = attention_fp8(q, k, v, heads_first=heads_first, config=config)
    assert got.dtype == q.dtype and got.shape == q.shape
    ref = reference_attention_fp8(q, k, v, heads_first=heads_first, block_m=cfg["block_m"], block_n=cfg["block_n"])
    rel, _, worst = errors(got, ref)
    assert rel < 5e-3 and worst < 3e-2, (rel, worst)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("case", list(BOUNDS))
@pytest.mark.parametrize("D", [64, 128])
def test_kernel_against_exact_attention(case, D, config):
    _runs_here(config)
    q, k, v = inputs(1, 4, 1500, 2100, D, case)
    rel, cos, _ = errors(attention_fp8(q, k, v, config=config), exact(q, k, v, False))
    bound_rel, bound_cos = BOUNDS[case]
    assert rel < bound_rel and cos > bound_cos, (rel, cos)


def test_long_sequence_against_exact_attention():
    q, k, v = inputs(1, 2, 16384, 16640, 128, "outliers")  # Wan/HunyuanVideo lengths, fewer heads
    rel, cos, _ = errors(attention_fp8(q, k, v), exact(q, k, v, False))
    assert rel < BOUNDS["outliers"][0] and cos > BOUNDS["outliers"][1], (rel, cos)


def test_fp16_and_an_explicit_scale():
    q, k, v = inputs(1, 2, 300, 333, 128, dtype=torch.float16)
    got = attention_fp8(q, k, v, scale=0.05)
    want = F.scaled_dot_product_attention(*(x.transpose(1, 2).float() for x in (q, k, v)), scale=0.05).transpose(1, 2)
    rel, cos, _ = errors(got, want)
    assert got.dtype == torch.float16 and rel < BOUNDS["gaussian"][0] and cos > BOUNDS["gaussian"][1], (rel, cos)


def test_layouts_and_a_non_contiguous_view_give_the_same_bits():
    q, k, v = inputs(2, 3, 500, 700, 128, "outliers", heads_first=True)
    bhld = attention_fp8(q, k, v, heads_first=True)
    blhd = attention_fp8(*(x.transpose(1, 2).contiguous() for x in (q, k, v)))
    view = attention_fp8(*(x.transpose(1, 2) for x in (q, k, v)))  # strided [B, L, H, D], no copy
    assert torch.equal(blhd.transpose(1, 2), bhld) and torch.equal(view, blhd)


def test_the_compiled_operator_gives_the_eager_bits():
    q, k, v = inputs(1, 4, 1000, 1200, 128, "outliers")
    eager = attention_fp8(q, k, v)
    compiled = torch.compile(lambda q, k, v: attention_fp8(q, k, v) * 1, fullgraph=True)(q, k, v)
    assert torch.equal(compiled, eager)


def test_a_flux_transformer_routed_through_fp8_attention(monkeypatch):
    """diffusers' own FLUX.1 processors (head dim 128) on the GPU, routed by ``install_attention``:
    every call reaches the kernel and the output stays near the SDPA model's (attention errors of a
    few percent, diluted by the residual stream)."""
    import diffusers

    from diffgen.attention import install_attention, remove_attention
    from diffgen_cuda.attention_fp8 import BACKEND

    monkeypatch.setenv("DIFFGEN_FP8_ATTENTION_MIN_KEYS", "0")  # its 1,088 keys would fall back to SDPA
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(16, 56, 56),
    ).to("cuda", torch.bfloat16).eval()
    side, text = 32, 64
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    args = dict(hidden_states=torch.randn(1, side * side, 16), encoder_hidden_states=torch.randn(1, text, 64),
                pooled_projections=torch.randn(1, 32), timestep=torch.full((1,), 0.5),
                img_ids=torch.cat([torch.zeros(side * side, 1), ids.float()], -1), txt_ids=torch.zeros(text, 3))
    args = {n: (t.to("cuda", torch.bfloat16) if n not in ("img_ids", "txt_ids") else t.cuda()) for n, t in args.items()}
    with torch.no_grad():
        want = model(**args, return_dict=False)[0]
        stats = install_attention(model, BACKEND)
        got = model(**args, return_dict=False)[0]
        remove_attention(model)
    assert stats.modules == 2 and stats.calls == 2 and not stats.fallbacks
    rel, cos, _ = errors(got, want)
    assert rel < 0.05 and cos > 0.998, (rel, cos)

