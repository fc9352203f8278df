"""Stand-ins that let the kernel modules import without triton installed: their @triton.jit
functions become plain (never launched) Python functions and only the torch references are used."""

import types


def _jit(fn=None, **_options):
    return fn if fn is not None else (lambda f: f)


triton = types.SimpleNamespace(jit=_jit)
tl = types.SimpleNamespace(constexpr=None)
