"""FP8 attention on the CPU: the reference math against attention's definition (float64), the
backend's publication and refusals, and routing through the plugin's rewritten blocks.

Error bounds of the quantized math against exact attention (relative RMS error over the whole
output, and cosine), measured on these inputs with 2-3x margin; the sources: INT8 Q and K per block
(step amax/127, ~0.3% of a Gaussian block's values), E4M3 V per channel and E4M3 P (3 mantissa
bits: up to 6% per element, averaging over the keys), fp32 otherwise.
  Gaussian q, k, v                         rel RMS 3.7%, cos 0.9993  -> bound 6%,  0.998
  K with +40 outlier channels, Q x10 on 2  rel RMS 6.7%, cos 0.9978  -> bound 10%, 0.995
  peaked softmax (q x4, k x2)              rel RMS 4.6%, cos 0.9989  -> bound 8%,  0.997
  near-uniform softmax (q x0.01)           rel RMS 3.5%, cos 0.9994  -> bound 6%,  0.998
Without K's smoothing the outlier case is far off (checked below), which is why the kernel smooths.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffgen
from diffgen.attention import AttentionCall, attention_backends, register_attention_backend, \
    unregister_attention_backend
from diffgen.errors import DiffgenError
from diffgen.platform import Platform
from diffgen.tiny.transformers import save_tiny_transformer, tiny_transformer, tiny_transformer_inputs
from diffgen_cuda import attention_fp8
from diffgen_cuda.attention_fp8 import BACKEND, reference_attention_fp8
from diffgen_cuda.plugin import check_platform

BOUNDS = {"gaussian": (0.06, 0.998), "outliers": (0.10, 0.995), "peaked": (0.08, 0.997), "uniform": (0.06, 0.998)}


def make_inputs(case: str, D: int, Lq: int = 300, Lk: int = 520, seed: int = 0):
    """q [1, Lq, 4, D], k and v [1, Lk, 4, D], fp32 ([B, L, H, D], diffusers' layout)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, L, 4, D, generator=g) for L in (Lq, Lk, Lk))
    if case == "outliers":  # a few channels with a large shared offset, as in DiT keys
        k[..., :4] += 40.0
        q[..., :2] *= 10
    elif case == "peaked":
        q, k = q * 4, k * 2
    elif case == "uniform":
        q = q * 0.01
    return q, k, v


def exact_attention(q, k, v) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in float64 from its definition, [B, L, H, D]."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (p @ v).transpose(1, 2)


def errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    got, want = got.double().flatten(), want.double().flatten()
    return ((got - want).norm() / want.norm()).item(), F.cosine_similarity(got, want, dim=0).item()


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", list(BOUNDS))
def test_reference_is_within_the_stated_bounds_of_exact_attention(case, D):
    q, k, v = make_inputs(case, D)  # Lq 300, Lk 520: neither a multiple of the blocks, Lq != Lk
    rel, cos = errors(reference_attention_fp8(q, k, v), exact_attention(q, k, v))
    bound_rel, bound_cos = BOUNDS[case]
    assert rel < bound_rel and cos > bound_cos, (rel, cos)
    assert rel > 1e-3  # it does quantize: a reference that forgot to would pass the bounds too


def test_smoothing_k_is_what_keeps_outlier_channels_accurate():
    q, k, v = make_inputs("outliers", 128)
    want = exact_attention(q, k, v)
    # Softmax ignores a per-query shift, so a shared offset on every key changes nothing: the
    # smoothed K' is the same up to fp32 rounding of k + offset and of the mean, which moves a few
    # INT8 codes across a rounding boundary (0.02% of the outputs move, by < 0.005: rel RMS 1.1e-3).
    shifted = reference_attention_fp8(q, k + 25.0 * torch.randn(128, generator=torch.Generator().manual_seed(1)), v)
    rel, _ = errors(shifted, reference_attention_fp8(q, k, v))
    assert rel < 3e-3
    smoothed, _ = errors(reference_attention_fp8(q, k, v), want)
    unsmoothed, _ = errors(reference_attention_fp8(q, k, v, smooth_k=False), want)  # K's INT8 step ~0.3 now
    assert unsmoothed > 2 * smoothed  # measured 16% against 6.7%


def test_reference_layouts_agree_and_match_the_fp8_rounding_of_p():
    q, k, v = make_inputs("gaussian", 64, Lq=130, Lk=200)
    blhd = reference_attention_fp8(q, k, v, block_m=64, block_n=64)
    bhld = reference_attention_fp8(*(x.transpose(1, 2) for x in (q, k, v)), heads_first=True, block_m=64, block_n=64)
    torch.testing.assert_close(bhld.transpose(1, 2), blhd, rtol=0, atol=0)
    unrounded = reference_attention_fp8(q, k, v, block_m=64, block_n=64, round_p=False)
    assert 0 < (unrounded - blhd).abs().max() < 0.05  # P's E4M3 rounding is there, and small


def test_the_plugin_publishes_the_backend_and_it_refuses_the_cpu(tmp_path, monkeypatch):
    assert attention_backends()["fp8"] is BACKEND
    cpu = Platform("cpu", "cpu", "x86")
    assert "CUDA" in BACKEND.unavailable_reason(cpu)
    kernels = {k.name.split()[0]: k for k in check_platform(cpu).kernels}
    assert not kernels["attention-fp8"].available and "CUDA" in kernels["attention-fp8"].reason
    monkeypatch.setattr("diffgen_cuda.fused.triton_unavailable_reason", lambda platform: None)  # as if installed
    assert "SM89+" in attention_fp8.unavailable_reason(Platform("cuda", "cuda:0", "A100", capability=(8, 0)))
    assert attention_fp8.unavailable_reason(Platform("cuda", "cuda:0", "H200", capability=(9, 0))) is None
    monkeypatch.undo()
    path = save_tiny_transformer("flux1", tmp_path / "flux", dtype=torch.float32)
    with pytest.raises(DiffgenError, match="--attention fp8 cannot run on cpu.*CUDA GPUs"):
        diffgen.load_transformer(path, device="cpu", attention="fp8")


def test_calls_the_kernel_does_not_take(monkeypatch):
    monkeypatch.delenv(attention_fp8.MIN_KEYS_ENV, raising=False)
    long = torch.zeros(1, attention_fp8.MIN_KEYS, 2, 128, dtype=torch.bfloat16)
    assert BACKEND.call_unsupported_reason(AttentionCall(long, long, long)) is None
    short = long[:, :-1]  # one key short: slower than SDPA where measured, so it falls back
    reason = BACKEND.call_unsupported_reason(AttentionCall(long, short, short))
    assert f"{attention_fp8.MIN_KEYS - 1} keys: below {attention_fp8.MIN_KEYS}" in reason
    assert attention_fp8.MIN_KEYS_ENV in reason  # it says how to move the threshold
    monkeypatch.setenv(attention_fp8.MIN_KEYS_ENV, "0")  # every call routed (a quality run, another GPU)
    q = torch.zeros(1, 8, 2, 128, dtype=torch.bfloat16)
    assert BACKEND.call_unsupported_reason(AttentionCall(q, q, q)) is None
    monkeypatch.setenv(attention_fp8.MIN_KEYS_ENV, "9")
    assert BACKEND.call_unsupported_reason(AttentionCall(q, q, q)) == f"8 keys: below {attention_fp8.MIN_KEYS_ENV}=9"
    monkeypatch.setenv(attention_fp8.MIN_KEYS_ENV, "many")
    with pytest.raises(DiffgenError, match="DIFFGEN_FP8_ATTENTION_MIN_KEYS='many': expected a whole number"):
        BACKEND.call_unsupported_reason(AttentionCall(q, q, q))
    monkeypatch.delenv(attention_fp8.MIN_KEYS_ENV)
    assert "head dim 96" in BACKEND.call_unsupported_reason(AttentionCall(*(torch.zeros(1, 8, 2, 96).bfloat16(),) * 3))
    assert "bf16 or fp16" in BACKEND.call_unsupported_reason(AttentionCall(q.float(), q.float(), q.float()))
    kv = torch.zeros(1, 8, 1, 128, dtype=torch.bfloat16)
    assert "no GQA" in BACKEND.call_unsupported_reason(AttentionCall(q, kv, kv))
    with pytest.raises(ValueError, match="config 'x'"):
        attention_fp8.attention_fp8(q, q, q, config="x")


def test_launch_config_names_say_the_kernel_arguments():
    assert attention_fp8.launch_config("m64n128w4s3-fold") == dict(
        block_m=64, block_n=128, num_warps=4, num_stages=3, magic_i2f=True, fold_i2f=True, maxnreg=None,
        gluon=False)
    gluon = attention_fp8.launch_config("m64n128w4s3-gluon")  # the Gluon kernel computes fold's math
    assert gluon["gluon"] and gluon["fold_i2f"] and gluon["block_m"] == 64
    assert attention_fp8.launch_config("m64n64w4s3-fold-r168")["maxnreg"] == 168
    assert attention_fp8.launch_config("m128n128w8s3-i2f")["magic_i2f"] is False
    for config in attention_fp8.CONFIGS:  # every swept config parses, and the default is among them
        attention_fp8.launch_config(config)
    assert attention_fp8.DEFAULT_CONFIG in attention_fp8.CONFIGS
    for bad, says in (("m128n128w8s3-fast", "fast"), ("m96n128w8s3", "blocks of 64 or 128"),
                      ("m128n128w8s3-i2f-fold", "excludes i2f"), ("128x128", "m<BLOCK_M>"),
                      ("m64n64w4s3-r32", "one register cap"), ("m64n64w4s3-r168-r128", "one register cap"),
                      ("m128n128w4s3-gluon", "16 x warps"), ("m64n128w4s2-gluon", "3 or more stages"),
                      ("m64n128w4s3-gluon-fold", "no other option"), ("m64n128w4s3-gluon-r200", "no other option"),
                      ("m64n64w4s3-gluon", "64-key blocks gave wrong results"),
                      ("m128n128w8s3-fp8qk", "fp8qk"), ("m64n128w4s2-ex2h-fold", "ex2h")):  # removed options
        with pytest.raises(ValueError, match=says):
            attention_fp8.launch_config(bad)


def test_the_gluon_configs_are_hoppers_and_other_gpus_get_the_portable_one(monkeypatch):
    """The -gluon kernel uses Hopper's wgmma: on Ada or Blackwell asking for it is refused with the
    reason, and a Gluon default gives way to PORTABLE_CONFIG there."""
    for capability, refused in (((8, 9), True), ((9, 0), False), ((10, 0), True), ((12, 0), True)):
        reason = attention_fp8.device_reason("m64n128w4s3-gluon", capability)
        assert (reason is not None) == refused and (not refused or f"SM{capability[0]}{capability[1]}" in reason)
        assert attention_fp8.device_reason("m128n128w8s3-fold", capability) is None  # Triton's kernels run on all
    monkeypatch.setattr(attention_fp8, "DEFAULT_CONFIG", "m64n128w4s3-gluon")
    assert attention_fp8.default_config((9, 0)) == "m64n128w4s3-gluon"
    assert attention_fp8.default_config((8, 9)) == attention_fp8.PORTABLE_CONFIG
    assert attention_fp8.device_reason(attention_fp8.PORTABLE_CONFIG, (8, 9)) is None


class Counting(attention_fp8.Fp8AttentionBackend):
    """The real backend's checks; attention from SDPA, counted (the kernel needs a GPU)."""

    name = "fp8-sdpa-test"
    calls = 0

    def unavailable_reason(self, platform):
        return None

    def call_unsupported_reason(self, call):
        return None

    def attention(self, call):
        Counting.calls += 1
        out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (call.query, call.key, call.value)))
        return out.transpose(1, 2)


@pytest.mark.parametrize("family", ["flux1", "qwen_image", "wan"])
def test_the_rewritten_blocks_attention_is_routed(family, tmp_path):
    """FLUX.1's and Qwen-Image's rewritten blocks call dispatch_attention_fn themselves, with the
    processor's backend: the route must reach them too, and change nothing but the kernel."""
    path = save_tiny_transformer(family, tmp_path / family, dtype=torch.float32)
    backend = Counting()
    register_attention_backend(backend)
    try:
        routed = diffgen.load_transformer(path, quantization="fp8", device="cpu", dtype=torch.float32,
                                          attention=backend.name)
    finally:
        unregister_attention_backend(backend.name)
    plain = diffgen.load_transformer(path, quantization="fp8", device="cpu", dtype=torch.float32)
    assert routed.diffgen_rewrites and routed.diffgen_rewrites == plain.diffgen_rewrites
    inputs = tiny_transformer_inputs(family, tiny_transformer(family, seed=0), seed=1)
    Counting.calls = 0
    with torch.no_grad():
        got, want = (m(**inputs, return_dict=False)[0] for m in (routed, plain))
    assert Counting.calls == routed.diffgen_attention.calls == routed.diffgen_attention.modules > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same SDPA, reached by the route


INTERPRETER_CHECK = textwrap.dedent("""
    import torch, triton.language as tl
    from diffgen_cuda.kernels import attention_fp8 as K
    from diffgen_cuda.attention_fp8 import reference_attention_fp8
    torch.manual_seed(0)
    worst = 0.0
    for heads_first in (False, True):
        for B, H, Lq, Lk, D, bm, bn in [(1, 2, 40, 70, 64, 32, 16), (2, 1, 33, 16, 128, 16, 16)]:
            shape = (lambda L: (B, H, L, D)) if heads_first else (lambda L: (B, L, H, D))
            q, k, v = torch.randn(shape(Lq)), torch.randn(shape(Lk)) + 3 * torch.randn(D), torch.randn(shape(Lk))
            tok = 2 if heads_first else 1
            mean = k.mean(dim=tok).reshape(B * H, D).contiguous()
            sv = (v.abs().amax(dim=tok).reshape(B * H, D) / 448).contiguous()
            k8, sk, v8 = K.quantize_kv(k, v, heads_first, bn, mean, sv, torch.float32)
            out = torch.empty_like(q)
            for magic, fold in ((True, False), (False, False), (True, True)):
                K.attention(q, k8, sk, v8, sv, out, heads_first, D ** -0.5, Lk, block_m=bm, block_n=bn,
                            num_warps=4, num_stages=1, magic_i2f=magic, fold_i2f=fold, p_dtype=tl.float32)
                ref = reference_attention_fp8(q, k, v, heads_first=heads_first, block_m=bm, block_n=bn,
                                              round_p=False)
                worst = max(worst, (out - ref).abs().max().item())
    print(worst)
""")


def test_the_kernel_indexing_under_tritons_interpreter():
    """The Triton kernels run by Triton's CPU interpreter with fp32 stand-ins for the FP8 operands
    (its FP8 conversion does not round as E4M3 does), against the reference with P unrounded:
    padding, the masked last key block, both layouts, Lq != Lk, batch x heads, and the folded
    int-to-float conversion. Agreement to 3e-3:
    the same integer codes and fp32 math, but for an occasional INT8 code rounded the other way
    where the fp32 mean of K differs in its last bit."""
    pytest.importorskip("triton")
    if tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 3):
        pytest.skip("Triton 3.6's interpreter calls int() on 1-element arrays, which numpy >= 2.3 refuses")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", INTERPRETER_CHECK], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split()[-1]) < 3e-3  # measured 7.6e-4


def test_the_gluon_configs_keep_their_mmas_in_flight_over_the_softmax():
    """What the Gluon kernel is for, checked in its sm_90a SASS without a GPU (benchmarks/
    attention_sass.py, with Triton's own ptxas): every -gluon config compiles, ptxas serializes none
    of its wgmmas, and in the key loop the Q.K^T wgmma is issued before the exp2s and waited for
    after them (the Triton kernel's loop waits first: "BAR MMA WAIT EX2 ...")."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    script = Path(__file__).resolve().parents[3] / "benchmarks" / "attention_sass.py"
    configs = [c for c in attention_fp8.CONFIGS if "gluon" in c]
    result = subprocess.run([sys.executable, "-W", "ignore", str(script), "--configs", *configs], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    for name, row in json.loads(result.stdout)["configs"].items():
        assert "error" not in row and row["wgmma_serialized"] is None and row["spill_store_bytes"] <= 8, (name, row)
        assert row["loop_schedule"].startswith("BAR MMA EX2 WAIT"), (name, row["loop_schedule"])


def test_the_reference_backend_is_the_kernels_math_on_any_device(monkeypatch):
    """``--attention fp8-reference``: available on the CPU, routing the calls the kernel would (and
    fp32 ones), and computing the FP8 math: against exact attention within the Gaussian bounds
    above, and not the same as the exact result (it quantizes)."""
    reference = attention_backends()["fp8-reference"]
    assert reference is attention_fp8.REFERENCE_BACKEND
    assert reference.unavailable_reason(Platform("cpu", "cpu", "x86")) is None
    monkeypatch.delenv(attention_fp8.MIN_KEYS_ENV, raising=False)
    q = torch.randn(1, 300, 2, 64, generator=torch.Generator().manual_seed(0))
    assert "300 keys: below" in reference.call_unsupported_reason(AttentionCall(q, q, q))  # as the kernel
    assert "head dim 96" in reference.call_unsupported_reason(AttentionCall(*(torch.zeros(1, 8, 2, 96),) * 3))
    monkeypatch.setenv(attention_fp8.MIN_KEYS_ENV, "0")
    k, v = torch.randn_like(q), torch.randn_like(q)
    for dtype in (torch.float32, torch.bfloat16):
        call = AttentionCall(q.to(dtype), k.to(dtype), v.to(dtype))
        assert reference.call_unsupported_reason(call) is None
        got = reference.attention(call)
        exact = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
        rel = ((got.float() - exact).norm() / exact.norm()).item()
        assert got.dtype == dtype and 1e-3 < rel < 0.06, rel


def test_family_quality_measures_the_kernels_math_on_the_cpu(tmp_path, monkeypatch):
    """benchmarks/family_quality.py's attention_fp8_reference variant with the plugin loaded: the
    tiny FLUX.1 rebuilt at head dim 64 sends every attention call to fp8-reference (none falls
    back), whose math moves the latents a little."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[3] / "benchmarks"))
    monkeypatch.delenv(attention_fp8.MIN_KEYS_ENV, raising=False)
    import family_quality

    result = family_quality.main(["--families", "flux1", "--variants", "attention_fp8_reference", "--head-dim", "64",
                                  "--steps", "2", "--work-dir", str(tmp_path)])
    entry = result["families"]["flux1"]["attention_fp8_reference"]
    routed = entry["attention"]["transformer"]
    assert routed["backend"] == "fp8-reference" and routed["calls"] > 0 and not routed["fallbacks"], routed
    assert 0.999 < entry["min_step_cosine"] < 1.0 and "note" not in entry
    assert entry["command"].startswith(f"{attention_fp8.MIN_KEYS_ENV}=0 diffgen compare")


class _Pipeline:
    """The Gluon kernel's shared-memory traffic, step by step as kernels/attention_gluon.py issues
    it: cp.async groups filling K/V slots, and async wgmmas reading them. It fails on a wgmma that
    reads a slot whose copy has not landed (or holds another block), and on a copy into a slot that
    an unfinished wgmma still reads."""

    def __init__(self, stages):
        self.stages, self.copies, self.mmas = stages, [], []  # groups in flight, oldest first
        self.slots = {}  # (tensor, slot) -> (block, landed)

    def copy(self, block):
        for tensor in "kv":
            slot = (tensor, block % self.stages)
            assert not any(slot in reads for reads in self.mmas), f"block {block} overwrites {slot} while read"
            self.slots[slot] = (block, False)
            self.copies[-1].append(slot)

    def commit(self):
        self.copies.append([])

    def wait_copies(self, left):
        while len(self.copies) > left:
            for slot in self.copies.pop(0):
                self.slots[slot] = (self.slots[slot][0], True)

    def mma(self, tensor, block, exists=True):
        slot = (tensor, block % self.stages)
        if exists:  # (the Q.K^T past the last block reads a slot nobody writes, and is never used)
            assert self.slots.get(slot) == (block, True), f"{tensor} of block {block} read from {self.slots.get(slot)}"
        self.mmas.append({slot})

    def wait_mmas(self, left):
        del self.mmas[:len(self.mmas) - left]


@pytest.mark.parametrize("stages", [3, 4])
@pytest.mark.parametrize("blocks", [1, 2, 3, 5, 9])
def test_the_gluon_pipeline_reads_each_tile_after_it_lands_and_before_it_is_overwritten(stages, blocks):
    """The wait counts and slots of kernels/attention_gluon.py (mirrored here line by line: the
    prologue's STAGES - 1 copies, wait_group(STAGES - 2), the loop's wait_group(STAGES - 3), the
    copy STAGES - 1 blocks ahead after both wgmmas are waited for) for every block count: no race."""
    pipe = _Pipeline(stages)
    for i in range(stages - 1):
        pipe.commit()
        if i < blocks:
            pipe.copy(i)
    pipe.wait_copies(stages - 2)
    pipe.mma("k", 0)
    pipe.wait_mmas(0)
    for j in range(blocks):
        pipe.wait_copies(stages - 3)
        pipe.mma("k", j + 1, exists=j + 1 < blocks)  # S_{j+1}
        pipe.wait_mmas(0)  # P_{j-1}.V_{j-1} and S_{j+1}
        pipe.commit()
        if j + stages - 1 < blocks:
            pipe.copy(j + stages - 1)
        pipe.mma("v", j)  # P_j.V_j, left in flight into the next block
    pipe.wait_mmas(0)


def test_perf_json_and_inspect_say_which_launch_config_runs(tmp_path, monkeypatch):
    """The backend's ``variant``: the launch config a call runs on a platform (a Gluon default gives
    way on Ada), recorded in the loaded model's attention stats (perf.json) and in inspect's list."""
    from diffgen.attention import describe_attention

    hopper, ada = Platform("cuda", "cuda:0", "H200", capability=(9, 0)), Platform("cuda", "cuda:0", "L40S",
                                                                                     capability=(8, 9))
    backend = attention_fp8.Fp8AttentionBackend()
    assert backend.variant(hopper) == backend.variant(ada) == attention_fp8.DEFAULT_CONFIG
    monkeypatch.setattr(attention_fp8, "DEFAULT_CONFIG", "m64n128w4s3-gluon")
    assert backend.variant(hopper) == "m64n128w4s3-gluon" and backend.variant(ada) == attention_fp8.PORTABLE_CONFIG
    backend.config = "m64n64w4s3-fold"
    assert backend.variant(ada) == "m64n64w4s3-fold"
    monkeypatch.undo()
    path = save_tiny_transformer("flux1", tmp_path / "flux", dtype=torch.float32)
    model = diffgen.load_transformer(path, device="cpu", attention="fp8-reference")
    assert model.diffgen_attention.to_dict()["variant"] == f"the math of {attention_fp8.DEFAULT_CONFIG}"
    listed = {b["name"]: b for b in describe_attention(Platform("cpu", "cpu", "x86"), "fp8-reference")["backends"]}
    assert listed["fp8-reference"]["variant"] == f"the math of {attention_fp8.DEFAULT_CONFIG}"
    assert listed["fp8"]["variant"] is None  # unavailable here, so it runs nothing
