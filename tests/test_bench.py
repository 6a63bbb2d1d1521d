"""Smoke test of the benchmark harness (gru_jax.bench) on tiny shapes: no timing assertions.

Checks that every available peer computes the same function as gru_jax on the same weights
(forward at valid steps, and the gradients w.r.t. the weights for flax and torch, which
exercises gru_jax's custom backward against two independent implementations), and that a
whole run writes a report with finite, positive timings for every implementation.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from gru_jax import bench
from gru_jax.bench import _harness, _peers

# The pallas peer runs interpreted on the CPU, to check its numbers: its one-time warning
# that this is slow is expected here (tests/test_pallas.py tests the warning itself).
pytestmark = pytest.mark.filterwarnings("ignore:impl=.pallas. runs its kernel")

TINY = _peers.Config("tiny", 3, 6, 5, 4)
TINY_BI = _peers.Config("tiny-bi", 4, 7, 3, 4, layers=2, bidirectional=True, variable_lengths=True)


@pytest.fixture(autouse=True, scope="module")
def _exact_torch_float32():
    """Exact float32 in torch's cuDNN GRU too, which on a GPU rounds its matmuls to TF32 by
    default (``tests/conftest.py`` does the same for JAX); nothing changes on the CPU."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def _available(case):
    impls = {}
    for key, build in _peers.PEERS.items():
        try:
            impls[key] = build(case)
        except _peers.Unavailable:
            continue
    return impls


@pytest.mark.parametrize("config", [TINY, TINY_BI], ids=lambda c: c.name)
def test_peers_compute_the_same_function(config):
    """Same weights and inputs: every peer's output equals ours at valid steps, and flax's
    and torch's weight gradients of the same loss equal ours."""
    case = _peers.make_case(config, seed=1)
    ours_impl = _peers.build_ours(case)
    ours = _peers.as_numpy(ours_impl.forward())
    assert ours.shape == (config.batch, config.steps, config.directions * config.hidden)
    valid = case.valid_steps()
    impls = _available(case)
    assert "flax" in impls  # flax is a dependency of gru_jax
    for key, impl in impls.items():
        theirs = _peers.as_numpy(impl.forward())
        np.testing.assert_allclose(theirs[valid], ours[valid], rtol=1e-5, atol=1e-5, err_msg=key)

    grads = ours_impl.train_step()["params"]
    hidden = config.hidden
    gates = [slice(g * hidden, (g + 1) * hidden) for g in range(3)]
    close = dict(rtol=1e-4, atol=1e-6)
    flax = impls["flax"].train_step()["params"]
    for i in range(config.layers):
        lp = grads[f"layer_{i}"]
        for k in range(config.directions):
            cell = flax[f"l{i}_d{k}"]
            for g, name in enumerate("rzn"):
                np.testing.assert_allclose(
                    cell[f"i{name}"]["kernel"], lp["w_ih"][k][:, gates[g]], **close
                )
                np.testing.assert_allclose(
                    cell[f"h{name}"]["kernel"], lp["w_hh"][k][:, gates[g]], **close
                )
            np.testing.assert_allclose(cell["hn"]["bias"], lp["b_hh"][k][gates[2]], **close)
    if "torch" not in impls:
        return
    # torch.nn.GRU's parameter order: per layer, per direction: w_ih, w_hh, b_ih, b_hh.
    it = iter(np.asarray(g) for g in impls["torch"].train_step())
    for i in range(config.layers):
        lp = grads[f"layer_{i}"]
        for k in range(config.directions):
            for name in ("w_ih", "w_hh", "b_ih", "b_hh"):
                got = next(it)
                got = got.T if name.startswith("w") else got
                np.testing.assert_allclose(got, lp[name][k], **close, err_msg=name)


def test_run_writes_a_report(tmp_path):
    # One cheap peer keeps this fast (the peers' numerics are checked above): torch if
    # installed (nothing to compile), else flax.
    try:
        import torch  # noqa: F401

        peers = ["torch"]
    except ImportError:
        peers = ["flax"]
    plan = bench.Plan(
        configs=[TINY],
        reps=7,
        peers=peers,
        sweep_steps=(4,),
        compile_steps=(4, 8),
        compile_layers=(1, 2),
        memory_configs=(TINY,),
        matmul_n=256,
    )
    md = bench.run(plan, tmp_path, command="pytest", log=lambda s: None)
    assert (tmp_path / "results.md").read_text() == md
    payload = json.loads((tmp_path / "results.json").read_text())
    rows = payload["rows"]
    for cfg in plan.configs:
        impls = {r["impl"] for r in rows if r["config"]["name"] == cfg.name}
        assert _harness.OURS in impls and len(impls) == 2
        for r in rows:
            for field in ("forward", "train"):
                assert math.isfinite(r[field]) and r[field] > 0, r
    assert "| gru_jax | " in md and "1.00x" in md
    assert payload["matmul_flops_per_s"] > 0
    torch_rate = payload["torch_matmul_flops_per_s"]
    assert torch_rate > 0 if peers == ["torch"] else torch_rate is None
    assert ("torch.matmul" in md) == (peers == ["torch"])
    assert len(payload["compile_vs_steps"]) == 2 and len(payload["compile_vs_layers"]) == 2
    mem = payload["memory"]
    assert [m[1] for m in mem] == [False, True]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "time_vs_T.png").stat().st_size > 0


def test_run_reports_compile_time_side_by_side(tmp_path):
    """The compile-time table has gru_jax's and flax's forward and training-step seconds."""
    plan = bench.Plan(configs=[TINY], reps=7, peers=["flax"], matmul_n=64, compile_reps=1)
    md = bench.run(plan, tmp_path, command="pytest", log=lambda s: None)
    payload = json.loads((tmp_path / "results.json").read_text())
    compiled = {r["impl"]: r for r in payload["compile"]}
    assert set(compiled) == {_harness.OURS, "flax.linen.RNN(GRUCell)"}
    for r in compiled.values():
        assert r["config"]["name"] == TINY.name
        assert r["forward"] > 0 and r["train"] > 0, r
    assert payload["cold_start"] == []  # not asked for: see the next test
    assert "## Compile time side by side (trace + lower + compile, seconds)" in md
    assert "no compile step" in md and "## Cold start" not in md
    assert f"| {TINY.name}: {TINY.describe()} | gru_jax | " in md
    assert "|  | flax.linen.RNN(GRUCell) | " in md


def test_cold_start_runs_two_processes_on_one_cache():
    """Two fresh processes, imports to first gradient: the second loads the first one's
    compiled programs from the persistent cache (gru_jax alone here: each process costs
    seconds, and flax's cold start runs the same code)."""
    from gru_jax.bench import _compile

    notes, logged = [], []
    (cold,) = _compile.cold_starts(TINY, [], notes=notes, log=logged.append)
    assert cold.impl == _harness.OURS and not notes and len(logged) == 1
    assert 0 < cold.imports < cold.first and 0 < cold.first_compile < cold.first
    assert 0 < cold.second_compile < cold.second
    assert cold.second_hits > 0  # what the first process compiled, the second loaded
    md = "\n".join(_compile.compile_sections([], [cold], reps=1))
    assert f"## Cold start: a fresh process's imports to its first gradient ({TINY.name})" in md
    assert md.count("\n| gru_jax | ") == 1 and "no compile step" in md


def test_compile_only_prints_the_compile_tables_for_gru_jax_and_flax(monkeypatch, capsys):
    """``--compile-only`` prints :func:`bench.compile_report` (flax the default peer) and
    writes nothing; the report itself is checked above, through ``bench.run``."""
    from gru_jax.bench import _cli

    calls = []
    monkeypatch.setattr(_cli, "compile_report", lambda *args: calls.append(args) or "TABLE")
    monkeypatch.setattr(_cli, "run", lambda *args, **kwargs: pytest.fail("run() called"))
    _cli.main(["--compile-only", "--configs", "base,latency", "--compile-reps", "2"])
    ((configs, peers, reps),) = calls
    assert [c.name for c in configs] == ["base", "latency"] and peers == ["flax"] and reps == 2
    assert capsys.readouterr().out == "TABLE\n"


def test_compile_meter_counts_nested_phases_once():
    from gru_jax.bench import _compile

    meter = _compile.CompileMeter(spans=[(0.0, 1.0), (0.2, 0.5), (2.0, 2.5), (2.4, 3.0)])
    assert meter.seconds == pytest.approx(2.0)


def test_matmul_rate_is_positive():
    assert _harness.matmul_rate(64, reps=7) > 0
    pytest.importorskip("torch")
    rates = _harness.matmul_rates(64, reps=3)
    assert set(rates) == {"jax", "torch"} and min(rates.values()) > 0
    jax.clear_caches()


def test_sweep_reuses_rows_of_the_same_shape():
    """A sweep point that a peer comparison already timed (the long config) is not timed
    again: its rows come back renamed, the other points are timed."""
    base = _peers.Config("sweep", 2, 0, 3, 4)
    long = _harness.Row(
        _peers.Config("long", 2, 6, 3, 4), _harness.OURS, forward=123.0, train=456.0
    )
    other = _harness.Row(TINY, _harness.OURS, forward=7.0, train=8.0)
    rows = _harness.time_vs_steps((3, 6), [], 3, base, notes=[], measured=[other, long])
    assert [r.config.name for r in rows] == ["T=3", "T=6"]
    assert [r.config.steps for r in rows] == [3, 6]
    assert (rows[1].forward, rows[1].train) == (123.0, 456.0)
    assert 0 < rows[0].forward < 100 and 0 < rows[0].train < 100


@pytest.mark.parametrize("config", [TINY, TINY_BI], ids=lambda c: c.name)
def test_bfloat16_mode_runs_every_peer_in_bfloat16(config):
    """``dtype="bfloat16"``: every peer's output moves off the float32 one by a bfloat16
    rounding's worth (so the mode took effect), stays close to it, and gru_jax's (float32
    carry and gate math) is the closest; the train steps run and give finite gradients."""
    case = _peers.make_case(config, seed=1, dtype="bfloat16")
    impls = {"ours": _peers.build_ours(case), **_available(case)}
    errors = _harness.output_errors(case, impls)
    assert set(errors) == set(impls)
    for key, err in errors.items():
        assert 1e-4 < err < 5e-2, (key, err)
    assert errors["ours"] == min(errors.values())
    for key, impl in impls.items():
        # torch's gradients are bfloat16 tensors, which NumPy cannot take as they are.
        leaves = [
            np.asarray(g.float() if hasattr(g, "float") else g, np.float32)
            for g in jax.tree.leaves(impl.train_step())
        ]
        assert leaves and all(np.isfinite(g).all() for g in leaves), key


def test_bfloat16_run_reports_errors(tmp_path):
    # The extras measure gru_jax in float32 only: a bfloat16 run leaves them out.
    plan = bench.Plan(
        configs=[TINY],
        reps=7,
        peers=["flax"],
        sweep_steps=(4,),
        compile_steps=(4,),
        memory_configs=(TINY,),
        matmul_n=256,
        dtype="bfloat16",
    )
    md = bench.run(plan, tmp_path, command="pytest", log=lambda s: None)
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["dtype"] == "bfloat16"
    assert payload["sweep"] == payload["compile_vs_steps"] == payload["memory"] == []
    errors = [r["error"] for r in payload["rows"]]
    assert len(errors) == 2 and all(1e-4 < e < 5e-2 for e in errors)
    assert "## Peers (bfloat16)" in md and "max abs error |" in md
    assert f"| {errors[0]:.1e} |" in md


def test_help_lists_the_configs_and_how_long_a_run_takes(capsys):
    from gru_jax.bench import _cli, _harness

    with pytest.raises(SystemExit) as info:
        _cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for cfg in _harness.CONFIGS:
        assert f"{cfg.name}" in out and cfg.describe() in out
    assert "--quick run" in out and "minutes" in out
    assert "--compile-only" in out and "no compile" in out


def test_cli_says_where_it_wrote_the_report(tmp_path, monkeypatch, capsys):
    from gru_jax.bench import _cli

    with pytest.raises(SystemExit):
        _cli.main(["--help"])
    assert "(default: bench_out)" in capsys.readouterr().out  # --out's default

    monkeypatch.setattr(_cli, "run", lambda plan, out, command: "# gru_jax benchmark\n")
    out = tmp_path / "report"
    _cli.main(["--quick", "--peers", "flax", "--out", str(out)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"wrote {out / 'results.md'} and {out / 'results.json'}"
