"""Which implementation runs: Triton on CUDA, Triton's interpreter on CPU when TRITON_INTERPRET=1,
the torch reference otherwise.

TRITON_INTERPRET is read by triton when a kernel module is first imported (the @triton.jit
decorators run then), so the kernel modules are imported lazily, on the first kernel call, and
the environment variable must be set before that call (the tests set it at import time).
"""

from __future__ import annotations

import importlib
import os
import warnings

_BACKENDS = ("torch", "triton")
_backend = "torch"
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpret_requested() -> bool:
    """TRITON_INTERPRET as triton itself reads it."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def triton_runnable() -> tuple[bool, str]:
    """(can this process run the Triton kernels at all, why not)."""
    if not triton_installed():
        return False, "triton is not installed"
    if not (_cuda_available() or interpret_requested()):
        return False, "there is no CUDA GPU and TRITON_INTERPRET=1 is not set"
    return True, ""


def set_backend(name: str) -> None:
    """Select "triton" or "torch". Asking for triton where it cannot run warns once and keeps torch."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"kernels backend must be 'torch' or 'triton', not {name!r}")
    if name == "triton":
        ok, why = triton_runnable()
        if not ok:
            _warn_once(f"kernels: Triton backend unavailable ({why}); using the torch reference")
            name = "torch"
    _backend = name


def get_backend() -> str:
    """The backend in effect (after any fallback)."""
    return _backend


def module(name: str):
    """kernels.<name>, imported on first use (see the module docstring)."""
    return importlib.import_module(f"{__package__}.{name}")


def kernels_interpreted(mod) -> bool:
    """Whether mod's @triton.jit kernels were built for the interpreter."""
    kernel = next(v for k, v in vars(mod).items() if k.startswith("_") and k.endswith("_kernel"))
    return type(kernel).__name__ == "InterpretedFunction"


def use_triton(mod, tensor) -> bool:
    """Launch mod's Triton kernels on `tensor`? False means: use the torch reference."""
    if _backend != "triton":
        return False
    if kernels_interpreted(mod) or tensor.is_cuda:
        return True
    _warn_once(
        f"kernels: {mod.__name__} was imported without TRITON_INTERPRET=1, so its kernels cannot run on "
        "CPU tensors; using the torch reference (set TRITON_INTERPRET=1 before the first kernel call)"
    )
    return False
