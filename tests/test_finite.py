"""diffgen.finite: the loader's NaN/inf checks, on the CPU (a worker thread, a layer waits for its
checks) and on a device (flags kept on the device, read once at the end or on a failure)."""

import pytest
import torch

from diffgen.errors import LoadError
from diffgen.finite import FiniteChecks, all_finite, check_later, nonfinite

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


def _refuse_with(message):
    def refuse():
        raise LoadError(message)
    return refuse


def test_check_later_refuses_at_once_outside_a_deferring_load():
    with pytest.raises(LoadError, match="scale 0"):
        check_later(torch.tensor(True), _refuse_with("scale 0"))
    check_later(torch.tensor(False), _refuse_with("never"))


def test_a_deferring_load_raises_the_methods_refusals_at_the_end_with_the_file():
    checks = FiniteChecks(False, "cpu")  # weight checks off: the methods' own checks still run
    checks.on_device = True
    with checks.deferring():
        checks.where = "shard-1.safetensors"
        check_later(torch.tensor(False), _refuse_with("fine"))
        checks.where = "shard-2.safetensors"
        check_later(torch.tensor(True), _refuse_with("tensor x.weight_scale holds nan"))  # deferred, no raise
    with pytest.raises(LoadError, match=r"x.weight_scale holds nan \(shard-2.safetensors\)"):
        checks.finish()


def test_a_nan_weight_is_named_before_a_methods_refusal():
    checks = FiniteChecks(True, "cpu")
    checks.on_device = True
    with checks.deferring():
        checks.submit("x.weight", _bad(), "shard-1.safetensors")
        check_later(torch.tensor(True), _refuse_with("tensor x.weight_scale holds 0"))
    with pytest.raises(LoadError, match=r"'x.weight' in shard-1.safetensors holds NaN"):
        checks.finish()


def test_on_the_cpu_nothing_is_deferred():
    checks = FiniteChecks(True, "cpu")
    with checks.deferring(), pytest.raises(LoadError, match="at once"):
        check_later(torch.tensor(True), _refuse_with("at once"))
    checks.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_readers_integer_check_agrees_with_isfinite(dtype):
    """all_finite_cpu sums, then tests the exponent bits when the sum is not finite; torch.isfinite
    is the independent verdict. Every special value at both signs, the extremes of the finite range,
    subnormals, and finite values whose sum overflows."""
    from diffgen.finite import all_finite_cpu

    info = torch.finfo(dtype)
    finite = torch.tensor([info.max, -info.max, info.tiny, -info.tiny, info.tiny / 4, 0.0, -0.0, 1.5],
                          dtype=torch.float64).to(dtype)
    assert all_finite_cpu(finite) and bool(torch.isfinite(finite).all())
    for special in (float("nan"), -float("nan"), float("inf"), float("-inf")):
        for at in (0, 3, 7):
            x = finite.clone()
            x[at] = special
            assert not all_finite_cpu(x) and not bool(torch.isfinite(x).all())
    overflowing = torch.full((64,), info.max / 2, dtype=torch.float64).to(dtype)
    assert not bool(torch.isfinite(overflowing.sum())) and all_finite_cpu(overflowing)
    overflowing[5] = float("nan")
    assert not all_finite_cpu(overflowing)
    # a later, smaller call reuses this thread's buffer; a strided view takes the plain check
    assert all_finite_cpu(finite[:3]) and not all_finite_cpu(torch.tensor([1.0, float("inf")]).to(dtype)[::1])
    assert not all_finite_cpu(torch.tensor([[1.0, 2.0], [float("nan"), 3.0]]).to(dtype).t())
