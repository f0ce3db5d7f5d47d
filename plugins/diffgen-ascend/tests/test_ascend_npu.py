"""The torch_npu adapters: argument preparation on the CPU against the reference, through a
stand-in torch_npu written from the op docs (fake_torch_npu); the real calls need an Ascend NPU.
And the rule that matters most on machines without CANN: nothing imports torch_npu unless the
device is an NPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fake_torch_npu
from diffgen.platform import Platform
from diffgen.quant import LayerSpec
from diffgen_ascend import methods, npu, schemes
from ascend_layers import layer_from, random_layer

SCHEMES = list(schemes.SCHEMES)
EXPECTED_OPS = {
    "W8A8": ["npu_quantize", "npu_quant_matmul"],
    "W8A8_DYNAMIC": ["npu_dynamic_quant", "npu_quant_matmul"],
    "W4A4_DYNAMIC": ["npu_convert_weight_to_int4pack", "npu_dynamic_quant", "npu_quant_matmul"],
    "W8A8_MXFP8": ["npu_dynamic_mx_quant", "npu_quant_matmul"],
    "W4A4_MXFP4": ["npu_dynamic_mx_quant", "npu_quant_matmul"],
    "W4A4_MXFP4_DUALSCALE": ["npu_dynamic_dual_level_mx_quant", "npu_dual_level_quant_matmul"],
}


@pytest.fixture
def fake_npu(monkeypatch):
    monkeypatch.setattr(npu, "torch_npu", lambda: fake_torch_npu.module)
    fake_torch_npu.calls.clear()
    return fake_torch_npu


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("smooth", [False, True])
def test_adapter_arguments_give_the_reference_result(scheme, smooth, fake_npu):
    """Same function on both sides (the stand-in computes the documented op in fp64), so the only
    differences are fp32 rounding of the products: 1e-5 relative."""
    k = 1024 if scheme == "W4A4_MXFP4_DUALSCALE" else 128
    t = random_layer(scheme, n=32, k=k)
    if smooth:
        t["mul_scale"] = torch.rand(k, generator=torch.Generator().manual_seed(1)) + 0.5
    x = torch.randn(2, 5, k, generator=torch.Generator().manual_seed(2)) * 3
    reference = layer_from(scheme, t, methods.MsmodelslimReferenceMethod, smooth=smooth)(x)
    adapter = layer_from(scheme, t, npu.NpuMethod, smooth=smooth)
    y = adapter(x)
    assert fake_npu.calls == EXPECTED_OPS[scheme]
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-4)


def test_fp16_models_pass_deq_scale_through_trans_quant_param(fake_npu):
    t = random_layer("W8A8", n=32, k=64)
    t["input_scale"] = torch.tensor([2.0 ** -5])  # its reciprocal is exact in fp16, as the op gets it
    layer = layer_from("W8A8", t, npu.NpuMethod, dtype=torch.float16)
    assert layer._deq.dtype == torch.int64 and layer.weight.shape == (64, 32)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3)).half()
    reference = layer_from("W8A8", t, methods.MsmodelslimReferenceMethod)(x.float())
    torch.testing.assert_close(layer(x).float(), reference, rtol=1e-3, atol=1e-3)  # fp16 output rounding


def test_paired_scales_pad_an_odd_block_count():
    scale = torch.arange(6, dtype=torch.uint8).reshape(2, 3)
    assert npu.paired_scales(scale).tolist() == [[[0, 1], [2, 0]], [[3, 4], [5, 0]]]


@pytest.mark.parametrize("name,generation", [("Ascend910B3", "A2"), ("Ascend910_9392", "A3"), ("Ascend950PR", "A5"),
                                             ("Ascend310P3", None)])
def test_generations(name, generation):
    assert npu.generation(name) == generation


def test_unavailable_reasons_by_generation():
    a2 = Platform("npu", "npu:0", "Ascend910B3")
    a5 = Platform("npu", "npu:0", "Ascend950PR")
    spec = LayerSpec("blocks.0.ffn", 256, 64, True, torch.bfloat16)
    assert npu.unavailable_reason("W8A8", spec, a2) is None
    assert "Ascend 950 (A5) only; this NPU is Ascend910B3" in npu.unavailable_reason("W8A8_MXFP8", spec, a2)
    assert npu.unavailable_reason("W8A8_MXFP8", spec, a5) is None
    assert "K divisible by 512" in npu.unavailable_reason("W4A4_MXFP4_DUALSCALE", spec, a5)
    cpu = Platform("cpu", "cpu", "x86")
    assert npu.unavailable_reason("W8A8", spec, cpu) == "torch_npu kernels run on an Ascend NPU; this device is cpu"


POISON = """
import pathlib, os
pathlib.Path(os.environ["POISON_MARK"]).write_text("imported")
raise ImportError("libhccl.so: cannot open shared object file (stand-in torch_npu)")
"""


def test_nothing_imports_torch_npu_off_the_npu(tmp_path):
    """A torch_npu that would break the process is installed (with the torch.backends entry point
    the real one has, and TORCH_DEVICE_BACKEND_AUTOLOAD=0, the documented way to keep torch itself
    from loading it): importing the plugin and `diffgen plugins` never import it."""
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text(POISON)
    dist = tmp_path / "torch_npu-2.13.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.13.0\n")
    (dist / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    mark = tmp_path / "imported"
    script = textwrap.dedent("""
        import sys, json
        import diffgen_ascend, diffgen_ascend.plugin, diffgen_ascend.npu, diffgen_ascend.repack_wan
        from diffgen.cli import main
        assert main(["plugins"]) == 0
        assert main(["plugins", "--json"]) == 0
        assert "torch_npu" not in sys.modules
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]), "POISON_MARK": str(mark),
           "DIFFGEN_PLUGINS": "ascend", "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not mark.exists()
    assert "torch_npu (installed, not imported) is used only with --device npu" in result.stdout
    assert "FAILED" not in result.stdout


def test_on_an_npu_the_platform_check_imports_torch_npu_and_says_why_not(monkeypatch):
    from diffgen.platform import LibraryStatus
    from diffgen_ascend.plugin import check_platform

    platform = Platform("npu", "npu:0", "Ascend910B3")
    monkeypatch.setattr(Platform, "library", lambda self, name: LibraryStatus(
        name, False, "ImportError: libhccl.so: cannot open shared object file"))
    kernels = {k.name: k for k in check_platform(platform).kernels}
    npu_int = kernels["msmodelslim-npu int8/int4 (torch_npu, A2/A3/A5)"]
    assert not npu_int.available and npu_int.reason == "torch_npu not importable: ImportError: libhccl.so: cannot open shared object file"
    monkeypatch.setattr(Platform, "library", lambda self, name: LibraryStatus(name, True, "2.13.0"))
    kernels = {k.name: k for k in check_platform(platform).kernels}
    assert kernels["msmodelslim-npu int8/int4 (torch_npu, A2/A3/A5)"].available
    mx = kernels["msmodelslim-npu MXFP8/MXFP4/dual-scale (torch_npu, A5)"]
    assert not mx.available and mx.reason == "Ascend 950 (A5) only; this NPU is Ascend910B3"


@pytest.mark.npu
@pytest.mark.skip(reason="needs an Ascend NPU with CANN and torch_npu; none is available to diffgen's tests")
def test_real_torch_npu_matches_the_reference():
    """On an Ascend host: the adapter with the real torch_npu, against the reference, per scheme
    its generation supports (A2/A3: integer schemes; A5: all)."""
