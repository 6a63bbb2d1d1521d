"""``python -m gru_jax.bench``: run everything, write Markdown, JSON and a PNG to ``--out``."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gru_jax.bench import _compile
from gru_jax.bench import _harness as h
from gru_jax.bench._peers import BFLOAT16_RECIPES, DTYPES, PEERS, Config, default_peers

# The last T of each sweep is the long config's (B16 D128 H256): its rows are reused.
SWEEP_STEPS = (32, 128, 512, 2048)
QUICK_SWEEP_STEPS = (16, 64, 512)
COMPILE_STEPS = (64, 256, 1024, 4096)
QUICK_COMPILE_STEPS = (64, 512, 4096)
COMPILE_LAYERS = tuple(range(1, 9))
QUICK_COMPILE_LAYERS = (1, 2, 4, 8)
# First calls per implementation of the side-by-side compile table (its median).
COMPILE_REPS = 3


@dataclasses.dataclass
class Plan:
    """What one run measures; :func:`plan` builds the full and ``--quick`` ones."""

    configs: Sequence[Config]
    reps: int
    peers: Sequence[str]
    sweep_steps: Sequence[int] = ()
    compile_steps: Sequence[int] = ()
    compile_layers: Sequence[int] = ()
    memory_configs: Sequence[Config] = ()
    matmul_n: int = 2048
    # "bfloat16": every implementation in its bfloat16 mode (``_peers.DTYPES``); the T sweep,
    # compile time and memory are float32 figures, left to a float32 run.
    dtype: str = "float32"
    # Compile time of gru_jax and the JAX peers side by side on every config, the median of
    # this many first calls (0: not measured), and the cold start of a fresh process.
    compile_reps: int = 0
    cold_start: bool = False

    def without_extras(self) -> Plan:
        """This plan without the T sweep, compile time, cold start and memory (float32
        figures)."""
        return dataclasses.replace(
            self, sweep_steps=(), compile_steps=(), compile_layers=(), memory_configs=(),
            compile_reps=0, cold_start=False,
        )  # fmt: skip


def plan(quick: bool, reps: int | None = None, peers: Sequence[str] | None = None) -> Plan:
    configs = h.QUICK_CONFIGS if quick else h.CONFIGS
    return Plan(
        configs=configs,
        reps=reps or 7,
        peers=default_peers() if peers is None else list(peers),
        sweep_steps=QUICK_SWEEP_STEPS if quick else SWEEP_STEPS,
        compile_steps=QUICK_COMPILE_STEPS if quick else COMPILE_STEPS,
        compile_layers=QUICK_COMPILE_LAYERS if quick else COMPILE_LAYERS,
        memory_configs=(configs[1], configs[3]),
        compile_reps=COMPILE_REPS,
        cold_start=True,
    )


def run(p: Plan, out: Path, command: str = "", log=None) -> str:
    """Runs plan ``p``; writes ``results.md``, ``results.json``, ``time_vs_T.png`` to ``out``.

    Returns the Markdown report.
    """
    log = log or functools.partial(print, flush=True)
    if p.dtype != "float32":  # the extras measure gru_jax in float32 only
        p = p.without_extras()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    notes: list[str] = []
    load_before = h.load_average()
    info = h.machine()
    log(f"machine: {info.get('cpu')}, {info.get('cores')} cores; load {load_before}")

    rates = h.matmul_rates(p.matmul_n, torch="torch" in p.peers, dtype=p.dtype)
    rate = rates["jax"]
    log(f"{p.dtype} matmul rate ({p.matmul_n}^3): " + _rates_text(rates))

    log(f"peers on {len(p.configs)} configs, {p.reps} interleaved reps, {p.dtype}:")
    rows = h.compare(p.configs, p.peers, p.reps, notes=notes, log=log, dtype=p.dtype)

    sweep_rows = []
    if p.sweep_steps:
        log(f"time vs T: {list(p.sweep_steps)}")
        sweep_rows = h.time_vs_steps(p.sweep_steps, p.peers, p.reps, notes=notes, measured=rows)

    base = Config("compile", 16, 128, 128, 256)
    with _compile.no_persistent_cache():
        compile_t = _compile_sweep(base, "steps", p.compile_steps)
        compile_l = _compile_sweep(base, "layers", p.compile_layers)
    if compile_t:
        log("compile vs T: " + ", ".join(f"T={t}: {f:.2f}/{g:.2f} s" for t, f, g in compile_t))
    if compile_l:
        log("compile vs L: " + ", ".join(f"L={n}: {f:.2f}/{g:.2f} s" for n, f, g in compile_l))
    compile_rows, cold = _compile_figures(p, notes, log)

    memory = []
    for cfg in p.memory_configs:
        for remat in (False, True):
            memory.append((cfg, remat, h.backward_memory(cfg, remat)))
    load_after = h.load_average()
    elapsed = time.perf_counter() - t_start

    md = _report(
        p, info, rates, rows, sweep_rows, compile_t, compile_l, memory, notes, command,
        (load_before, load_after), elapsed, out, compile_rows, cold,
    )  # fmt: skip
    (out / "results.md").write_text(md)
    h.write_json(
        out / "results.json",
        {
            "machine": info,
            "command": command,
            "dtype": p.dtype,
            "load_average": [load_before, load_after],
            "matmul_flops_per_s": rate,
            "torch_matmul_flops_per_s": rates.get("torch"),
            "rows": rows,
            "sweep": sweep_rows,
            "compile_vs_steps": compile_t,
            "compile_vs_layers": compile_l,
            "compile": compile_rows,
            "cold_start": cold,
            "memory": memory,
            "notes": notes,
            "seconds": elapsed,
        },
    )
    return md


def _compile_sweep(base: Config, field: str, values: Sequence[int]) -> list[tuple]:
    """``(value, forward s, fwd+bwd s)`` of gru_jax's compile with ``base``'s ``field`` at
    each of ``values``."""
    out = []
    for v in values:
        cfg = dataclasses.replace(base, **{field: v})
        out.append((v, h.compile_seconds(cfg, "forward"), h.compile_seconds(cfg, "train")))
    return out


def _compile_figures(p: Plan, notes: list[str], log) -> tuple[list, list]:
    """Plan ``p``'s side-by-side compile rows and cold starts (empty where it has none)."""
    rows, cold = [], []
    if p.compile_reps:
        log(f"compile time side by side, median of {p.compile_reps} first calls:")
        rows = _compile.compare_compile(p.configs, p.peers, p.compile_reps, notes=notes, log=log)
    if p.cold_start and p.configs:
        log(f"cold start on {p.configs[0].name}, two fresh processes per implementation:")
        cold = _compile.cold_starts(p.configs[0], p.peers, notes=notes, log=log)
    return rows, cold


def compile_report(
    configs: Sequence[Config] | None = None,
    peers: Sequence[str] = ("flax",),
    reps: int = COMPILE_REPS,
    cold_start: bool = True,
    log=None,
) -> str:
    """The compile-time table (and the cold start) alone, as Markdown; writes no files.

    ``python -m gru_jax.bench --compile-only`` prints it. Args: ``configs``, default the
    benchmark's (:data:`~gru_jax.bench._harness.CONFIGS`); ``peers``, keys of
    ``_peers.PEERS`` (only the JAX ones compile); ``reps``, first calls per median;
    ``cold_start``, whether to add the fresh processes' table of the first config.
    """
    log = log or functools.partial(print, flush=True)
    p = Plan(
        configs=list(h.CONFIGS if configs is None else configs),
        reps=0,
        peers=list(peers),
        compile_reps=reps,
        cold_start=cold_start,
    )
    notes: list[str] = []
    rows, cold = _compile_figures(p, notes, log)
    lines = ["# gru_jax compile time", *_compile.compile_sections(rows, cold, reps)]
    return "\n".join([*lines, *_notes_lines(notes)]) + "\n"


_ERROR_TEXT = (
    "Max abs error: the largest difference from gru_jax's float32 output, computed on the "
    "CPU, at valid steps."
)


def _peers_intro(p: Plan, rows) -> list[str]:
    """The paragraph above the peer table: the bfloat16 recipes in a bfloat16 run, and what
    the error column means whenever the rows have one (``compare`` decides that)."""
    parts = [BFLOAT16_RECIPES] if p.dtype == "bfloat16" else []
    if any(r.error is not None for r in rows):
        parts.append(_ERROR_TEXT)
    return [" ".join(parts), ""] if parts else []


def _rates_text(rates: dict[str, float]) -> str:
    names = {"jax": "jnp.dot", "torch": "torch.matmul"}
    return ", ".join(f"{names[k]} {v / 1e9:.1f} GFLOP/s" for k, v in rates.items())


def _report(p, info, rates, rows, sweep_rows, compile_t, compile_l, memory, notes, command,
            loads, elapsed, out, compile_rows=(), cold=()) -> str:  # fmt: skip
    """The Markdown report of one run: its header, then one section per figure it measured."""
    rate = rates["jax"]
    lines = [
        *_header_lines(p, info, rates, command, loads, elapsed),
        *_peer_lines(p, rows, rate),
        *_compile.compile_sections(compile_rows, cold, p.compile_reps),
        *_sweep_lines(sweep_rows, rate, out),
        *_compile_vs_lines(compile_t, compile_l),
        *_memory_lines(memory),
        *_notes_lines(notes),
    ]
    return "\n".join(lines) + "\n"


def _header_lines(p: Plan, info, rates, command: str, loads, elapsed: float) -> list[str]:
    """The title and the bullet list of what ran where: machine, versions, command, timing."""
    return [
        "# gru_jax benchmark",
        "",
        f"- machine: {info.get('cpu')}, {info.get('cores')} cores, "
        f"{info.get('memory_gib', '?')} GiB; backend {info.get('backend')}"
        + (f" ({info.get('device_kind')})" if info.get("backend") != "cpu" else ""),
        f"- versions: python {info['python']}, jax {info['jax']}, flax {info.get('flax')}, "
        f"torch {info.get('torch')}, keras {info.get('keras')}",
        f"- command: `{command}`" if command else "- command: (library call)",
        f"- load average (1/5/15 min) before: {loads[0]}; after: {loads[1]}",
        f"- {p.dtype} matmul rate ({p.matmul_n}x{p.matmul_n}, interleaved): "
        f"{_rates_text(rates)} (the FLOP floor uses jnp.dot's)",
        f"- timing: warm-up 2 calls, then the median of {p.reps} interleaved repetitions "
        "(every implementation once per round, order rotated); fwd+bwd = gradient of "
        "mean(output**2) over valid steps w.r.t. all parameters; wall time of the whole run "
        f"{elapsed:.0f} s",
    ]


def _peer_lines(p: Plan, rows, rate: float) -> list[str]:
    """The peer table and the FLOP floor of plan ``p``'s configs."""
    return [
        "",
        "## Peers" + (" (bfloat16)" if p.dtype == "bfloat16" else ""),
        "",
        "Ratios are peer time / gru_jax time: above 1.00x gru_jax is faster. The FLOP floor is "
        "the forward matmul FLOPs `sum over layers, directions of 2*B*T*3H*(D_l+H)` at the "
        "measured matmul rate.",
        "",
        *_peers_intro(p, rows),
        h.peer_table(rows, rate),
        "",
        "### FLOP floor",
        "",
        h.floor_table(p.configs, rate),
    ]


def _sweep_lines(sweep_rows, rate: float, out: Path) -> list[str]:
    """The time-vs-T section (its plot saved to ``out``), or nothing without a sweep."""
    if not sweep_rows:
        return []
    cfg = sweep_rows[0].config
    lines = [
        "",
        f"## Time vs T (B={cfg.batch}, D={cfg.features}, H={cfg.hidden}, 1 layer)",
        "",
    ]
    if h.plot_vs_steps(sweep_rows, out / "time_vs_T.png"):
        lines += ["![time vs T](time_vs_T.png)", ""]
    lines.append(h.peer_table(sweep_rows, rate))
    return lines


def _compile_vs_lines(compile_t, compile_l) -> list[str]:
    """gru_jax's compile seconds vs T and vs num_layers, each table only where measured."""
    lines = []
    if compile_t:
        lines += [
            "",
            "## Compile time of gru_jax vs T (trace + lower + compile, seconds)",
            "",
            "B=16, D=128, H=256, 1 layer.",
            "",
            "| T | forward s | fwd+bwd s |",
            "|---:|---:|---:|",
            *(f"| {t} | {f:.2f} | {g:.2f} |" for t, f, g in compile_t),
        ]
    if compile_l:
        lines += [
            "",
            "## Compile time of gru_jax vs num_layers (seconds)",
            "",
            "B=16, T=128, D=128, H=256.",
            "",
            "| layers | forward s | fwd+bwd s |",
            "|---:|---:|---:|",
            *(f"| {n} | {f:.2f} | {g:.2f} |" for n, f, g in compile_l),
        ]
    return lines


def _memory_lines(memory) -> list[str]:
    """The backward-memory table of ``(config, remat, memory_analysis)`` rows, if any."""
    if not memory:
        return []
    lines = [
        "",
        "## Backward memory of gru_jax (XLA `compiled.memory_analysis()`, MiB)",
        "",
        "temp = XLA's temporary buffers of the compiled gradient. Saved states = "
        "T*B*H*L*K*4 bytes; the remat target is temp <= 1.5 x saved states + weights.",
        "",
        "| config | remat | temp MiB | saved states MiB | weights MiB "
        "| temp / (states + weights) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for cfg, remat, mem in memory:
        temp = mem["temp_size_in_bytes"]
        states, weights = cfg.state_bytes(), h.weight_bytes(cfg)
        lines.append(
            f"| {cfg.name}: {cfg.describe()} | {remat} | {temp / 2**20:.1f} "
            f"| {states / 2**20:.1f} | {weights / 2**20:.1f} "
            f"| {temp / (states + weights):.2f} |"
        )
    return lines


def _notes_lines(notes: Sequence[str]) -> list[str]:
    """The notes section, or nothing when there are none."""
    return ["", "## Notes", "", *(f"- {n}" for n in notes)] if notes else []


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the benchmark from the command line (``--help`` says how), printing its report."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    p = _plan_from_args(args, parser)
    if args.compile_only:
        print(compile_report(p.configs, p.peers, p.compile_reps))
        return
    if args.no_extras:
        p = p.without_extras()
    command = "python -m gru_jax.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    md = run(p, args.out, command.strip())
    print()
    print(md)
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}")


def _build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m gru_jax.bench``, its epilog listing the configs."""
    configs = "\n".join(f"  {c.name:17s} {c.describe()}" for c in h.CONFIGS)
    parser = argparse.ArgumentParser(
        prog="python -m gru_jax.bench",
        description="Times gru_jax against flax, Keras 3 (JAX) and torch GRUs in one process.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"configs (--configs):\n{configs}\n\n"
            "How long: on a 2-core CPU a --quick run (long at T=512, 7 reps) takes about "
            "2.5 minutes and a --quick --reps 11 run about 3.5; a full run adds the long "
            "config at T=2048 (about a minute alone) and longer sweeps. Run it alone on the "
            "machine: other processes make torch's threads, and so the ratios, unreliable.\n\n"
            "Compile time: every run also measures trace + lower + compile seconds of gru_jax "
            "and each JAX peer (flax, Keras) for the forward and the training step of every "
            "config (the median of --compile-reps first calls, JAX's caches cleared before "
            "each), and the cold start of a fresh process (imports to first gradient, twice on "
            "one persistent compilation cache folder); torch runs eagerly and has no compile "
            "step. They add about two minutes to a --quick run on a 2-core CPU (three when "
            "the machine is busy). --compile-only prints those two tables alone (gru_jax and "
            "flax unless --peers says otherwise, about a minute) and writes no files."
        ),
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller sweeps and the long config at T=512"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench_out"),
        help="folder for results.md, results.json and time_vs_T.png (default: %(default)s)",
    )
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (>= 7)")
    parser.add_argument(
        "--peers",
        default=None,
        help=f"comma-separated subset of {','.join(PEERS)} (default: all; pallas only off the "
        "CPU, where it would run in interpret mode)",
    )
    parser.add_argument(
        "--configs", default=None, help="comma-separated config names (default: all)"
    )
    parser.add_argument(
        "--no-extras",
        action="store_true",
        help="skip the T sweep, compile time, cold start and memory",
    )
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="only the compile-time table and the cold start, printed (peers: flax unless --peers)",
    )
    parser.add_argument(
        "--compile-reps",
        type=int,
        default=COMPILE_REPS,
        help=f"first calls per compile-time median (default {COMPILE_REPS})",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="bfloat16: the peer comparison in each library's bfloat16 mode, with each "
        "one's output error (the float32-only extras are skipped)",
    )
    return parser


def _plan_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Plan:
    """The plan that parsed ``args`` ask for; a wrong value exits through ``parser.error``."""
    if args.reps is not None and args.reps < 7:
        parser.error("--reps must be >= 7 (the report is a median of at least 7)")
    if args.compile_reps < 1:
        parser.error("--compile-reps must be >= 1")
    peers = _peers_from_args(args, parser)
    p = plan(args.quick, args.reps, peers)
    if args.configs:
        wanted = args.configs.split(",")
        p.configs = [c for c in p.configs if c.name in wanted]
        if not p.configs:
            parser.error(f"no config named {wanted}")
    p.dtype = args.dtype
    p.compile_reps = args.compile_reps
    return p


def _peers_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """``--peers`` as a list; without it, flax for ``--compile-only``, else the defaults."""
    if args.peers is not None:
        peers = [s for s in args.peers.split(",") if s]
    else:
        peers = ["flax"] if args.compile_only else default_peers()
    unknown = set(peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {list(PEERS)}")
    return peers
