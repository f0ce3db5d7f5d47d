"""Per-rank reads (``diffgen.parallel.tp_load``): a tensor-parallel load reads only the rank's
slices of the planned linears and leaves the same model as loading everything and then splitting
(``tp_runtime.shard_model``). One process plays each rank in turn; the row-parallel all-reduce is
not run here (test_parallel_tp.py runs whole TP pipelines, which load this way, on gloo).

Exactness: a slice read from the file holds the same bytes as the slice cut from the whole tensor,
and converting dtype after slicing converts the same elements, so checkpoint tensors compare with
``torch.equal``. What a method derives after loading from a row-parallel slice is computed over the
rank's K columns instead of the whole row: online FP8 per-channel quantizes each rank's columns
with their own row scale (no larger than the whole row's), which is checked against FP8's own
rounding bound instead.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from diffgen.linear import QuantLinear, ShardError
from diffgen.loader import load_transformer
from diffgen.parallel.tensor import style_of, tp_plan
from diffgen.parallel.tp_runtime import shard_model

SIZE = 2
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from diffgen.tiny.transformers import save_tiny_transformer
    from tests.test_fp8 import write_fp8_checkpoint

    base = tmp_path_factory.mktemp("tpload")
    bf16 = save_tiny_transformer("flux1", base / "bf16", seed=0, dtype=torch.bfloat16)
    return {"16bit": bf16, "online-fp8": bf16,
            "fp8-per-channel": write_fp8_checkpoint(bf16, base / "fp8", "per-channel", "static")}


def _load(path, case, tp=None, **kw):
    return load_transformer(path, device="cpu", dtype=torch.float32, rewrites=False, tensor_parallel=tp,
                            quantization="fp8" if case == "online-fp8" else None, **kw)


def _state(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("case", ["16bit", "fp8-per-channel", "online-fp8"])
def test_split_load_is_the_split_of_the_whole_load(paths, case):
    for rank in range(SIZE):
        split = _load(paths[case], case, (rank, SIZE))
        assert split.diffgen_tp_load["mapped"] and split.diffgen_tp_load["rank"] == rank
        shard_model(split, rank, SIZE, None)  # finds it split: adds the reductions and divides the heads
        whole = _load(paths[case], case)
        shard_model(whole, rank, SIZE, None)
        got, want = _state(split), _state(whole)
        assert got.keys() == want.keys()
        plan = tp_plan(whole)
        for name, tensor in want.items():
            owner, _, leaf = name.rpartition(".")
            module = whole.get_submodule(owner)
            if case == "online-fp8" and style_of(plan, owner) == "rowwise" and leaf in ("weight", "weight_scale"):
                continue  # checked against the 16-bit slice below
            assert got[name].shape == tensor.shape and got[name].dtype == tensor.dtype, name
            assert torch.equal(got[name], tensor), name
            if isinstance(module, (torch.nn.Linear, QuantLinear)):
                got_module = split.get_submodule(owner)
                assert (got_module.in_features, got_module.out_features) == (module.in_features, module.out_features)
                if isinstance(module, QuantLinear):
                    assert got_module.method.layer == module.method.layer
        assert [m.heads for m in split.modules() if hasattr(m, "to_q")] == \
            [m.heads for m in whole.modules() if hasattr(m, "to_q")]
        if case == "online-fp8":
            _check_online_rowwise(split, whole, paths[case], rank)


def _check_online_rowwise(split, whole, path, rank):
    """Each row-parallel layer quantized its own K columns per output row: every element within
    FP8 E4M3's rounding of the 16-bit value (half a step: 2^-4 relative for normals, 2^-10 of
    the row scale for subnormals), with a row scale no larger than the whole row's."""
    plan = tp_plan(whole)
    checked = 0
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        for name, module in split.named_modules():
            if style_of(plan, name) != "rowwise" or not isinstance(module, QuantLinear):
                continue
            k = module.in_features
            w16 = f.get_tensor(f"{name}.weight").float()
            # FLUX.1's single-block proj_out reads cat([attention, MLP]): its columns are two runs
            runs = [32, 128] if w16.shape[1] == 160 else [w16.shape[1]]
            cols = torch.cat([torch.arange(start + rank * r // SIZE, start + (rank + 1) * r // SIZE)
                              for start, r in zip([0, *runs[:-1]], runs)])
            w16 = w16[:, cols]
            assert w16.shape[1] == k
            scale = module.weight_scale.float().reshape(-1, 1)
            assert (scale <= whole.get_submodule(name).weight_scale.float().reshape(-1, 1)).all()
            dequantized = module.weight.float() * scale
            bound = w16.abs() / 16 + scale * 2.0 ** -10
            assert ((dequantized - w16).abs() <= bound).all(), name
            checked += 1
    assert checked == 5  # to_out.0, to_add_out, ff.net.2, ff_context.net.2, the single block's proj_out


def test_split_load_reads_only_the_rank_bytes(paths):
    """The bytes the load copied out of the checkpoint are, per tensor, the rank's part of a split
    tensor and the whole of any other (counted here from the checkpoint's header and the loaded
    model's shapes); a planned linear's share is halved."""
    path = paths["fp8-per-channel"]
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        stored = {name: f.get_slice(name) for name in f.keys()}
        itemsize = {name: f.get_tensor(name).element_size() for name in f.keys()}
        total = sum(f.get_tensor(name).numel() * itemsize[name] for name in f.keys())
    for rank in range(SIZE):
        model = _load(path, "fp8-per-channel", (rank, SIZE))
        state = model.state_dict()
        expected = sum(state[name].numel() * itemsize[name] for name in stored)
        assert model.diffgen_tp_load["bytes_read"] == expected
        # at least half of every planned linear's weight stayed unread
        planned = sum(stored[n].get_shape()[0] * stored[n].get_shape()[1] * itemsize[n] for n in stored
                      if n.endswith(".weight") and len(stored[n].get_shape()) == 2
                      and style_of(tp_plan(model), n.rpartition(".")[0]))
        assert total - expected >= planned // 2 > 0.1 * total


def test_a_pickle_checkpoint_is_read_whole_then_split(paths, tmp_path):
    from diffgen.tiny.transformers import tiny_transformer

    tiny_transformer("flux1", seed=0, dtype=torch.bfloat16).save_pretrained(tmp_path / "bin", safe_serialization=False)
    split = _load(tmp_path / "bin", "16bit", (1, SIZE), allow_pickle=True)
    whole = _load(paths["16bit"], "16bit", (1, SIZE))
    assert not split.diffgen_tp_load["mapped"]
    for name, tensor in _state(whole).items():
        assert torch.equal(_state(split)[name], tensor), name


def test_a_layer_that_cannot_split_stops_the_load_before_reading(paths, monkeypatch):
    from diffgen.parallel import tp_load

    def no_reads(self, source):
        raise AssertionError("read the checkpoint")

    monkeypatch.setattr(tp_load.SplitLoad, "stream", no_reads)
    with pytest.raises(ShardError, match=r"transformer_blocks\.0\.attn\.to_q.* of size 32 does not split into 3"):
        _load(paths["fp8-per-channel"], "fp8-per-channel", (0, 3))
    with pytest.raises(ShardError, match="--tp-size 4 does not divide the 2 attention heads"):
        _load(paths["16bit"], "16bit", (0, 4))  # every linear would split in 4; the heads do not
