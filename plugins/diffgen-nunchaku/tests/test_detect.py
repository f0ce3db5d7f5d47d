"""Detection from file names, metadata (with no quant_method), tensors and flags; both naming
conventions; what a contradiction says."""

import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffgen.errors import DiffgenError
from diffgen.linear import QuantLinear
from diffgen.loader import load_transformer
import svdq_writer as W
from svdq_families import RANK


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _load(pipe, weights, **kw):
    return load_transformer(pipe / "transformer", weights_path=weights, device="cpu", dtype="fp32", **kw)


def _assert_matches(model, records, precision="int4"):
    gen = torch.Generator().manual_seed(2)
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            rec, x = records[name], torch.randn(3, layer.in_features, generator=gen)
            if rec.zeros is not None:
                w, b = W.dense_weight(rec, precision)
                expected = x.double() @ w.t() + b
            else:
                expected = W.quantized_forward(rec, precision, x)
            assert (layer(x).double() - expected).abs().max() / expected.abs().max() < 1e-4, name


def test_metadata_without_quant_method_and_a_plain_file_name(checkpoint, tmp_path):
    pipe, path, _, records = checkpoint("flux1")
    renamed = tmp_path / "transformer-4bit.safetensors"
    shutil.copy(path, renamed)
    model = _load(pipe, renamed)
    claim = model.diffgen_plan.claim
    assert claim.plugin == "nunchaku" and claim.specificity == 30
    assert "quantization_config method=svdquant" in claim.evidence and "file name" not in claim.evidence
    _assert_matches(model, records)


def test_directory_and_tensors_alone(checkpoint, tmp_path):
    pipe, path, _, records = checkpoint("flux1")
    tensors, _ = _read(path)
    folder = tmp_path / "weights"
    folder.mkdir()
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))  # no metadata, no telling name
    model = _load(pipe, folder)
    assert model.diffgen_plan.claim.specificity == 25
    assert "17 SVDQ W4A4 and 3 AWQ W4A16" in model.diffgen_plan.claim.evidence
    _assert_matches(model, records)
    named = tmp_path / "named"
    named.mkdir()
    shutil.copy(path, named / path.name)
    assert "file name svdq-int4_r16" in _load(pipe, named).diffgen_plan.claim.evidence


# (A) -> (B): nunchaku's convert_flux_state_dict table (shared/reference/nunchaku.md 2.2)
V2_NAMES = [(r"(single_transformer_blocks\.\d+)\.qkv_proj\.", r"\1.attn.to_qkv."),
            (r"(single_transformer_blocks\.\d+)\.out_proj\.", r"\1.attn.to_out."),
            (r"(transformer_blocks\.\d+)\.qkv_proj_context\.", r"\1.attn.add_qkv_proj."),
            (r"^(transformer_blocks\.\d+)\.qkv_proj\.", r"\1.attn.to_qkv."),
            (r"^(transformer_blocks\.\d+)\.out_proj_context\.", r"\1.attn.to_add_out."),
            (r"^(transformer_blocks\.\d+)\.out_proj\.", r"\1.attn.to_out.0."),
            (r"^(transformer_blocks\.\d+)\.mlp_context_fc1\.", r"\1.ff_context.net.0.proj."),
            (r"^(transformer_blocks\.\d+)\.mlp_context_fc2\.", r"\1.ff_context.net.2."),
            (r"^(transformer_blocks\.\d+)\.mlp_fc1\.", r"\1.ff.net.0.proj."),
            (r"^(transformer_blocks\.\d+)\.mlp_fc2\.", r"\1.ff.net.2."),
            (r"\.(norm_q|norm_k|norm_added_q|norm_added_k)\.", r".attn.\1."),
            (r"\.lora_down$", ".proj_down"), (r"\.lora_up$", ".proj_up"),
            (r"\.smooth_orig$", ".smooth_factor_orig"), (r"\.smooth$", ".smooth_factor")]


def test_flux_v2_python_names_and_padded_awq_groups(checkpoint, tmp_path):
    pipe, path, _, records = checkpoint("flux1")
    tensors, metadata = _read(path)
    renamed = {}
    for name, t in tensors.items():
        for pattern, repl in V2_NAMES:
            name = re.sub(pattern, repl, name)
        if re.search(r"\.norm1?(_context)?\.linear\.(wscales|wzeros)$", name):  # AWQ: deepcompressor pads
            t = torch.cat([t, torch.zeros(16 - t.shape[0], t.shape[1], dtype=t.dtype)])  # groups to 16
        renamed[name] = t
    assert "single_transformer_blocks.0.attn.to_out.qweight" in renamed
    out = tmp_path / "svdq-int4_r16-v2.safetensors"
    save_file(renamed, str(out), metadata=metadata)
    _assert_matches(_load(pipe, out), records)


def _error(pipe, weights, **kw) -> str:
    with pytest.raises(DiffgenError) as exc:
        _load(pipe, weights, **kw)
    return str(exc.value)


def test_contradictions_are_errors(checkpoint, tmp_path):
    pipe, path, _, _ = checkpoint("flux1")
    assert "ranks disagree" in _error(pipe, path, quantization_rank=RANK * 2)
    assert "a flag contradicts the checkpoint" in _error(pipe, path, quantization_precision="fp4")
    assert "exclude each other" in _error(pipe, path, quantization="fp8", enable_svdquant=True)
    tensors, metadata = _read(path)
    wrong = tmp_path / f"svdq-int4_r{RANK * 4}-tiny.safetensors"  # the file name says another rank
    save_file(tensors, str(wrong), metadata=metadata)
    assert re.search(r"ranks disagree: file name 64, metadata 16, tensors 16", _error(pipe, wrong))
    # a 16-bit file under an SVDQuant name, and --enable-svdquant on a 16-bit checkpoint
    plain = tmp_path / "svdq-int4_r32-fake.safetensors"
    save_file(_read(pipe / "transformer" / "diffusion_pytorch_model.safetensors")[0], str(plain))
    assert "holds no SVDQuant tensors" in _error(pipe, plain)
    assert "--enable-svdquant says SVDQuant" in _error(pipe, pipe / "transformer", enable_svdquant=True)


def test_metadata_for_another_model_is_refused(checkpoint, tmp_path):
    pipe, path, _, _ = checkpoint("flux1")
    tensors, metadata = _read(path)
    metadata["config"] = metadata["config"].replace("FluxTransformer2DModel", "QwenImageTransformer2DModel")
    other = tmp_path / "svdq-int4_r16-other.safetensors"
    save_file(tensors, str(other), metadata=metadata)
    assert "metadata config is for QwenImageTransformer2DModel" in _error(pipe, other)


def test_nvfp4_without_wcscales_and_wtscale_gets_nunchakus_defaults(checkpoint, tmp_path):
    """nunchaku's Python loaders fill a missing wcscales with ones and wtscale with 1.0."""
    pipe, path, _, records = checkpoint("flux1", "nvfp4")
    tensors, metadata = _read(path)
    layer = "transformer_blocks.0.attn.to_out.0"
    assert torch.equal(tensors["transformer_blocks.0.out_proj.wcscales"].float(), torch.ones(128))
    wtscale = float(tensors.pop("transformer_blocks.0.out_proj.wtscale"))
    del tensors["transformer_blocks.0.out_proj.wcscales"]
    tensors["transformer_blocks.0.out_proj.wscales"] = (  # fold the per-tensor scale into the E4M3 scales
        tensors["transformer_blocks.0.out_proj.wscales"].float() * wtscale).to(torch.float8_e4m3fn)
    out = tmp_path / "svdq-fp4_r16-defaults.safetensors"
    save_file(tensors, str(out), metadata=metadata)
    model = _load(pipe, out)
    loaded = model.get_submodule(layer)
    assert torch.equal(loaded.wtscale, torch.ones(1)) and torch.equal(loaded.wcscales, torch.ones(1, 128))
    other = "transformer_blocks.0.attn.to_q"  # untouched layers keep their own
    assert not torch.equal(model.get_submodule(other).wtscale, torch.ones(1))
    assert records[layer].codes.shape == (128, 128)


def test_other_formats_pass_through_the_layout_untouched(tmp_path, monkeypatch):
    """diffgen-nunchaku's layout stream sees every checkpoint of the families it knows, other
    formats' 0-d per-tensor scales included: a builtin fp8 checkpoint loads as it does without it."""
    import diffgen
    from diffgen.plugins import reset_plugins
    from diffgen.tiny.transformers import save_tiny_transformer

    src = save_tiny_transformer("flux1", tmp_path / "bf16", seed=0)
    diffgen.quantize(src, tmp_path / "fp8", scheme="per-tensor")
    states = {}
    for plugins in ("nunchaku", ""):
        monkeypatch.setenv("DIFFGEN_PLUGINS", plugins)
        reset_plugins()
        model = diffgen.load_transformer(tmp_path / "fp8", device="cpu")
        states[plugins] = model.state_dict()
    reset_plugins()
    assert states["nunchaku"].keys() == states[""].keys()
    assert all(torch.equal(states["nunchaku"][k], states[""][k]) for k in states[""])
