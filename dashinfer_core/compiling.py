"""compile_or_eager: the one way this engine uses torch.compile.

A compiled function is a speed-up, never a requirement: where inductor fails (no C++ compiler, an op
it cannot lower, an ISA it gets wrong) the same function runs eagerly, or a caller-given fallback
does, for good, after one warning. Whether a compiled path is wanted at all is capabilities.py's
choice (probed once per machine); this wrapper only survives the failures a probe cannot foresee.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


class CompiledOrEager:
    def __init__(self, fn: Callable, name: str, fallback: Callable | None, enabled: Callable[[], bool] | bool,
                 compile_options: dict):
        self.fn = fn
        self.name = name
        self.fallback = fallback if fallback is not None else fn
        self._enabled = enabled
        self._compile_options = compile_options
        self._compiled: Callable | None = None
        self.failed = False

    @property
    def active(self) -> bool:
        """The compiled form is in use (wanted and not failed)."""
        if self.failed:
            return False
        if callable(self._enabled):  # asked once, at first use (capabilities are settled by then)
            self._enabled = bool(self._enabled())
        return self._enabled

    def __call__(self, *args, **kwargs):
        if self.active:
            try:
                if self._compiled is None:  # torch.compile is lazy: this costs nothing until the first call
                    self._compiled = torch.compile(self.fn, **self._compile_options)
                return self._compiled(*args, **kwargs)
            except Exception as exc:
                instead = self.fallback.name if isinstance(self.fallback, CompiledOrEager) else "eagerly"
                log.warning("%s: the compiled form failed (%s: %s); running %s from now on",
                            self.name, type(exc).__name__, (str(exc).splitlines() or [""])[0], instead)
                self.failed = True
        return self.fallback(*args, **kwargs)


# Inductor's Python wrapper checks each input's sizes and strides again (dynamo's guards checked them before the
# call), and each extern kernel's output twice: ~0.4 us a check, ~50 checks in a two-layer decode graph. Without
# them, the embedded model's GGUF batch-1 step, processes alternating 4 times on a 2-core AMD EPYC: 12.77, 13.95,
# 12.87, 12.74 -> 12.50, 12.25, 12.21, 12.00 ms (median step of each run). A wrong output layout would still
# fail the tests that compare the compiled layers and attention with their eager forms.
WITHOUT_WRAPPER_ASSERTS = {"size_asserts": False, "scalar_asserts": False}


def compile_or_eager(fn: Callable, *, name: str | None = None, fallback: Callable | None = None,
                     enabled: Callable[[], bool] | bool = True, **compile_options) -> CompiledOrEager:
    """`fn` under torch.compile(**compile_options), inductor's options merged over WITHOUT_WRAPPER_ASSERTS; on
    the first failure `fallback` (default: fn itself, eagerly) from then on. enabled: False (or a callable
    returning False, asked at the first call) runs the fallback without compiling. One wrapper per function for
    the whole process: dynamo caches by code object anyway."""
    compile_options["options"] = {**WITHOUT_WRAPPER_ASSERTS, **compile_options.get("options", {})}
    return CompiledOrEager(fn, name or getattr(fn, "__qualname__", "compiled function"), fallback, enabled,
                           compile_options)
