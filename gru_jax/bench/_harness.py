"""Timing, sweeps and reports of the benchmark (see :mod:`gru_jax.bench`)."""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import gru_jax
from gru_jax.bench import _peers
from gru_jax.bench._peers import Case, Config, Impl, Unavailable

OURS = "gru_jax"

CONFIGS = (
    Config("base", 64, 128, 256, 256),
    Config("bidir-2L-varlen", 32, 128, 128, 256, 2, True, True),
    Config("latency", 1, 256, 64, 128),
    Config("long", 16, 2048, 128, 256),
)
# --quick: same shapes, but the long config has T=512 (T=2048 alone takes about a minute).
QUICK_CONFIGS = (*CONFIGS[:3], Config("long", 16, 512, 128, 256))
# The time-vs-T sweep: the long config's shape at several T.
SWEEP_BASE = Config("sweep", 16, 0, 128, 256)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


# Pause (untimed) before every timed call, so that each call starts on a quiet machine:
# torch's OpenMP threads keep spinning for a while after a call returns and slow whatever
# runs next (measured in the performance docs' design log). With the rotated order below,
# the implementation listed after torch would otherwise always run right after it.
SETTLE_SECONDS = 0.025


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    reps: int,
    warmup: int = 2,
    settle: float = SETTLE_SECONDS,
) -> dict[str, list[float]]:
    """Seconds per call of each function, repetitions interleaved across functions.

    Each function runs ``warmup`` times first (compilation, caches); then ``reps`` rounds
    each call every function once, in an order rotated every round, so that slow phases of
    a shared machine hit every function alike, and with ``settle`` seconds of pause before
    every timed call (see ``SETTLE_SECONDS``). The garbage collector is off while timing.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(reps):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                time.sleep(settle)
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return times


def matmul_rate(n: int = 2048, reps: int = 7) -> float:
    """FLOP/s of a float32 ``(n, n) @ (n, n)`` ``jnp.dot`` under ``jit`` (median of ``reps``)."""
    return matmul_rates(n, reps, torch=False)["jax"]


def matmul_rates(
    n: int = 2048, reps: int = 7, torch: bool = True, dtype: str = "float32"
) -> dict[str, float]:
    """FLOP/s of an ``(n, n) @ (n, n)`` product, median of ``reps`` interleaved runs.

    ``"jax"``: ``jnp.dot`` under ``jit`` (XLA's own dot, the rate the FLOP floor uses);
    ``"torch"``: ``torch.matmul`` where the torch peer runs (its CPU threads, or the GPU),
    when torch imports. The two side by side say how much of a gap to torch is the matmul
    library rather than the GRU around it. ``dtype="bfloat16"``: bfloat16 operands, float32
    accumulation for ``jnp.dot`` (gru_jax's ``dtype=jnp.bfloat16`` matmuls), a bfloat16
    result for torch.
    """
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    if dtype == "bfloat16":
        a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    f = jax.jit(functools.partial(jnp.dot, preferred_element_type=jnp.float32))
    fns = {"jax": lambda: f(a, b).block_until_ready()}
    if torch:
        try:
            import torch as th
        except ImportError:
            pass
        else:
            device = _peers.torch_device()
            if device.type == "cpu":
                th.set_num_threads(_peers.torch_threads())
            ta, tb = (th.from_numpy(np.array(v, np.float32)).to(device) for v in (a, b))
            if dtype == "bfloat16":
                ta, tb = ta.bfloat16(), tb.bfloat16()

            def torch_matmul():
                out = th.matmul(ta, tb)
                if device.type == "cuda":
                    th.cuda.synchronize()
                return out

            fns["torch"] = torch_matmul
    times = time_interleaved(fns, reps)
    return {name: 2.0 * n**3 / statistics.median(t) for name, t in times.items()}


# --------------------------------------------------------------------------------------------
# The peer comparison
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """Medians (seconds) of one implementation on one config; ``None`` when skipped."""

    config: Config
    impl: str
    forward: float | None
    train: float | None
    note: str = ""
    # max |output - gru_jax's float32 output on the CPU|: bfloat16 runs, and every run on an
    # accelerator (whose float32 matmuls may round through TF32)
    error: float | None = None


def build_impls(
    case: Case, peers: Sequence[str], notes: list[str], ours_options: dict | None = None
) -> dict[str, Impl]:
    """Ours plus each available peer (``peers``: keys of ``_peers.PEERS``); skips noted."""
    impls = {OURS: _peers.build_ours(case, **(ours_options or {}))}
    for key in peers:
        try:
            impl = _peers.PEERS[key](case)
        except Unavailable as e:
            notes.append(f"{key} skipped on {case.config.name}: {e}")
            continue
        impls[impl.name] = impl
    return impls


def output_errors(case: Case, impls: dict[str, Impl]) -> dict[str, float]:
    """Per implementation, the largest ``|output - reference|`` over valid steps, where the
    reference is gru_jax's float32 output on the same weights and inputs, computed on the
    CPU (exact float32 matmuls, whatever the default backend rounds them to)."""
    ref_case = dataclasses.replace(case, dtype="float32")
    with jax.default_device(jax.devices("cpu")[0]):
        ref = _peers.as_numpy(_peers.build_ours(ref_case).forward())
    valid = case.valid_steps()
    return {
        name: float(np.max(np.abs(_peers.as_numpy(impl.forward())[valid] - ref[valid])))
        for name, impl in impls.items()
    }


def compare(
    configs: Sequence[Config],
    peers: Sequence[str],
    reps: int,
    *,
    notes: list[str],
    log: Callable[[str], None] = print,
    dtype: str = "float32",
) -> list[Row]:
    """Forward and forward+backward medians of ours and the peers on every config.

    ``dtype="bfloat16"`` runs every implementation in its bfloat16 mode (see
    ``_peers.DTYPES``). Such runs, and every run on an accelerator, record each
    implementation's :func:`output_errors`.
    """
    rows: list[Row] = []
    for cfg in configs:
        case = _peers.make_case(cfg, dtype=dtype)
        impls = build_impls(case, peers, notes)
        with_errors = case.bf16 or jax.default_backend() != "cpu"
        errors = output_errors(case, impls) if with_errors else {}
        fwd = time_interleaved({n: i.forward for n, i in impls.items()}, reps)
        train = time_interleaved({n: i.train_step for n, i in impls.items()}, reps)
        for name, impl in impls.items():
            rows.append(
                Row(
                    cfg,
                    name,
                    statistics.median(fwd[name]),
                    statistics.median(train[name]),
                    impl.note,
                    errors.get(name),
                )
            )
        ours = rows[-len(impls)]
        log(
            f"  {cfg.name}: ours fwd {ours.forward * 1e3:.2f} ms, fwd+bwd {ours.train * 1e3:.2f} ms"
        )
    return rows


def time_vs_steps(
    steps: Sequence[int],
    peers: Sequence[str],
    reps: int,
    base: Config = SWEEP_BASE,
    *,
    notes: list[str],
    measured: Sequence[Row] = (),
) -> list[Row]:
    """:func:`compare` over ``T`` for the plot.

    A ``T`` whose shape a row of ``measured`` already has (the long config is the sweep's
    shape) reuses those rows instead of timing the same thing twice.
    """
    rows: list[Row] = []
    for t in steps:
        cfg = dataclasses.replace(base, name=f"T={t}", steps=t)
        same = [r for r in measured if dataclasses.replace(r.config, name=cfg.name) == cfg]
        if same:
            rows += [dataclasses.replace(r, config=cfg) for r in same]
        else:
            rows += compare([cfg], peers, reps, notes=notes, log=lambda s: None)
    return rows


# --------------------------------------------------------------------------------------------
# Compile time and memory
# --------------------------------------------------------------------------------------------


def _ours_fns(cfg: Config, **options):
    model = gru_jax.GRU(
        hidden_size=cfg.hidden, num_layers=cfg.layers, bidirectional=cfg.bidirectional, **options
    )

    def fwd(v, x):
        return model.apply(v, x)[0]

    def grad(v, x):
        return jax.grad(lambda v: jnp.mean(jnp.square(fwd(v, x))))(v)

    return fwd, grad


def _abstract_args(cfg: Config):
    params = jax.eval_shape(
        lambda: gru_jax.init_gru(
            jax.random.key(0),
            cfg.features,
            cfg.hidden,
            num_layers=cfg.layers,
            bidirectional=cfg.bidirectional,
        )
    )
    x = jax.ShapeDtypeStruct((cfg.batch, cfg.steps, cfg.features), jnp.float32)
    return {"params": params}, x


def compile_seconds(cfg: Config, which: str = "train", **options) -> float:
    """Seconds to trace, lower and compile ours (``which``: ``"forward"`` or ``"train"``).

    JAX's in-memory caches are cleared first: the backward pass traces the forward again
    instead of reusing a trace of an earlier call.
    """
    fwd, grad = _ours_fns(cfg, **options)
    fn = fwd if which == "forward" else grad
    args = _abstract_args(cfg)
    jax.clear_caches()
    t0 = time.perf_counter()
    jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - t0


def backward_memory(cfg: Config, remat: bool) -> dict[str, int]:
    """XLA's ``memory_analysis()`` of ours' compiled gradient (bytes)."""
    _, grad = _ours_fns(cfg, remat=remat)
    compiled = jax.jit(grad).lower(*_abstract_args(cfg)).compile()
    mem = compiled.memory_analysis()
    out = {}
    for field in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"):
        out[field] = int(getattr(mem, field, -1)) if mem is not None else -1
    return out


def weight_bytes(cfg: Config) -> int:
    params, _ = _abstract_args(cfg)
    return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(params))


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def _ms(s: float | None) -> str:
    return "n/a" if s is None else f"{s * 1e3:.2f}"


def ratio(peer: float | None, ours: float | None) -> str:
    """``peer / ours`` as the reports print it (``"1.23x"``; ``"n/a"`` without both)."""
    if peer is None or ours is None or ours <= 0:
        return "n/a"
    return f"{peer / ours:.2f}x"


def _error(e: float | None) -> str:
    return "n/a" if e is None else f"{e:.1e}"


def peer_table(rows: Sequence[Row], rate: float | None) -> str:
    """Markdown: per config and implementation, medians and ratios to ours (>1: ours faster),
    and each row's output error when the rows have one (bfloat16 runs)."""
    errors = any(r.error is not None for r in rows)
    head = (
        "| config | implementation | forward ms | vs gru_jax | fwd+bwd ms | vs gru_jax "
        "| forward / FLOP floor |" + (" max abs error |" if errors else "")
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if errors else "")]
    by_cfg: dict[str, list[Row]] = {}
    for row in rows:
        by_cfg.setdefault(row.config.name, []).append(row)
    for group in by_cfg.values():
        ours = next(r for r in group if r.impl == OURS)
        floor = group[0].config.forward_flops() / rate if rate else None
        for r in group:
            name = r.impl if not r.note else f"{r.impl} ({r.note})"
            cfg = f"{r.config.name}: {r.config.describe()}" if r is group[0] else ""
            lines.append(
                f"| {cfg} | {name} | {_ms(r.forward)} | {ratio(r.forward, ours.forward)} "
                f"| {_ms(r.train)} | {ratio(r.train, ours.train)} "
                f"| {ratio(r.forward, floor)} |" + (f" {_error(r.error)} |" if errors else "")
            )
    return "\n".join(lines)


def floor_table(configs: Sequence[Config], rate: float) -> str:
    lines = [
        "| config | forward GFLOP | floor ms at measured rate |",
        "|---|---:|---:|",
    ]
    for cfg in configs:
        flops = cfg.forward_flops()
        lines.append(f"| {cfg.name} | {flops / 1e9:.3f} | {flops / rate * 1e3:.2f} |")
    return "\n".join(lines)


def plot_vs_steps(rows: Sequence[Row], path: Path) -> bool:
    """Log-log time vs ``T`` per implementation (forward, forward+backward); False if no mpl."""
    try:
        # A bare Figure draws to a file without pyplot: the process's backend (a notebook's
        # inline one, say) is left as it is.
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return False
    fig = Figure(figsize=(10, 4), constrained_layout=True)
    axes = fig.subplots(1, 2)
    impls = list(dict.fromkeys(r.impl for r in rows))
    for ax, field, title in zip(
        axes, ("forward", "train"), ("forward (inference)", "forward + backward"), strict=True
    ):
        for impl in impls:
            pts = [(r.config.steps, getattr(r, field)) for r in rows if r.impl == impl]
            pts = [(t, v * 1e3) for t, v in pts if v is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
        cfg = rows[0].config
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="T (time steps)",
            ylabel="median ms",
            title=f"{title}, B={cfg.batch} D={cfg.features} H={cfg.hidden}",
        )
        # Ticks at the measured T only: matplotlib's minor log labels overlap on a short axis.
        steps = sorted({r.config.steps for r in rows})
        ax.set_xticks(steps, [str(t) for t in steps])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=100)
    return True


def machine() -> dict[str, object]:
    """CPU model, cores, memory, library versions and the load average."""
    info: dict[str, object] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "cores": _peers.torch_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            models = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1])
        info["memory_gib"] = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    os.environ.setdefault("KERAS_BACKEND", "jax")  # as the Keras peer does
    for mod in ("flax", "torch", "keras"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # a missing or broken peer is only noted
            info[mod] = None
    return info


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def write_json(path: Path, payload: dict) -> None:
    def default(o):
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        if isinstance(o, np.generic):
            return o.item()
        return str(o)

    path.write_text(json.dumps(payload, indent=2, default=default))
