"""``diffgen generate --num-gpus 2 --device cpu``: the CLI starts its own gloo workers (torch's
elastic launcher, as torchrun does), only rank 0 writes and speaks, and an error on any rank
reaches the user as one line. The numbers of a split run are compared in test_parallel.py."""

from __future__ import annotations

import json

import pytest

from diffgen.cli import main
from diffgen.parallel import Group, ParallelConfig, ParallelError
from diffgen.parallel.context import enable_context_parallel
from diffgen.tiny.pipelines import build_tiny_pipeline

ARGS = ["--prompt", "a red cube", "--device", "cpu", "--height", "32", "--width", "32", "--num-inference-steps", "2"]


@pytest.fixture(scope="module")
def flux1_dir(tmp_path_factory):
    return build_tiny_pipeline("flux1", tmp_path_factory.mktemp("flux1"), seed=0)


def test_num_gpus_starts_workers_and_only_rank_0_writes(flux1_dir, tmp_path, capfd):
    out = tmp_path / "out"
    status = main(["generate", "--model-path", str(flux1_dir), *ARGS, "--num-gpus", "2", "--ulysses-degree", "2",
                   "--output-path", str(out), "--perf-json", str(out / "perf.json")])
    err = capfd.readouterr().err
    assert status == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a_red_cube_seed0.png", "perf.json"]
    perf = json.loads((out / "perf.json").read_text())
    assert perf["parallel"] == {"num_gpus": 2, "sp_degree": 2, "ulysses_degree": 2, "ring_degree": 1,
                                "cfg_parallel_size": 1, "tp_size": 1}
    # one rank speaks: each stage line once, not once per process
    assert err.count("diffgen: wrote") == 2, err
    assert err.count("denoising: step 2/2") == 1, err
    assert "Traceback" not in err


def test_an_error_in_the_workers_is_one_line(tmp_path, capfd):
    import signal

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    status = main(["generate", "--model-path", str(tmp_path / "missing"), *ARGS, "--num-gpus", "2"])
    # the launcher gives the caller its signal handlers back (torch's elastic agent replaces them)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    err = capfd.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("diffgen: error: ") and "has no model_index.json" in err[0], err


def test_degrees_that_do_not_fit_are_refused_before_any_worker_starts(tmp_path, capfd):
    status = main(["generate", "--model-path", str(tmp_path / "missing"), *ARGS, "--num-gpus", "2",
                   "--ulysses-degree", "2", "--ring-degree", "2"])
    err = capfd.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == ["diffgen: error: the degrees use 4 processes (sp 4 x cfg 1 x tp 1) but --num-gpus is 2; they "
                   "must multiply to it"]


def test_ring_needs_an_attention_backend_with_log_sum_exp():
    from diffgen.tiny.transformers import tiny_transformer

    model = tiny_transformer("flux1")  # diffusers' default backend: native SDPA, which returns no LSE
    group = Group(ParallelConfig(num_gpus=2, ring_degree=2).resolved(), rank=0, local_rank=0, mesh=None)
    with pytest.raises(ParallelError, match="--ring-degree 2 needs an attention backend.*uses 'native' on the CPU"):
        enable_context_parallel(model, group)


@pytest.mark.parametrize("command", ["compare", "bench"])
def test_compare_and_bench_take_the_same_degrees(command, tmp_path):
    """Both sides of compare and bench load with the run's degrees (each side split the same way)."""
    import importlib

    from diffgen.cli.common import Parser
    from diffgen.cli.sides import side_pipeline

    module = importlib.import_module(f"diffgen.cli.{command}")
    parser = Parser(prog=f"diffgen {command}")
    module.add_arguments(parser)
    args = parser.parse_args(["--model-path", str(tmp_path), "--prompt", "x", "--num-gpus", "4", "--ring-degree", "2",
                              "--cfg-parallel-size", "2"])
    for side in module.SIDES:
        config = side_pipeline(args, side, {side: ({}, {}) for side in module.SIDES})
        assert config.parallel == ParallelConfig(4, 2, 1, 2, 2, 1)


@pytest.mark.parametrize("family,size,frames", [("flux1", (32, 48), None), ("wan", (32, 64), 9)])
def test_image_tokens_from_the_configs_match_what_the_transformer_sees(family, size, frames, tmp_path):
    """The pre-load count (diffgen.parallel.sequence) against the sequence the first block really gets."""
    import torch

    from diffgen.parallel.sequence import image_tokens
    from diffgen.pipeline import load_pipeline

    path = build_tiny_pipeline(family, tmp_path / family, seed=0)
    pipe = load_pipeline(path, device="cpu", dtype="fp32")
    model = pipe.transformer
    block = model.transformer_blocks[0] if family == "flux1" else model.blocks[0]
    seen = []
    block.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("hidden_states", args[0] if args
                                                                                    else None).shape[1]),
                                    with_kwargs=True)
    height, width = size
    extra = {"num_frames": frames} if frames else {}
    with torch.inference_mode():
        pipe(prompt="x", height=height, width=width, num_inference_steps=1, output_type="latent", **extra)
    assert image_tokens(path, height, width, frames) == seen[0]


def test_a_sequence_degree_that_does_not_divide_the_image_is_refused_before_loading(flux1_dir):
    from diffgen.parallel import sequence

    with pytest.raises(ParallelError, match="--sp-degree 2 does not divide the 9 tokens of the image at 12x12"):
        sequence.check_image_tokens(ParallelConfig(num_gpus=2), flux1_dir, 12, 12, None)
