"""diffgen.finite: the loader's NaN/inf checks, on the CPU (a worker thread, a layer waits for its
checks) and on a device (flags kept on the device, read once at the end or on a failure)."""

import pytest
import torch

from diffgen.errors import LoadError
from diffgen.finite import FiniteChecks, all_finite, nonfinite

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf")])
def test_nonfinite_agrees_with_isfinite_of_the_widened_values(dtype, bad):
    t = torch.linspace(-3, 3, 64)
    if bad is not None:
        t[17] = bad
    t = t.to(dtype)
    want = not bool(torch.isfinite(t.float()).all())  # e4m3fn turns inf into NaN: still not finite
    assert bool(nonfinite(t)) == want and all_finite(t) == (not want)


def test_integers_and_empty_tensors_have_no_flag():
    assert nonfinite(torch.arange(4)) is None and nonfinite(torch.empty(0)) is None
    assert all_finite(torch.arange(4))


def _bad():
    return torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)


def test_on_the_cpu_a_layer_waits_for_its_checks():
    checks = FiniteChecks(True, "cpu")
    try:
        checks.submit("a.weight", torch.ones(3), "s1.safetensors")
        checks.submit("b.weight", _bad(), "s2.safetensors")
        with pytest.raises(LoadError, match=r"'b.weight' in s2.safetensors holds NaN"):
            checks.before_processing()
    finally:
        checks.close()


def test_on_a_device_the_flags_are_read_once_at_the_end(monkeypatch):
    checks = FiniteChecks(True, "cpu")
    checks.on_device = True  # the device path's logic, with CPU tensors standing in for device ones
    checks.submit("a.weight", torch.ones(3), "s1.safetensors")
    checks.submit("b.weight", _bad(), "s2.safetensors")
    checks.submit("c.weight", torch.tensor([0x7F], dtype=torch.uint8).view(torch.float8_e4m3fn), "s3.safetensors")
    checks.before_processing()  # no read-back per layer
    with pytest.raises(LoadError, match=r"'b.weight' in s2.safetensors"):  # the first bad one
        checks.finish()


def test_disabled_checks_check_nothing():
    checks = FiniteChecks(False, "cpu")
    checks.submit("b.weight", _bad(), "s.safetensors")
    checks.before_processing()
    checks.finish()
    checks.close()
