"""Several processes on the CPU (gloo): SGLang-Diffusion's degrees, Ulysses and CFG parallel.

Two processes are spawned once for the module; each runs every case below through
``load_pipeline(parallel=...)`` on the tiny FLUX.1 and Wan pipelines, 16-bit (fp32 on the CPU)
and ``--quantization fp8`` (the builtin reference method), and rank 0 saves the final latents. The
test process computes the same cases in one process and compares.

Tolerance: Ulysses gives each process whole heads over the whole sequence, and each linear sees a
slice of the rows; CFG parallel computes each branch exactly as one process would. The only
difference is the summation order inside fp32 GEMMs of other row counts (a few ulp), carried
through 2 denoising steps: measured max |diff| 0 to 3e-7 against latents of magnitude ~1 to 4;
1e-5 absolute leaves 30x margin while an error in a split (a wrong head, slice or branch) moves
latents by 0.1 and more.

Ring attention is not run here: in diffusers 0.42 it needs an attention backend that returns the
log-sum-exp (flash, _native_cudnn, _native_flash, sage), all CUDA-only; the native SDPA backend
refuses ``return_lse``. Its refusal is tested; the run is in benchmarks/multi_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from diffgen.parallel import ParallelConfig, ParallelError, check_guidance, check_model, check_sequence
from diffgen.tiny.pipelines import build_tiny_pipeline
from tests.ranks import run_ranks

ATOL = 1e-5  # see the module docstring
CALL = dict(prompt="a red cube", height=32, width=32, num_inference_steps=2, output_type="latent")
# (name, family, --quantization, parallel degrees on 2 processes, extra call arguments)
CASES = [
    ("wan-16bit-ulysses", "wan", None, dict(ulysses_degree=2), dict(num_frames=5)),
    ("wan-fp8-cfg", "wan", "fp8", dict(cfg_parallel_size=2), dict(num_frames=5)),
    ("flux1-fp8-ulysses", "flux1", "fp8", dict(ulysses_degree=2), {}),
    ("flux1-16bit-cfg", "flux1", None, dict(cfg_parallel_size=2), dict(negative_prompt="blurry", true_cfg_scale=3.0)),
]


def _latents(model_path, quantization, parallel, extra, pipe=None):
    from diffgen.pipeline import load_pipeline

    if pipe is None:
        pipe = load_pipeline(model_path, quantization=quantization, device="cpu", dtype="fp32", parallel=parallel)
    kwargs = {**CALL, **extra, "generator": torch.Generator("cpu").manual_seed(0)}
    with torch.inference_mode():
        out = pipe(**kwargs, return_dict=False)[0]
    return torch.Tensor(out).clone(), pipe


def _cases(rank: int, results: dict, dirs: dict) -> None:
    """Every case on each process (both keep their latents)."""
    for name, family, quantization, degrees, extra in CASES:
        results[name], pipe = _latents(dirs[family], quantization, ParallelConfig(num_gpus=2, **degrees), extra)
        if name == "wan-fp8-cfg":
            # the pipeline's guard refuses a call without a negative branch, before any transformer call
            try:
                _latents(None, None, None, {**extra, "guidance_scale": 1.0}, pipe)
                results["no-negative-branch"] = "no error"
            except ParallelError as exc:
                results["no-negative-branch"] = str(exc)
        if name == "flux1-fp8-ulysses":
            # 12x12 px is 3x3 image tokens, which 2 processes cannot share: refused on every rank
            # by the split check, before any attention runs
            try:
                _latents(None, None, ParallelConfig(num_gpus=2, ulysses_degree=2), dict(height=12, width=12), pipe)
                results["odd-sequence"] = "no error"
            except ParallelError as exc:
                results["odd-sequence"] = str(exc)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    return {f: build_tiny_pipeline(f, tmp_path_factory.mktemp(f), seed=0) for f in ("wan", "flux1")}


@pytest.fixture(scope="module")
def two_process_results(pipelines):
    return run_ranks(_cases, 2, {k: str(v) for k, v in pipelines.items()})


@pytest.mark.parametrize("name,family,quantization,degrees,extra", CASES, ids=[c[0] for c in CASES])
def test_two_processes_match_one(two_process_results, pipelines, name, family, quantization, degrees, extra):
    for results in two_process_results:
        assert "error" not in results, results["error"]
    single, pipe = _latents(pipelines[family], quantization, None, extra)
    for rank, results in enumerate(two_process_results):
        got = results[name]
        assert got.shape == single.shape
        diff = (got - single).abs().max().item()
        assert diff <= ATOL, f"rank {rank}: max |diff| {diff} (latents up to {single.abs().max().item():.2f})"
    if degrees.get("cfg_parallel_size") == 2:
        # the guidance matters: without the negative branch the latents move far more than the tolerance
        unguided = {**extra, "true_cfg_scale": 1.0} if family == "flux1" else {**extra, "guidance_scale": 1.0}
        other, _ = _latents(None, None, None, unguided, pipe)
        assert (other - single).abs().max().item() > 100 * ATOL


def test_cfg_parallel_refuses_a_call_without_a_negative_branch(two_process_results):
    for results in two_process_results:
        assert "runs no negative branch with guidance_scale=1.0" in results["no-negative-branch"]


def test_sequence_not_divisible_is_refused(two_process_results):
    for results in two_process_results:
        assert "does not divide" in results["odd-sequence"] and "--sp-degree 2" in results["odd-sequence"]


# -- the degrees, checked in one place --------------------------------------------------------

@pytest.mark.parametrize("given,expected", [
    (dict(num_gpus=2), (2, 2, 1, 1)),
    (dict(num_gpus=4, ring_degree=2), (4, 2, 2, 1)),
    (dict(num_gpus=4, cfg_parallel_size=2), (2, 2, 1, 2)),
    (dict(num_gpus=2, cfg_parallel_size=2), (1, 1, 1, 2)),
    (dict(num_gpus=8, ulysses_degree=2, ring_degree=2, cfg_parallel_size=2), (4, 2, 2, 2)),
])
def test_degrees_are_derived_as_sglang_defines_them(given, expected):
    r = ParallelConfig(**given).resolved()
    assert (r.sp_degree, r.ulysses_degree, r.ring_degree, r.cfg_parallel_size) == expected
    assert r.sp_degree * r.cfg_parallel_size * r.tp_size == r.num_gpus


@pytest.mark.parametrize("given,words", [
    (dict(num_gpus=2, ulysses_degree=3), "--ulysses-degree 3 does not divide --sp-degree 2"),
    (dict(num_gpus=2, ulysses_degree=2, ring_degree=2), "must multiply"),
    (dict(num_gpus=4, sp_degree=4, ulysses_degree=2, ring_degree=1), "--ulysses-degree x --ring-degree"),
    (dict(num_gpus=3, cfg_parallel_size=2), "not a multiple"),
    (dict(num_gpus=2, cfg_parallel_size=3), "1 or 2"),
    (dict(num_gpus=4, tp_size=2, ulysses_degree=2), "does not combine tensor parallelism with Ulysses"),
    (dict(num_gpus=0), "positive integer"),
])
def test_degrees_that_do_not_fit_are_refused(given, words):
    with pytest.raises(ParallelError, match=words):
        ParallelConfig(**given).resolved()


def test_ulysses_degree_must_divide_the_heads():
    config = {"_class_name": "WanTransformer3DModel", "num_attention_heads": 40}
    check_model(ParallelConfig(num_gpus=4, ulysses_degree=4), config, "wan/config.json")  # 40 % 4 == 0
    with pytest.raises(ParallelError, match="does not divide the 40 attention heads.*wan/config.json"):
        check_model(ParallelConfig(num_gpus=3, ulysses_degree=3), config, "wan/config.json")
    # Ring splits the sequence, not the heads
    check_model(ParallelConfig(num_gpus=3, ring_degree=3), config, "wan/config.json")


def test_context_parallel_needs_a_cp_plan():
    config = {"_class_name": "HunyuanVideoTransformer3DModel", "num_attention_heads": 2}
    import diffusers

    if getattr(diffusers.HunyuanVideoTransformer3DModel, "_cp_plan", None) is not None:
        pytest.skip("this diffusers has a context-parallel plan for HunyuanVideo")
    with pytest.raises(ParallelError, match="no context-parallel plan"):
        check_model(ParallelConfig(num_gpus=2), config, "config.json")


def test_check_sequence():
    check_sequence(ParallelConfig(num_gpus=4, ulysses_degree=2, ring_degree=2), 4096, "the image tokens")
    with pytest.raises(ParallelError, match="does not divide the 4095 tokens of the image tokens"):
        check_sequence(ParallelConfig(num_gpus=4, ring_degree=4), 4095, "the image tokens")


def test_cfg_parallel_needs_a_negative_branch():
    from diffusers import FluxPipeline, WanPipeline

    flux, wan = object.__new__(FluxPipeline), object.__new__(WanPipeline)
    check_guidance(flux, dict(negative_prompt="blurry", true_cfg_scale=4.0))
    with pytest.raises(ParallelError, match="negative prompt and true_cfg_scale > 1"):
        check_guidance(flux, dict(true_cfg_scale=4.0))
    with pytest.raises(ParallelError, match="true_cfg_scale > 1"):
        check_guidance(flux, dict(negative_prompt="blurry"))  # FluxPipeline's default true_cfg_scale is 1.0
    check_guidance(wan, {})  # guidance_scale 5.0 by default
    with pytest.raises(ParallelError, match="guidance_scale=1.0"):
        check_guidance(wan, dict(guidance_scale=1.0))
