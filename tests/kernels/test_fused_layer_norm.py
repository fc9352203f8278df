"""Fused (multi-)LayerNorm under the Triton interpreter vs a float64 torch reference, plus the
backend switch. Allocations are poisoned with NaN so that any element a kernel fails to write fails."""

import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before kernels/triton build any kernel (see kernels/dispatch.py)

import pytest
import torch

from rsscale import kernels
from rsscale.kernels import dispatch
from rsscale.kernels import fused_layer_norm as fln
from rsscale.kernels.testing import TOLERANCE, check_layer_norm, nan_poisoned_allocations


def _assert_ok(errors, dtype):
    bad = {name: err for name, err in errors.items() if not err < TOLERANCE[dtype]}
    assert not bad, f"errors above {TOLERANCE[dtype]} for {dtype}: {bad}"


@pytest.mark.parametrize(
    "shape,k",
    [((4, 7, 40), 1), ((13, 100), 3), ((9, 64), 4), ((3, 8192), 1), ((2, 3, 6000), 2)],
)
def test_multi_layer_norm_fp32(shape, k):
    with nan_poisoned_allocations():
        errors = check_layer_norm(shape, k, torch.float32, seed=k)
    assert set(errors) == {"out", "dx", "dweight", "dbias"}
    _assert_ok(errors, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_multi_layer_norm_half(dtype):
    with nan_poisoned_allocations():
        _assert_ok(check_layer_norm((11, 72), 2, dtype), dtype)


def test_single_layer_norm():
    with nan_poisoned_allocations():
        _assert_ok(check_layer_norm((5, 3, 48), 1, multi=False), torch.float32)


def test_bad_weights_shape():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weights/biases"):
        fln.triton_multi_layer_norm(x, torch.ones(2, 7), torch.zeros(2, 7))


def test_backend_switch_uses_triton_under_interpreter(monkeypatch):
    calls = []
    monkeypatch.setattr(fln, "triton_multi_layer_norm", lambda *a: calls.append(1) or fln.torch_multi_layer_norm(*a))
    x, w, b = torch.randn(3, 16), torch.randn(2, 16), torch.randn(2, 16)
    try:
        kernels.set_backend("triton")
        assert kernels.get_backend() == "triton"
        kernels.multi_layer_norm(x, w, b)
        kernels.set_backend("torch")
        kernels.multi_layer_norm(x, w, b)
    finally:
        kernels.set_backend("torch")
    assert calls == [1]


def test_public_layer_norm_matches_torch_under_triton_backend():
    x, w, b = torch.randn(4, 5, 24), torch.randn(24), torch.randn(24)
    try:
        kernels.set_backend("triton")
        got = kernels.layer_norm(x, w, b, 1e-6)
    finally:
        kernels.set_backend("torch")
    torch.testing.assert_close(got, torch.nn.functional.layer_norm(x, (24,), w, b, 1e-6), atol=1e-5, rtol=1e-5)


def test_triton_backend_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(dispatch, "interpret_requested", lambda: False)
    monkeypatch.setattr(dispatch, "_cuda_available", lambda: False)
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="Triton backend unavailable"):
        kernels.set_backend("triton")
    assert kernels.get_backend() == "torch"
    with pytest.raises(ValueError, match="must be 'torch' or 'triton'"):
        kernels.set_backend("cuda")


def test_cpu_tensors_with_compiled_kernels_fall_back_to_torch(monkeypatch):
    """Kernels imported before TRITON_INTERPRET=1 cannot run on CPU: warn, use the reference."""
    monkeypatch.setattr(dispatch, "kernels_interpreted", lambda mod: False)
    monkeypatch.setattr(dispatch, "_warned", set())
    x, w, b = torch.randn(3, 16), torch.randn(16), torch.randn(16)
    try:
        kernels.set_backend("triton")
        with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET"):
            got = kernels.layer_norm(x, w, b)
    finally:
        kernels.set_backend("torch")
    torch.testing.assert_close(got, fln.torch_layer_norm(x, w, b))


def test_kernels_import_and_run_without_triton():
    code = (
        "import sys, warnings; sys.modules['triton'] = None\n"
        "import torch\nfrom rsscale import kernels\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always'); kernels.set_backend('triton')\n"
        "assert kernels.get_backend() == 'torch' and 'not installed' in str(caught[0].message)\n"
        "x = torch.randn(2, 3, 8)\n"
        "y = kernels.multi_layer_norm(x, torch.ones(2, 8), torch.zeros(2, 8))\n"
        "q = torch.randn(1, 2, 5, 8)\n"
        "print(tuple(y.shape), tuple(kernels.attention(q, q, q).shape))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["(2,", "2,", "3,", "8)", "(1,", "2,", "5,", "8)"]
