"""JAX's persistent compilation cache for the demo and the notebooks (not the library).

:func:`enable_compilation_cache` makes the three settings of ``docs/compile_cache.md``;
``gru_jax.demo`` re-exports it. It changes JAX's global configuration, so only programs call
it: nothing that ``import gru_jax`` imports may import this module. :class:`CompileClock`
times the demo's compiles and counts the programs loaded from the cache.

May import jax and the standard library.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import jax

__all__ = ["CompileClock", "default_compilation_cache_dir", "enable_compilation_cache"]


def default_compilation_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/gru_jax/jax_cache``, or ``~/.cache/gru_jax/jax_cache``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gru_jax" / "jax_cache"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Turns on JAX's persistent compilation cache in this process; returns its folder.

    XLA's compiled programs are written to the folder, and a later process that compiles the
    same program (same function, shapes, options, jax and jaxlib) loads it from there
    instead: a second run of the demo or a notebook skips XLA's compile. Tracing and lowering
    still run. These are the three settings of ``docs/compile_cache.md``, which a program of
    your own can make itself. They change JAX's global configuration: programs call this
    (the demo's ``main``, the notebooks), the library never does.

    Args:
      path: the cache folder, created if missing. ``None``: the folder JAX is already given
        (``JAX_COMPILATION_CACHE_DIR``), else :func:`default_compilation_cache_dir`.
    """
    if path is None:
        path = jax.config.jax_compilation_cache_dir or default_compilation_cache_dir()
    path = Path(path).expanduser().absolute()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Every program, not only those slower to compile than JAX's default threshold:
    # the demo's and the notebooks' programs are small, and together they are the wait.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


class CompileClock:
    """Wall seconds of the ``with`` blocks it times, and the XLA programs compiled in them
    (``requests``) and loaded from JAX's persistent compilation cache instead (``hits``)."""

    def __init__(self):
        self.seconds, self.requests, self.hits = 0.0, 0, 0

    def _count(self, event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/compile_requests_use_cache":
            self.requests += 1
        elif event == "/jax/compilation_cache/cache_hits":
            self.hits += 1

    def __enter__(self):
        jax.monitoring.register_event_listener(self._count)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds += time.perf_counter() - self._start
        jax.monitoring.unregister_event_listener(self._count)

    def report(self) -> str:
        """``compiled in N.N s`` and, with the cache on, how many programs came from it."""
        text = f"compiled in {self.seconds:.1f} s"
        cache = jax.config.jax_compilation_cache_dir
        if cache and jax.config.jax_enable_compilation_cache:
            text += f" ({self.hits} of {self.requests} programs loaded from the cache {cache})"
        return text
