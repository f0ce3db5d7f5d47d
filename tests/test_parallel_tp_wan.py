"""Tensor parallelism on Wan (``--tp-size 2``), two gloo processes against one process.

Wan's attention normalizes query and key over all heads at once (``rms_norm_across_heads``); a
rank holding half the heads all-reduces the sum of squares (``parallel.tp_norm``). Cases:
- the tiny Wan2.2 A14B pipeline (two experts, both split), 16-bit and online FP8;
- a tiny Wan 2.1 I2V-style transformer (an image branch: ``add_k_proj`` / ``add_v_proj`` and
  ``norm_added_k`` in the cross-attention, 512 text tokens after the image tokens, as diffusers'
  processor expects), loaded split from an FP8 per-channel checkpoint with a static input scale.

Tolerances: 16-bit and FP8 with a static input scale: each rank computes whole heads and half of
the MLP; the differences are fp32 summation order (a row-parallel layer's two partial sums, the
norm's sum of squares in two parts), carried through 2 steps (measured max |diff| 2.4e-6 on
pipeline latents up to 4.4, 3.6e-7 on I2V outputs up to 2.0). ATOL 1e-4, while a norm that
forgets the other rank's heads moves the I2V output by 0.27 (checked below). Online FP8
(per-token activation scales, per-channel weight scales fitted to each rank's K columns for
row-parallel layers): the split run must be as close to the 16-bit pipeline as one process's FP8
run, within 1.5x (measured 0.039 vs 0.045).
"""

from __future__ import annotations

import pytest
import torch

from diffgen.parallel import ParallelConfig
from tests.ranks import run_ranks

SIZE = 2
ATOL = 1e-4  # see the module docstring
CALL = dict(prompt="a red cube", height=32, width=32, num_frames=5, num_inference_steps=2, output_type="latent")
I2V = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
           text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", image_dim=32, added_kv_proj_dim=32, rope_max_seq_len=1024)


def _pipeline_latents(path, quantization, parallel):
    from diffgen.pipeline import load_pipeline

    pipe = load_pipeline(path, quantization=quantization, device="cpu", dtype="fp32", parallel=parallel)
    with torch.inference_mode():
        out = pipe(**CALL, generator=torch.Generator("cpu").manual_seed(0), return_dict=False)[0]
    return torch.Tensor(out).float().clone(), pipe


def _i2v_inputs():
    g = torch.Generator().manual_seed(3)
    return dict(hidden_states=torch.randn(1, 16, 1, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 512, 32, generator=g),
                encoder_hidden_states_image=torch.randn(1, 4, 32, generator=g))


def _i2v_output(path, tp=None):
    from diffgen.loader import load_transformer
    from diffgen.parallel.tp_runtime import shard_model

    model = load_transformer(path, device="cpu", dtype=torch.float32, rewrites=False, tensor_parallel=tp)
    if tp is not None:
        shard_model(model, tp[0], tp[1], None)  # the default group: the two processes
    with torch.inference_mode():
        return model(**_i2v_inputs(), return_dict=False)[0].float().clone(), model


def _cases(rank: int, results: dict, dirs: dict) -> None:
    torch.set_num_threads(1)
    for quantization in (None, "fp8"):
        latents, pipe = _pipeline_latents(dirs["wan"], quantization, ParallelConfig(num_gpus=SIZE, tp_size=SIZE))
        results[f"pipeline-{quantization}"] = latents
        if quantization is None:
            attn = pipe.transformer_2.blocks[0].attn1
            results["split"] = {
                "heads": attn.heads, "norm_q": type(attn.norm_q).__name__, "norm_q_weight": tuple(attn.norm_q.weight.shape),
                "to_q": tuple(attn.to_q.weight.shape), "ffn2": tuple(pipe.transformer_2.blocks[0].ffn.net[2].weight.shape),
                "mapped": [pipe.transformer.diffgen_tp_load["mapped"], pipe.transformer_2.diffgen_tp_load["mapped"]]}
    results["i2v"], model = _i2v_output(dirs["i2v"], (rank, SIZE))
    cross = model.blocks[0].attn2
    results["i2v-split"] = {"add_k": tuple(cross.add_k_proj.weight.shape), "norm_added_k": type(cross.norm_added_k).__name__}
    # a norm that ignores the other rank's heads (its sum over this rank alone): must not pass
    import torch.distributed as dist

    alone = [dist.new_group([r]) for r in range(SIZE)][rank]  # every rank creates every group
    for m in model.modules():
        if type(m).__name__ == "HeadSplitRMSNorm":
            m.process_group = alone
    with torch.inference_mode():
        results["i2v-local-norm"] = model(**_i2v_inputs(), return_dict=False)[0].float().clone()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from diffusers import WanTransformer3DModel

    from diffgen.tiny.pipelines import build_tiny_pipeline
    from tests.test_fp8 import write_fp8_checkpoint

    wan = build_tiny_pipeline("wan", tmp_path_factory.mktemp("wan"), seed=0)
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("i2v")
    WanTransformer3DModel(**I2V).save_pretrained(base / "bf", safe_serialization=True)
    i2v = write_fp8_checkpoint(base / "bf", base / "fp8", "per-channel", "static")
    return {"wan": str(wan), "i2v": i2v}


@pytest.fixture(scope="module")
def split_results(dirs):
    results = run_ranks(_cases, SIZE, dirs)
    for r in results:
        assert "error" not in r, r["error"]
    return results


def test_wan_pipeline_tp2_matches_one_process(split_results, dirs):
    reference, _ = _pipeline_latents(dirs["wan"], None, None)
    fp8, _ = _pipeline_latents(dirs["wan"], "fp8", None)
    for rank, results in enumerate(split_results):
        diff = (results["pipeline-None"] - reference).abs().max().item()
        assert diff <= ATOL, f"rank {rank}: {diff} (values up to {reference.abs().max().item():.2f})"
        err_tp = (results["pipeline-fp8"] - reference).abs().max().item()
        err_one = (fp8 - reference).abs().max().item()
        assert err_tp <= 1.5 * err_one, f"rank {rank}: {err_tp} vs one process {err_one}"
    assert split_results[0]["split"] == {"heads": 1, "norm_q": "HeadSplitRMSNorm", "norm_q_weight": (16,),
                                         "to_q": (16, 32), "ffn2": (32, 32), "mapped": [True, True]}


def test_wan21_i2v_image_branch_splits(split_results, dirs):
    one, _ = _i2v_output(dirs["i2v"])
    for rank, results in enumerate(split_results):
        diff = (results["i2v"] - one).abs().max().item()
        assert diff <= ATOL, f"rank {rank}: {diff} (values up to {one.abs().max().item():.2f})"
        assert (results["i2v-local-norm"] - one).abs().max().item() > 100 * ATOL
    assert split_results[0]["i2v-split"] == {"add_k": (16, 32), "norm_added_k": "HeadSplitRMSNorm"}


# -- two GPUs (NCCL): the lead runs this on a two-GPU machine ------------------------------------

def _cuda_cases(rank: int, results: dict, dirs: dict) -> None:
    from diffgen.pipeline import load_pipeline

    for quantization in (None, "fp8"):
        pipe = load_pipeline(dirs["wan"], quantization=quantization, device="cuda", dtype="bf16",
                             parallel=ParallelConfig(num_gpus=SIZE, tp_size=SIZE))
        with torch.inference_mode():
            out = pipe(**CALL, generator=torch.Generator("cpu").manual_seed(0), return_dict=False)[0]
        results[str(quantization)] = torch.Tensor(out).float().cpu().clone()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL)")
def test_wan_tp_on_two_gpus_matches_one(dirs):
    """bf16 on two GPUs: row-parallel partial sums are rounded to bf16 before the all-reduce (a few
    bf16 ulp of latents ~4, through 2 steps: 0.1 absolute); FP8 within 1.5x of one GPU's FP8 error
    against 16-bit, plus that allowance."""
    from diffgen.pipeline import load_pipeline

    ranks = run_ranks(_cuda_cases, SIZE, dirs)
    one = {}
    for quantization in (None, "fp8"):
        pipe = load_pipeline(dirs["wan"], quantization=quantization, device="cuda", dtype="bf16")
        with torch.inference_mode():
            out = pipe(**CALL, generator=torch.Generator("cpu").manual_seed(0), return_dict=False)[0]
        one[str(quantization)] = torch.Tensor(out).float().cpu()
    for results in ranks:
        assert "error" not in results, results["error"]
        assert (results["None"] - one["None"]).abs().max().item() <= 0.1
        err_tp = (results["fp8"] - one["None"]).abs().max().item()
        err_one = (one["fp8"] - one["None"]).abs().max().item()
        assert err_tp <= 1.5 * err_one + 0.1, (err_tp, err_one)
