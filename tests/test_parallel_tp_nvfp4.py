"""Tensor parallelism for the 4-bit formats: NVFP4 (diffgen-cuda) and MXFP4 (diffgen-rocm) splits,
and the methods that refuse.

Layer level (one process): each rank's layer, built from its slices of the checkpoint tensors,
computes its part of the whole layer (column-parallel outputs concatenate, row-parallel partial
sums add up). Pipeline level: the tiny FLUX.1 pipeline with an NVFP4 checkpoint written here from
the format's definition, ``--tp-size 2`` on two gloo processes against one process.

Tolerances:
- Layer level: the scales each rank holds are the whole layer's, and both formats round the
  activations block by block along K (NVFP4 W4A4 with the static input_scale as the global scale;
  MX with a scale per group and no global one), so every product is the same; the only difference
  is fp32 summation order (row-parallel: two partial sums), a few ulp of |y| ~ 10. 1e-4 leaves
  margin while a wrong slice or scale moves y by > 0.1.
- Pipeline, W4A4 with input_scale and W4A16: the same, carried through 2 denoising steps (an ulp
  could move an activation across a 4-bit rounding boundary of the next layer; it did not here).
  Measured max |diff| split vs one process 3.6e-7 (W4A4) and 4.8e-7 (W4A16) on latents up to 4.3,
  against a 4-bit error of 0.045 / 0.034 vs the 16-bit model; ATOL 1e-4.
- Pipeline, W4A4 without input_scale on the row-parallel layers (``w4a4-dynamic``): a rank takes
  the global scale from the amax of its own half of the input, so its rounding differs from one
  process's by the format's own error (measured 0.011 vs one process); the split run must be as
  close to the 16-bit model as one process's, within 1.5x (measured 0.0432 vs 0.0433).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from diffgen.linear import QuantLinear, ShardError
from diffgen.parallel import ParallelConfig
from diffgen.parallel.tensor import shard_slices
from diffgen.parallel.tp_runtime import own_tensors, rank_part, replace_tensors
from diffgen.quant import LayerSpec, QuantConfig
from tests.ranks import run_ranks

pytest.importorskip("diffgen_cuda")
WEIGHTS = "diffusion_pytorch_model.safetensors"
SIZE = 2
ATOL = 1e-4  # see the module docstring
CALL = dict(prompt="a red cube", height=32, width=32, num_inference_steps=2, output_type="latent")
# name -> the layers written without input_scale: none (W4A4), all (the tensors then say W4A16),
# or the row-parallel ones (their activations take a global scale per call: w4a4-dynamic)
CASES = {"w4a4": (), "w4a16": ("*",), "w4a4-dynamic": ("*.to_out.0", "*.ff.net.2", "*.ff_context.net.2")}
EXACT = ("w4a4", "w4a16")
INPUT_AMAX = 16.0  # the static activation range written as input_scale (values beyond it saturate)


@pytest.fixture(autouse=True)
def with_plugins(monkeypatch):
    from diffgen.plugins import reset_plugins

    monkeypatch.setenv("DIFFGEN_PLUGINS", "cuda")  # as in the spawned ranks
    reset_plugins()
    yield
    reset_plugins()


# -- layer level ------------------------------------------------------------------------------

def _nvfp4_layer(method_cls, n: int, k: int, tensors: dict, bias: torch.Tensor, scheme="w4a4") -> QuantLinear:
    spec = LayerSpec("transformer_blocks.0.ff.net.2", k, n, True, torch.float32)
    config = QuantConfig("nvfp4", scheme=scheme)
    layer = QuantLinear(spec, method_cls(config, spec, unavailable_reason="CPU test"), dtype=torch.float32)
    for key, t in {**tensors, "bias": bias}.items():
        setattr(layer, key, torch.nn.Parameter(t.clone(), requires_grad=False))
    layer.method.process_weights_after_loading(layer)
    return layer


def _nvfp4_tensors(w: torch.Tensor, static: bool = True) -> dict:
    from diffgen.numerics.nvfp4 import quantize_nvfp4

    packed, scale, g = quantize_nvfp4(w)
    out = {"weight": packed, "weight_scale": scale, "weight_scale_2": g}
    if static:
        out["input_scale"] = torch.tensor(INPUT_AMAX / (6 * 448))
    return out


def _split_and_run(whole, make, tensors, bias, x, style):
    """Each rank's layer from its slices (``make(n, k, tensors, bias)``), combined as TP does."""
    shards = whole.method.tp_shards(style, SIZE)
    n, parts = bias.shape[0], []
    for rank in range(SIZE):
        mine = {key: t[shard_slices(tuple(t.shape), shards.get(key), rank, SIZE, key)] for key, t in tensors.items()}
        rank_bias = bias[shard_slices((n,), shards.get("bias"), rank, SIZE, "bias")] if style == "colwise" \
            else torch.zeros(n)
        k_r = whole.in_features * mine["weight"].shape[1] // tensors["weight"].shape[1]
        rank_x = x if style == "colwise" else x[:, rank * k_r:(rank + 1) * k_r]
        parts.append(make(mine["weight"].shape[0], k_r, mine, rank_bias)(rank_x))
    return torch.cat(parts, dim=1) if style == "colwise" else sum(parts) + bias


@pytest.mark.parametrize("style", ["colwise", "rowwise"])
def test_nvfp4_reference_shards_compute_the_whole_layer(style):
    from diffgen_cuda.nvfp4 import Nvfp4ReferenceMethod

    torch.manual_seed(0)
    n, k = 64, 128
    w, bias, x = torch.randn(n, k), torch.randn(n), 3 * torch.randn(5, k)
    tensors = _nvfp4_tensors(w)
    whole = _nvfp4_layer(Nvfp4ReferenceMethod, n, k, tensors, bias)
    y = whole(x)
    # the definition, written out: dequantized weight times the activations rounded per 16 with input_scale
    from diffgen.numerics.e2m1 import e2m1_to_float, unpack_e2m1
    wd = e2m1_to_float(unpack_e2m1(tensors["weight"])) * \
        tensors["weight_scale"].float().repeat_interleave(16, dim=1) * tensors["weight_scale_2"]
    assert (y - F.linear(_fake_nvfp4(x, tensors["input_scale"]), wd, bias)).abs().max().item() < 1e-4
    got = _split_and_run(whole, lambda n_, k_, t, b: _nvfp4_layer(Nvfp4ReferenceMethod, n_, k_, t, b),
                         tensors, bias, x, style)
    assert (got - y).abs().max().item() < ATOL


def _fake_nvfp4(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 rounding of activations, from the format's definition: per 16 along K, an E4M3 block
    scale amax / (6 g), elements to the nearest E2M1 value (ties to even) of x / (s g)."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    g = global_scale.float()
    blocks = x.reshape(x.shape[0], -1, 16)
    s = (blocks.abs().amax(-1, keepdim=True) / (6 * g)).clamp(2.0 ** -9, 448).to(torch.float8_e4m3fn).float()
    s = torch.where(blocks.abs().amax(-1, keepdim=True) == 0, torch.ones_like(s), s)
    v = (blocks / (s * g)).clamp(-6, 6)
    dist = (v.abs()[..., None] - grid).abs()
    codes = torch.arange(8)
    # the nearest grid value; of two equally near (always neighbours), the even code
    choice = torch.where(dist == dist.min(-1, keepdim=True).values, codes + 8 * (codes % 2), 99).amin(-1) % 8
    return (grid[choice] * v.sign() * s * g).reshape(x.shape)


def test_w4a8_row_buffers_follow_the_rows_and_stay_whole_row_parallel():
    """The W4A8 method derives per-row FP8 scales after loading. Column-parallel, rank 1 keeps
    exactly the rows a layer built from its own slice derives; row-parallel, it keeps the whole
    row's scales (every value of its K slice fits: each FP8 weight element is one process's)."""
    from diffgen_cuda.nvfp4_w4a8 import Nvfp4TritonW4A8Method

    torch.manual_seed(1)
    n, k = 64, 128
    w = torch.randn(n, k) * torch.linspace(0.1, 4, n)[:, None]
    tensors, bias = _nvfp4_tensors(w), torch.randn(n)
    for style in ("colwise", "rowwise"):
        layer = _nvfp4_layer(Nvfp4TritonW4A8Method, n, k, tensors, bias)
        whole = {key: getattr(layer, key).clone() for key in ("_row_global", "_w8_scale", "_w8_factor")}
        shards = layer.method.tp_shards(style, SIZE)
        replace_tensors(layer, {key: rank_part(t, shards.get(key), 1, SIZE, key, None)
                                for key, t in own_tensors(layer)})
        if style == "colwise":
            own = _nvfp4_layer(Nvfp4TritonW4A8Method, n // 2, k, {key: t[n // 2:] if t.dim() else t
                                                                  for key, t in tensors.items()}, bias[n // 2:])
            assert layer.out_features == n // 2 and layer.weight.shape == (n // 2, k // 2)
            for key in whole:
                assert torch.equal(getattr(layer, key), getattr(own, key)), key
        else:
            assert layer.in_features == k // 2 and layer.weight.shape == (n, k // 4)
            assert layer.weight_scale.shape == (n, k // 32)
            for key in whole:
                assert torch.equal(getattr(layer, key), whole[key]), key


def test_nvfp4_refuses_padded_or_partial_blocks_and_unknown_kernels():
    from diffgen_cuda.nvfp4 import Nvfp4ReferenceMethod
    from diffgen_cuda.nvfp4_blackwell import Nvfp4BlackwellMethod

    config = QuantConfig("nvfp4", scheme="w4a4")
    padded = Nvfp4ReferenceMethod(config, LayerSpec("blocks.0.ffn.net.2", 40, 32, True, torch.float32))
    with pytest.raises(ShardError, match=r"nvfp4-reference \(blocks.0.ffn.net.2\): K = 40 is stored padded to whole NVFP4 blocks of 16"):
        padded.tp_shards("rowwise", SIZE)
    assert "weight" in padded.tp_shards("colwise", SIZE)  # whole rows split whatever K is
    odd = Nvfp4ReferenceMethod(config, LayerSpec("blocks.0.attn1.to_out.0", 48, 32, True, torch.float32))
    with pytest.raises(ShardError, match="K = 48 is 3 NVFP4 blocks of 16, which do not split into 2"):
        odd.tp_shards("rowwise", SIZE)
    blackwell = Nvfp4BlackwellMethod(config, LayerSpec("blocks.0.attn1.to_q", 64, 64, True, torch.bfloat16))
    with pytest.raises(ShardError, match="nvfp4-blackwell-fp4-gemm .* does not say how that copy splits"):
        blackwell.tp_shards("colwise", SIZE)


# -- MXFP4 (diffgen-rocm) ------------------------------------------------------------------------

def _mx_layer(method_cls, n, k, tensors, bias):
    spec = LayerSpec("transformer_blocks.0.ff.net.2", k, n, True, torch.float32)
    layer = QuantLinear(spec, method_cls(QuantConfig("mxfp4", scheme="w4a4"), spec), dtype=torch.float32)
    for key, t in {**tensors, "bias": bias}.items():
        setattr(layer, key, torch.nn.Parameter(t.clone(), requires_grad=False))
    layer.method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("style", ["colwise", "rowwise"])
def test_mxfp4_reference_shards_compute_the_whole_layer(style):
    pytest.importorskip("diffgen_rocm")
    from diffgen_rocm.mxfp4 import Mxfp4ReferenceMethod, quantize_mxfp4

    torch.manual_seed(2)
    n, k = 64, 128
    w, bias, x = torch.randn(n, k), torch.randn(n), torch.randn(5, k)
    packed, scales = quantize_mxfp4(w)
    tensors = {"weight": packed, "weight_scale": scales}
    whole = _mx_layer(Mxfp4ReferenceMethod, n, k, tensors, bias)
    got = _split_and_run(whole, lambda n_, k_, t, b: _mx_layer(Mxfp4ReferenceMethod, n_, k_, t, b),
                         tensors, bias, x, style)
    assert (got - whole(x)).abs().max().item() < ATOL


def test_mxfp4_splits_and_refusals():
    pytest.importorskip("diffgen_rocm")
    from diffgen_rocm.aiter_mxfp4 import AiterMxfp4Method
    from diffgen_rocm.mxfp4 import Mxfp4ReferenceMethod
    from diffgen_rocm.mxfp4_cuda import Mxfp4Packed4Method, Mxfp4Packed4W4A8Method

    config = QuantConfig("mxfp4", scheme="w4a4")
    spec = LayerSpec("blocks.0.ffn.net.2", 128, 256, True, torch.bfloat16)
    assert Mxfp4ReferenceMethod(config, spec).tp_shards("rowwise", 4)["weight"].granule == 16  # 16 bytes = 32 codes
    assert Mxfp4Packed4Method(config, spec).tp_shards("colwise", 2)["weight_scale"].axis == 0
    w4a8 = Mxfp4Packed4W4A8Method(config, spec).tp_shards("colwise", 2)
    assert w4a8["_row_scale"].axis == 1 and w4a8["_row_factor"].axis == 0
    assert "_row_scale" not in Mxfp4Packed4W4A8Method(config, spec).tp_shards("rowwise", 2)
    with pytest.raises(ShardError, match="K = 128 is 4 MXFP4 groups of 32, which do not split into 8"):
        Mxfp4ReferenceMethod(config, spec).tp_shards("rowwise", 8)
    with pytest.raises(ShardError, match="mxfp4-aiter-a4w4 .* does not say how that copy splits"):
        AiterMxfp4Method(config, spec).tp_shards("colwise", 2)


def test_svdquant_refuses_with_its_reason():
    pytest.importorskip("diffgen_nunchaku")
    from diffgen_nunchaku.reference import SvdqReferenceMethod

    method = SvdqReferenceMethod.__new__(SvdqReferenceMethod)  # tp_shards reads only the names
    method.layer = LayerSpec("transformer_blocks.0.attn.to_q", 64, 64, True, torch.bfloat16)
    with pytest.raises(ShardError, match=r"svdq-w4a4-reference \(transformer_blocks.0.attn.to_q\): diffgen does not "
                                         "split SVDQuant layers"):
        method.tp_shards("colwise", 2)


# -- the tiny FLUX.1 pipeline on two gloo processes -------------------------------------------------

def write_nvfp4_checkpoint(src, dst, dynamic: tuple[str, ...]):
    """An NVFP4 transformer in ModelOpt's tensor layout: every linear of the blocks quantized from
    its 16-bit weight, with input_scale except the layers ``dynamic`` matches; the rest left as is.
    Detected from the tensors alone (no quantization declared)."""
    from fnmatch import fnmatch

    shutil.copytree(src, dst)
    out = {}
    for name, t in load_file(dst / WEIGHTS).items():
        prefix = name[: -len(".weight")]
        if name.endswith(".weight") and t.dim() == 2 and "transformer_blocks." in name:
            static = not any(fnmatch(prefix, pattern) for pattern in dynamic)
            for key, value in _nvfp4_tensors(t.float(), static).items():
                out[f"{prefix}.{key}"] = value.contiguous()
        else:
            out[name] = t
    save_file(out, dst / WEIGHTS)
    config = json.loads((dst / "config.json").read_text())
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _load(dirs, name, parallel):
    from diffgen.pipeline import load_pipeline

    extra = {} if name == "16bit" else {"transformer_path": dirs[name]}
    return load_pipeline(dirs["pipeline"], device="cpu", dtype="fp32", parallel=parallel, **extra)


def _latents(pipe):
    with torch.inference_mode():
        out = pipe(**CALL, generator=torch.Generator("cpu").manual_seed(0), return_dict=False)[0]
    return torch.Tensor(out).float().cpu().clone()


def _cases(rank: int, results: dict, dirs: dict) -> None:
    torch.set_num_threads(1)
    for name in CASES:
        pipe = _load(dirs, name, ParallelConfig(num_gpus=SIZE, tp_size=SIZE))
        block = pipe.transformer.transformer_blocks[0]
        results[name] = _latents(pipe)
        results[f"{name}:shapes"] = {"to_q": tuple(block.attn.to_q.weight.shape),
                                     "ff2": tuple(block.ff.net[2].weight.shape),
                                     "ff2_scale": tuple(block.ff.net[2].weight_scale.shape),
                                     "method": block.ff.net[2].method.name,
                                     "scheme": block.ff.net[2].method.scheme}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from diffgen.tiny.pipelines import build_tiny_pipeline

    pipeline = build_tiny_pipeline("flux1", tmp_path_factory.mktemp("flux1"), seed=0)
    return {"pipeline": str(pipeline),
            **{name: str(write_nvfp4_checkpoint(pipeline / "transformer", tmp_path_factory.mktemp(name) / "t",
                                                CASES[name])) for name in CASES}}


@pytest.fixture(scope="module")
def split_results(dirs):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFGEN_PLUGINS", "cuda")  # the spawned ranks inherit it
        results = run_ranks(_cases, SIZE, dirs)
    for r in results:
        assert "error" not in r, r["error"]
    return results


@pytest.mark.parametrize("name", CASES)
def test_nvfp4_flux1_tp2_matches_one_process(split_results, dirs, name):
    single = _latents(_load(dirs, name, None))
    reference = _latents(_load(dirs, "16bit", None))
    for rank, results in enumerate(split_results):
        got = results[name]
        assert got.shape == single.shape
        if name in EXACT:
            diff = (got - single).abs().max().item()
            assert diff <= ATOL, f"rank {rank}: max |diff| {diff} (latents up to {single.abs().max().item():.2f})"
        else:
            err_tp, err_one = (got - reference).abs().max().item(), (single - reference).abs().max().item()
            assert err_tp <= 1.5 * err_one, f"rank {rank}: {err_tp} vs one process {err_one}"
    shapes = split_results[0][f"{name}:shapes"]
    # to_q: 32 -> 32 split by rows; ff.net.2: 128 -> 32 split by K in whole blocks (64 codes = 32 bytes, 4 scales)
    assert shapes == {"to_q": (16, 16), "ff2": (32, 32), "ff2_scale": (32, 4), "method": "nvfp4-reference",
                      "scheme": name}


# -- two GPUs (NCCL): the lead runs these on a two-GPU machine ----------------------------------

def _cuda_cases(rank: int, results: dict, dirs: dict) -> None:
    from diffgen.pipeline import load_pipeline

    for backend in (None, "nvfp4-triton-dequant"):  # the native W4A8 method (SM89+), then the weight-only one
        pipe = load_pipeline(dirs["pipeline"], transformer_path=dirs["w4a4"], device="cuda", dtype="bf16",
                             quant_backend=backend, parallel=ParallelConfig(num_gpus=SIZE, tp_size=SIZE))
        results[str(backend)] = _latents(pipe)
        results[f"{backend}:method"] = pipe.transformer.transformer_blocks[0].ff.net[2].method.name


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL)")
def test_nvfp4_tp_on_two_gpus_matches_one(dirs):
    """NVFP4 W4A4 export, bf16, split over two GPUs with diffgen-cuda's methods, against one GPU.
    bf16 rounds each row-parallel partial sum before the all-reduce, and W4A8 quantizes each rank's
    half of a token per token (and fits its FP8 row scale to the rank's K blocks); so, as in
    test_parallel_tp.py's GPU test, the split run must be as close to the 16-bit model as one GPU's
    run of the same method, within 1.5x plus a bf16 allowance of 0.1 on latents ~4."""
    from diffgen.pipeline import load_pipeline

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFGEN_PLUGINS", "cuda")
        ranks = run_ranks(_cuda_cases, SIZE, dirs)
    reference = _latents(load_pipeline(dirs["pipeline"], device="cuda", dtype="bf16"))
    for backend, method in ((None, "nvfp4-triton-w4a8"), ("nvfp4-triton-dequant", "nvfp4-triton-dequant")):
        one = _latents(load_pipeline(dirs["pipeline"], transformer_path=dirs["w4a4"], device="cuda", dtype="bf16",
                                     quant_backend=backend))
        err_one = (one - reference).abs().max().item()
        for results in ranks:
            assert "error" not in results, results["error"]
            assert results[f"{backend}:method"] == method
            err_tp = (results[str(backend)] - reference).abs().max().item()
            assert err_tp <= 1.5 * err_one + 0.1, (backend, err_tp, err_one)
