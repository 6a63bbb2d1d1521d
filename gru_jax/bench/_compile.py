"""Compile time side by side: gru_jax and the JAX peers, and the cold start of a process.

What a user waits for before the first result: JAX traces the function to a jaxpr, lowers it
to StableHLO, and XLA compiles it. :func:`compare_compile` measures those three phases of each
implementation's forward and training step as JAX itself reports them (the
``jax.monitoring`` time spans of its trace, lowering and backend-compile events), each call
after ``jax.clear_caches()``: nothing an earlier call traced, lowered or compiled is reused,
and JAX's persistent compilation cache is off meanwhile (:func:`no_persistent_cache`).
:func:`cold_starts` runs a fresh process per implementation, from its imports to its first
gradient, twice on one persistent cache folder: the first process fills it, the second loads
from it. torch is in neither: it runs eagerly and has no compile step.

May import jax, the bench's peers and cases, and the standard library.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence

import jax
from jax.experimental.compilation_cache import compilation_cache

from gru_jax.bench import _harness, _peers
from gru_jax.bench._peers import Case, Config, Impl, Unavailable

OURS = "gru_jax"
# JAX's events of the three phases of a compile, and of a persistent-cache hit.
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
# The peers built on JAX, which compile; torch (eager) has nothing to compare.
COMPILED_PEERS = ("flax", "keras", "pallas")
WHICH = ("forward", "train")
NO_COMPILE_NOTE = "torch is not in these tables: it runs eagerly, with no compile step."


@dataclasses.dataclass
class CompileRow:
    """Median trace + lower + compile seconds of one implementation's first calls."""

    config: Config
    impl: str
    forward: float | None
    train: float | None


@dataclasses.dataclass
class ColdStart:
    """Seconds of a fresh process from its imports to its first gradient, run twice on one
    persistent compilation cache folder (``first``: empty; ``second``: what the first wrote).

    ``*_compile`` is the part of it spent tracing, lowering and compiling (or loading from
    the cache); ``second_hits`` counts the second process's programs loaded from the cache.
    """

    config: Config
    impl: str
    imports: float
    first: float
    first_compile: float
    second: float
    second_compile: float
    second_hits: int


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CompileMeter:
    """What JAX reported while a :func:`measure_compile` block ran."""

    spans: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    cache_hits: int = 0

    @property
    def seconds(self) -> float:
        """Seconds covered by the compile phases; a phase nested in another counts once."""
        total, reach = 0.0, float("-inf")
        for start, end in sorted(self.spans):
            total += max(0.0, end - max(start, reach))
            reach = max(reach, end)
        return total


@contextlib.contextmanager
def measure_compile() -> Iterator[CompileMeter]:
    """Records the compile phases (:data:`COMPILE_EVENTS`) and cache hits of the block."""
    meter = CompileMeter()

    def on_span(event: str, start_time: float, end_time: float, **kwargs) -> None:
        if event in COMPILE_EVENTS:
            meter.spans.append((start_time, end_time))

    def on_event(event: str, **kwargs) -> None:
        if event == CACHE_HIT_EVENT:
            meter.cache_hits += 1

    jax.monitoring.register_event_time_span_listener(on_span)
    jax.monitoring.register_event_listener(on_event)
    try:
        yield meter
    finally:
        jax.monitoring.unregister_event_time_span_listener(on_span)
        jax.monitoring.unregister_event_listener(on_event)


@contextlib.contextmanager
def no_persistent_cache() -> Iterator[None]:
    """JAX's persistent compilation cache off for the block, as it was after it.

    A process that turned the cache on (a notebook, ``JAX_COMPILATION_CACHE_DIR``) would
    otherwise load every repetition after the first from disk instead of compiling it.
    """
    if not jax.config.jax_compilation_cache_dir or not jax.config.jax_enable_compilation_cache:
        yield
        return
    # JAX decides once per process whether the cache is used: reset makes it ask again.
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        compilation_cache.reset_cache()


def first_call_compile(impl: Impl, which: str) -> float:
    """Trace + lower + compile seconds of ``impl``'s ``which`` call (``"forward"`` or
    ``"train"``) with JAX's in-memory caches cleared first: a first call, whatever ran before
    (a builder that tries its calls, such as the Pallas one off the CPU, or an earlier
    repetition)."""
    jax.clear_caches()
    call = impl.forward if which == "forward" else impl.train_step
    with measure_compile() as meter:
        call()
    return meter.seconds


def _builders(peers: Sequence[str]) -> dict[str, Callable[[Case], Impl]]:
    builders = {OURS: _peers.build_ours}
    builders.update({k: _peers.PEERS[k] for k in peers if k in COMPILED_PEERS})
    return builders


def _note(notes: list[str], text: str) -> None:
    if text not in notes:
        notes.append(text)


def compare_compile(
    configs: Sequence[Config],
    peers: Sequence[str],
    reps: int = 3,
    *,
    notes: list[str],
    log: Callable[[str], None] = print,
) -> list[CompileRow]:
    """Median over ``reps`` of :func:`first_call_compile`, forward and training step, of ours
    and of each JAX peer among ``peers`` on every config; repetitions interleaved."""
    rows: list[CompileRow] = []
    with no_persistent_cache():
        for cfg in configs:
            case = _peers.make_case(cfg)
            impls = {}
            for key, build in _builders(peers).items():
                try:
                    impls[key] = build(case)
                except Unavailable as e:
                    _note(notes, f"{key} skipped on {cfg.name}: {e}")
            times: dict[str, list[float]] = {f"{k} {w}": [] for k in impls for w in WHICH}
            for _ in range(reps):
                for key, impl in impls.items():
                    for which in WHICH:
                        times[f"{key} {which}"].append(first_call_compile(impl, which))
            for key, impl in impls.items():
                fwd, train = (statistics.median(times[f"{key} {w}"]) for w in WHICH)
                rows.append(CompileRow(cfg, impl.name, fwd, train))
            jax.clear_caches()  # nothing of these impls stays compiled
            ours = rows[-len(impls)]
            log(f"  {cfg.name}: ours compiles fwd {ours.forward:.2f} s, fwd+bwd {ours.train:.2f} s")
    return rows


# The program a cold start runs: argv[1] a Config's fields as JSON, argv[2] the builder's key.
_COLD_START = """
import time

t0 = time.perf_counter()
import json, sys
from gru_jax.bench import _compile, _peers

imported = time.perf_counter() - t0
config = _peers.Config(**json.loads(sys.argv[1]))
build = _peers.build_ours if sys.argv[2] == _compile.OURS else _peers.PEERS[sys.argv[2]]
try:
    with _compile.measure_compile() as meter:
        impl = build(_peers.make_case(config))
        impl.train_step()
except _peers.Unavailable as e:
    print(json.dumps({"unavailable": str(e)}))
    sys.exit()
total = time.perf_counter() - t0
print(json.dumps({"name": impl.name, "imports": imported, "total": total,
                  "compile": meter.seconds, "hits": meter.cache_hits}))
"""


def _cold_process(cfg: Config, key: str, cache_dir: str) -> dict:
    """One fresh process's :data:`_COLD_START` with the persistent cache in ``cache_dir``."""
    env = {
        **os.environ,
        # JAX reads its options from the environment: the cache on, for every program.
        "JAX_ENABLE_COMPILATION_CACHE": "true",
        "JAX_COMPILATION_CACHE_DIR": cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }
    args = [sys.executable, "-c", _COLD_START, json.dumps(dataclasses.asdict(cfg)), key]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"cold start of {key} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cold_starts(
    cfg: Config,
    peers: Sequence[str],
    *,
    notes: list[str],
    log: Callable[[str], None] = print,
) -> list[ColdStart]:
    """A :class:`ColdStart` of ours and of each JAX peer among ``peers`` on ``cfg``: two
    fresh processes each, on a persistent compilation cache folder of their own."""
    rows = []
    for key in _builders(peers):
        with tempfile.TemporaryDirectory(prefix="gru_jax_cold_") as cache_dir:
            first = _cold_process(cfg, key, cache_dir)
            if "unavailable" in first:
                _note(notes, f"{key} skipped on {cfg.name}: {first['unavailable']}")
                continue
            second = _cold_process(cfg, key, cache_dir)
        rows.append(
            ColdStart(
                cfg, first["name"], first["imports"], first["total"], first["compile"],
                second["total"], second["compile"], second["hits"],
            )
        )  # fmt: skip
        log(f"  {first['name']}: {first['total']:.1f} s, then {second['total']:.1f} s")
    return rows


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def compile_table(rows: Sequence[CompileRow]) -> str:
    """Markdown: per config and implementation, compile seconds and ratios to ours (above 1:
    ours compiles faster)."""
    lines = [
        "| config | implementation | forward s | vs gru_jax | fwd+bwd s | vs gru_jax |",
        "|---|---|---:|---:|---:|---:|",
    ]
    by_cfg: dict[str, list[CompileRow]] = {}
    for row in rows:
        by_cfg.setdefault(row.config.name, []).append(row)
    for group in by_cfg.values():
        ours = next(r for r in group if r.impl == OURS)
        for r in group:
            cfg = f"{r.config.name}: {r.config.describe()}" if r is group[0] else ""
            lines.append(
                f"| {cfg} | {r.impl} | {r.forward:.2f} | {_harness.ratio(r.forward, ours.forward)} "
                f"| {r.train:.2f} | {_harness.ratio(r.train, ours.train)} |"
            )
    return "\n".join(lines)


def cold_start_table(rows: Sequence[ColdStart]) -> str:
    """Markdown: per implementation, the two processes' seconds and their compile parts."""
    lines = [
        "| implementation | imports s | first process s | of it compiling s "
        "| second process s | of it compiling s | programs from the cache |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.impl} | {r.imports:.2f} | {r.first:.2f} | {r.first_compile:.2f} "
            f"| {r.second:.2f} | {r.second_compile:.2f} | {r.second_hits} |"
        )
    return "\n".join(lines)


def compile_sections(rows: Sequence[CompileRow], cold: Sequence[ColdStart], reps: int) -> list[str]:
    """The report's Markdown lines of the two tables (none for an empty one)."""
    lines: list[str] = []
    if rows:
        lines += [
            "",
            "## Compile time side by side (trace + lower + compile, seconds)",
            "",
            f"The median of {reps} first calls, each after `jax.clear_caches()` (nothing an "
            "earlier call traced or compiled is reused) with the persistent compilation cache "
            "off: the seconds JAX reports for tracing, lowering and XLA's compile. Ratios are "
            f"peer / gru_jax: above 1.00x gru_jax compiles faster. {NO_COMPILE_NOTE}",
            "",
            compile_table(rows),
        ]
    if cold:
        cfg = cold[0].config
        lines += [
            "",
            f"## Cold start: a fresh process's imports to its first gradient ({cfg.name})",
            "",
            f"{cfg.describe()}. Wall seconds from the process's first line through its imports "
            "(jax, flax, gru_jax), the data, the model and the first training-step gradient; "
            "twice, on one JAX persistent compilation cache folder, empty for the first "
            "process. The second loads the first one's compiled programs instead of compiling "
            f"them. {NO_COMPILE_NOTE}",
            "",
            cold_start_table(cold),
        ]
    return lines
