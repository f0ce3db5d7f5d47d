"""Tensor parallelism at run time (``--tp-size 2``) on the tiny FLUX.1 pipeline, gloo processes.

Four processes are spawned once for the module (spawning is most of the time on 2 cores): CFG
parallel 2 x tensor parallel 2, so each guidance branch runs split over its own pair of processes
(the mesh's ``tp`` dimension; ``--tp-size 2`` alone runs in the CLI test). Each loads the pipeline
with ``ParallelConfig(num_gpus=4, tp_size=2, cfg_parallel_size=2)`` (16-bit as fp32, online FP8
per-channel, and FP8 checkpoints with per-tensor static and per-channel dynamic scales, written by
tests.test_fp8's own writer), records the guided final latents and the shapes its split left, and
the test process compares them with one process running the same load. (CFG parallel alone
computes each branch exactly as one process: test_parallel.py.)

Tolerances:
- 16-bit and FP8 with a static input scale: each rank computes whole heads and a slice of the MLP;
  a row-parallel layer's output is the sum of two partial GEMMs (all-reduced) instead of one, so
  the only difference is fp32 summation order (a few ulp), carried through 2 denoising steps. A
  static input scale quantizes each activation element alike on one rank or two, so FP8 adds no
  rounding difference, except where an ulp moves a value across an FP8 rounding boundary of the
  next layer's input. Measured max |diff| 1.2e-6 on guided latents up to 4.3; 1e-4 absolute leaves
  80x margin, while adding the row-parallel bias on both ranks (twice in all) moves them by 0.058
  (checked below).
- FP8 with dynamic per-token activation scales: a row-parallel layer quantizes each rank's half of
  a token with that half's own scale (finer than the whole token's, as vLLM's row-parallel FP8
  does), so the rounding differs from one process by FP8's own error. The test holds the split
  run to the same accuracy against the 16-bit model as the single-process FP8 run (within 1.5x;
  measured max |diff| against 16-bit: split 0.061 / 0.022, one process 0.061 / 0.026 for the
  per-channel checkpoint / online per-channel).
"""

from __future__ import annotations

import pytest
import torch

from diffgen.parallel import ParallelConfig, ParallelError, check_model
from tests.ranks import run_ranks

ATOL = 1e-4  # see the module docstring
# FLUX.1's true CFG (a negative prompt, true_cfg_scale > 1): two branches, each on its own pair of processes
CALL = dict(prompt="a red cube", height=32, width=32, num_inference_steps=2, output_type="latent",
            negative_prompt="blurry", true_cfg_scale=3.0)
WORLD = 4
PARALLEL = ParallelConfig(num_gpus=WORLD, tp_size=2, cfg_parallel_size=2)
# name -> (checkpoint: None = the 16-bit pipeline, or an FP8 scheme and activation scheme; --quantization)
CASES = {
    "16bit": (None, None),
    "fp8-online-per-channel": (None, "fp8"),
    "fp8-per-tensor-static": (("per-tensor", "static"), None),
    "fp8-per-channel-dynamic": (("per-channel", "dynamic"), None),
}
EXACT = ("16bit", "fp8-per-tensor-static")


def _load(dirs, name, parallel, device="cpu", dtype="fp32"):
    from diffgen.pipeline import load_pipeline

    checkpoint, quantization = CASES[name]
    extra = {} if checkpoint is None else {"transformer_path": dirs[name]}
    return load_pipeline(dirs["pipeline"], quantization=quantization, device=device, dtype=dtype,
                         parallel=parallel, **extra)


def _latents(pipe):
    with torch.inference_mode():
        out = pipe(**CALL, generator=torch.Generator("cpu").manual_seed(0), return_dict=False)[0]
    return torch.Tensor(out).float().cpu().clone()


def _cases(rank: int, results: dict, dirs: dict) -> None:
    torch.set_num_threads(1)  # four processes share two cores: more threads would only contend
    for name in CASES:
        pipe = _load(dirs, name, PARALLEL)
        model = pipe.transformer
        block, single = model.transformer_blocks[0], model.single_transformer_blocks[0]
        results[name] = _latents(pipe)
        results[f"{name}:shapes"] = {
            "to_q": tuple(block.attn.to_q.weight.shape), "to_out": tuple(block.attn.to_out[0].weight.shape),
            "proj_out": tuple(single.proj_out.weight.shape), "heads": block.attn.heads,
            "norm1": tuple(block.norm1.linear.weight.shape), "method": type(block.attn.to_q).__name__}
        if name == "16bit":
            # the same split with the row-parallel bias added on each rank (twice in all): must not pass
            for m in model.modules():
                if getattr(m, "tp_bias", None) is not None:
                    m.register_forward_hook(lambda mod, args, out: out + mod.tp_bias)
            results["16bit:bias-twice"] = _latents(pipe)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from diffgen.tiny.pipelines import build_tiny_pipeline
    from tests.test_fp8 import write_fp8_checkpoint

    pipeline = build_tiny_pipeline("flux1", tmp_path_factory.mktemp("flux1"), seed=0)
    out = {"pipeline": str(pipeline)}
    for name, (checkpoint, _) in CASES.items():
        if checkpoint is not None:
            scheme, activation = checkpoint
            out[name] = str(write_fp8_checkpoint(pipeline / "transformer", tmp_path_factory.mktemp(name) / "t",
                                                 scheme, activation))
    return out


@pytest.fixture(scope="module")
def split_results(dirs):
    results = run_ranks(_cases, WORLD, dirs)
    for r in results:
        assert "error" not in r, r["error"]
    return results


@pytest.fixture(scope="module")
def reference_16bit(dirs):
    return _latents(_load(dirs, "16bit", None))


@pytest.mark.parametrize("name", list(CASES))
def test_tp_matches_one_process(split_results, dirs, reference_16bit, name):
    single = _latents(_load(dirs, name, None))
    for rank, results in enumerate(split_results):
        got = results[name]
        assert got.shape == single.shape
        diff = (got - single).abs().max().item()
        if name in EXACT:
            assert diff <= ATOL, f"rank {rank}: max |diff| {diff} (latents up to {single.abs().max().item():.2f})"
        else:
            err_tp = (got - reference_16bit).abs().max().item()
            err_one = (single - reference_16bit).abs().max().item()
            assert err_tp <= 1.5 * err_one, f"rank {rank}: {err_tp} vs one process {err_one}"
    # the split happened: half the rows / columns and heads, the modulation linear whole
    shapes = split_results[0][f"{name}:shapes"]
    assert shapes["to_q"] == (16, 32) and shapes["to_out"] == (32, 16) and shapes["heads"] == 1
    assert shapes["proj_out"] == (32, (32 + 128) // 2) and shapes["norm1"] == (192, 32)
    assert shapes["method"] == ("Linear" if CASES[name] == (None, None) else "QuantLinear")


def test_ranks_agree_and_a_doubled_bias_is_caught(split_results, reference_16bit):
    first = split_results[0]
    for other in split_results[1:]:
        assert torch.equal(first["16bit"], other["16bit"])  # every rank ends with the same guided latents
    assert (first["16bit:bias-twice"] - reference_16bit).abs().max().item() > 100 * ATOL


def test_packed_proj_out_takes_two_runs_of_columns():
    """The single block's proj_out input is cat([attention 32, MLP 128]): rank r keeps columns
    [16r, 16r + 16) and [32 + 64r, 32 + 64r + 64), checked against the weight built by hand."""
    from diffgen.parallel.tp_runtime import shard_model
    from diffgen.tiny.transformers import tiny_transformer

    whole = tiny_transformer("flux1").float()
    w = whole.single_transformer_blocks[0].proj_out.weight.detach().clone()
    for rank in range(2):
        model = tiny_transformer("flux1").float()
        model.load_state_dict(whole.state_dict())
        shard_model(model, rank, 2, None)
        got = model.single_transformer_blocks[0].proj_out.weight
        expected = torch.cat([w[:, 16 * rank:16 * rank + 16], w[:, 32 + 64 * rank:32 + 64 * rank + 64]], dim=1)
        assert torch.equal(got, expected)
        assert model.single_transformer_blocks[0].proj_out.in_features == 80


def test_a_method_that_cannot_split_is_named_and_the_model_stays_whole():
    from diffgen.builtin.fp8_methods import Fp8ReferenceMethod
    from diffgen.linear import LinearMethod, QuantLinear, ShardError, replace_module
    from diffgen.parallel.tp_runtime import shard_model
    from diffgen.quant import LayerSpec, QuantConfig
    from diffgen.tiny.transformers import tiny_transformer

    class NoSplit(Fp8ReferenceMethod):
        name = "no-split-kernel"
        tp_shards = LinearMethod.tp_shards

    model = tiny_transformer("flux1").float()
    name = "transformer_blocks.0.ff.net.2"
    spec = LayerSpec(name, 128, 32, True, torch.float32)
    replace_module(model, name, QuantLinear(spec, NoSplit(QuantConfig("fp8", scheme="per-channel"), spec),
                                            dtype=torch.float32))
    with pytest.raises(ShardError, match=r"linear method no-split-kernel does not say how.*transformer_blocks\.0\.ff"):
        shard_model(model, 0, 2, None)
    assert model.transformer_blocks[0].attn.to_q.weight.shape == (32, 32)  # nothing was split
    assert model.transformer_blocks[0].attn.heads == 2


def test_scaled_mm_row_scales_follow_the_rows():
    """Fp8ScaledMMMethod derives a [1, N] scale buffer after loading; a column-parallel split
    slices it with the weight's rows (checked against the rank's per-channel scales)."""
    from diffgen.builtin.fp8_methods import Fp8ScaledMMMethod, quantize_weight
    from diffgen.linear import QuantLinear
    from diffgen.parallel.tp_runtime import own_tensors, rank_part, replace_tensors
    from diffgen.quant import LayerSpec, QuantConfig

    spec = LayerSpec("transformer_blocks.0.attn.to_q", 32, 64, True, torch.float32)
    layer = QuantLinear(spec, Fp8ScaledMMMethod(QuantConfig("fp8", scheme="per-channel"), spec), dtype=torch.float32)
    for key, t in {**quantize_weight(torch.randn(64, 32), "per-channel"), "bias": torch.randn(64)}.items():
        setattr(layer, key, torch.nn.Parameter(t, requires_grad=False))
    layer.method.process_weights_after_loading(layer)
    scales = layer.weight_scale.clone()
    shards = layer.method.tp_shards("colwise", 2)
    replace_tensors(layer, {k: rank_part(t, shards.get(k), 1, 2, k, None) for k, t in own_tensors(layer)})
    assert layer.out_features == 32 and layer.method.layer.out_features == 32
    assert torch.equal(layer._scale_b, scales[32:].reshape(1, 32))
    assert torch.equal(layer.weight_scale, scales[32:])


def test_tp_is_refused_where_it_is_not_built():
    with pytest.raises(ParallelError, match="built for FluxTransformer2DModel, WanTransformer3DModel .*not "
                                            "QwenImageTransformer2DModel"):
        check_model(ParallelConfig(num_gpus=2, tp_size=2), {"_class_name": "QwenImageTransformer2DModel"},
                    "config.json")
    with pytest.raises(ParallelError, match="does not divide the 3 attention heads"):
        check_model(ParallelConfig(num_gpus=2, tp_size=2),
                    {"_class_name": "FluxTransformer2DModel", "num_attention_heads": 3}, "config.json")
    with pytest.raises(ParallelError, match="does not combine tensor parallelism with Ulysses or Ring"):
        ParallelConfig(num_gpus=4, tp_size=2, ulysses_degree=2).resolved()
    r = ParallelConfig(num_gpus=4, tp_size=2, cfg_parallel_size=2).resolved()
    assert (r.sp_degree, r.tp_size, r.cfg_parallel_size) == (1, 2, 2)


def test_cli_tp_size_writes_one_png(dirs, tmp_path, capfd):
    from diffgen.cli import main

    out = tmp_path / "out"
    status = main(["generate", "--model-path", dirs["pipeline"], "--prompt", "a red cube", "--device", "cpu",
                   "--height", "32", "--width", "32", "--num-inference-steps", "2", "--num-gpus", "2",
                   "--tp-size", "2", "--output-path", str(out)])
    err = capfd.readouterr().err
    assert status == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a_red_cube_seed0.png"]


# -- two GPUs (NCCL): the lead runs these on a two-GPU machine ----------------------------------

def _cuda_cases(rank: int, results: dict, dirs: dict) -> None:
    for name in ("16bit", "fp8-online-per-channel"):
        pipe = _load(dirs, name, ParallelConfig(num_gpus=2, tp_size=2), device="cuda", dtype="bf16")
        results[name] = _latents(pipe)
        results[f"{name}:method"] = pipe.transformer.transformer_blocks[0].attn.to_q.extra_repr()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL)")
def test_tp_on_two_gpus_matches_one(dirs):
    """bf16 on two GPUs through NCCL, with the GPU's FP8 method (diffgen-cuda's where installed).
    bf16 rounds each partial sum of a row-parallel layer before the all-reduce adds them: a few
    bf16 ulp (1/128 relative) of the latents' magnitude ~4, carried through 2 steps; 0.1 absolute
    leaves margin. FP8 as on the CPU: the split run is as close to the 16-bit model as one GPU's
    FP8 run is, within 1.5x plus that bf16 allowance."""
    ranks = run_ranks(_cuda_cases, 2, dirs)
    reference = _latents(_load(dirs, "16bit", None, device="cuda", dtype="bf16"))
    one_fp8 = _latents(_load(dirs, "fp8-online-per-channel", None, device="cuda", dtype="bf16"))
    for results in ranks:
        assert "error" not in results, results["error"]
        assert "fp8" in results["fp8-online-per-channel:method"]
        assert (results["16bit"] - reference).abs().max().item() <= 0.1
        err_tp = (results["fp8-online-per-channel"] - reference).abs().max().item()
        err_one = (one_fp8 - reference).abs().max().item()
        assert err_tp <= 1.5 * err_one + 0.1, (err_tp, err_one)
