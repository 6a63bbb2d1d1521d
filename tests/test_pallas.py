"""``impl="pallas"``: the fused kernels' numbers against torch.nn.GRU and the XLA path, and
their lowerings.

On the CPU the kernels run in Pallas's interpret modes, so these tests check their
arithmetic (forward and backward kernels, padding, lengths, both directions), not their
speed: the GPU kernel in the generic interpreter, the TPU kernel in TPU interpret mode
(which checks TPU memory semantics), each case once per kernel. Each case is one
compilation of a whole gradient, the cost that dominates here: the cases combine the
options rather than cross them. Exports for ``cuda`` and ``tpu`` from this CPU host check
that both kernels lower (Triton custom calls, ``tpu_custom_call``s).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gru_jax
from gru_jax import _dispatch, _pallas_platforms
from gru_jax.interop import from_torch, to_torch

torch.set_num_threads(1)

# The CPU's interpret-mode warning is tested once, below; elsewhere it is expected.
pytestmark = pytest.mark.filterwarnings("ignore:impl=.pallas. runs its kernel")

# The kernels the CPU interprets: the GPU kernel (generic interpreter), the TPU kernel (TPU
# interpret mode).
KERNELS = (
    "gpu",
    pytest.param(
        "tpu",
        marks=pytest.mark.skipif(
            jax.default_backend() != "cpu",
            reason="TPU interpret mode is the CPU's check of the TPU kernel; off the CPU the "
            "device's own kernel runs instead",
        ),
    ),
)
TRITON = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")

D, H, T, B = 3, 5, 6, 4
# Lengths 0 and T, and two in between (one of them 1).
LENGTHS = np.array([T, 0, 3, 1])


def _torch_run(module, x, h0, lengths, batch_first):
    """torch's GRU output (padded with zeros) and h_n, through a PackedSequence for lengths.

    torch rejects a length of 0, so such rows run apart: their output is 0 and h_n is h0.
    """
    if lengths is None:
        return module(x, h0)
    keep = np.flatnonzero(lengths > 0)
    b_axis = 0 if batch_first else 1
    sub_h0 = None if h0 is None else h0[:, keep]
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        x.index_select(b_axis, torch.as_tensor(keep)),
        torch.as_tensor(lengths[keep]),
        batch_first=batch_first,
        enforce_sorted=False,
    )
    out, h_n = module(packed, sub_h0)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(
        out, batch_first=batch_first, total_length=x.shape[1 if batch_first else 0]
    )
    full_out = torch.zeros((*x.shape[:2], out.shape[-1]))
    full_hn = torch.zeros(h_n.shape[0], x.shape[b_axis], h_n.shape[-1]) if h0 is None else h0
    index = torch.as_tensor(keep)
    full_out = full_out.index_copy(b_axis, index, out)
    full_hn = full_hn.index_copy(1, index, h_n)
    return full_out, full_hn


def _data(seed, num_layers, bidirectional, batch_first, with_h0):
    rng = np.random.default_rng(seed)
    k = 2 if bidirectional else 1
    shape = (B, T, D) if batch_first else (T, B, D)
    x = rng.standard_normal(shape).astype(np.float32)
    h0 = rng.standard_normal((num_layers * k, B, H)).astype(np.float32) if with_h0 else None
    out_w = rng.standard_normal((*shape[:2], k * H)).astype(np.float32)
    hn_w = rng.standard_normal((num_layers * k, B, H)).astype(np.float32)
    return x, h0, out_w, hn_w


def _jax_run(params, x, h0, out_w, hn_w, **options):
    """Outputs, h_n and the gradients of ``<out, out_w> + <h_n, hn_w>`` wrt params, x, h0."""

    def loss(params, x, h0):
        out, hn = gru_jax.gru(params, x, h0, **options)
        loss = jnp.sum(out.astype(jnp.float32) * out_w) + jnp.sum(hn.astype(jnp.float32) * hn_w)
        return loss, (out, hn)

    argnums = (0, 1) if h0 is None else (0, 1, 2)
    grads, (out, hn) = jax.grad(loss, argnums=argnums, has_aux=True)(params, x, h0)
    return out, hn, grads


# (num_layers, bidirectional, lengths, bias, batch_first, with_h0): every option value
# appears, and the first case has them all at once.
_TORCH_CASES = [
    (2, True, LENGTHS, True, True, True),
    (1, False, None, False, False, False),
    (1, True, LENGTHS, True, False, False),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("num_layers,bidirectional,lengths,bias,batch_first,with_h0", _TORCH_CASES)
def test_pallas_matches_torch(
    num_layers, bidirectional, lengths, bias, batch_first, with_h0, kernel
):
    torch.manual_seed(num_layers * 10 + bidirectional)
    ref = torch.nn.GRU(
        D, H, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional
    )
    x, h0, out_w, hn_w = _data(num_layers, num_layers, bidirectional, batch_first, with_h0)
    tx = torch.tensor(x, requires_grad=True)
    th0 = torch.tensor(h0, requires_grad=True) if with_h0 else None
    t_out, t_hn = _torch_run(ref, tx, th0, lengths, batch_first)
    (
        torch.sum(t_out * torch.from_numpy(out_w)) + torch.sum(t_hn * torch.from_numpy(hn_w))
    ).backward()

    params = from_torch(ref.state_dict())
    with _dispatch.interpret_kernel(kernel):
        out, hn, grads = _jax_run(
            params, x, h0, out_w, hn_w, lengths=lengths, batch_first=batch_first, impl="pallas"
        )
    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hn, t_hn.detach().numpy(), rtol=1e-5, atol=1e-6)
    if lengths is not None:
        # Padded steps are exactly 0.
        steps = np.arange(T)[None, :] if batch_first else np.arange(T)[:, None]
        lens = lengths[:, None] if batch_first else lengths[None, :]
        assert np.all(np.asarray(out)[steps >= lens] == 0)
    np.testing.assert_allclose(grads[1], tx.grad.numpy(), rtol=1e-4, atol=1e-5)
    if with_h0:
        np.testing.assert_allclose(grads[2], th0.grad.numpy(), rtol=1e-4, atol=1e-5)
    torch_grads = to_torch(grads[0])
    assert set(torch_grads) == {name for name, _ in ref.named_parameters()}
    for name, p in ref.named_parameters():
        np.testing.assert_allclose(torch_grads[name], p.grad.numpy(), rtol=1e-4, atol=1e-5)


def _params(seed, num_layers, bidirectional, bias):
    torch.manual_seed(seed)
    ref = torch.nn.GRU(D, H, num_layers, bias=bias, bidirectional=bidirectional)
    return from_torch(ref.state_dict())


def _assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **tol)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "reset_after,bias,batch_first,unroll", [(False, True, False, 4), (True, False, True, 1)]
)
def test_pallas_matches_xla(reset_after, bias, batch_first, unroll, kernel):
    """Both cell variants (torch has only reset-after) against the XLA path, within 1e-5;
    ``unroll=4`` leaves a remainder of the T=6 steps after the unrolled loop."""
    params = _params(5, 2, True, bias)
    x, h0, out_w, hn_w = _data(7, 2, True, batch_first, True)
    options = dict(lengths=LENGTHS, batch_first=batch_first, reset_after=reset_after, unroll=unroll)
    with _dispatch.interpret_kernel(kernel):
        got = _jax_run(params, x, h0, out_w, hn_w, impl="pallas", **options)
    want = _jax_run(params, x, h0, out_w, hn_w, impl="xla", **options)
    _assert_trees_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_pallas_bfloat16_matches_xla(kernel):
    """``dtype=jnp.bfloat16``: bfloat16 matmul inputs, float32 carry, on both paths; the
    two round the same operands, so they agree to well within bfloat16's precision."""
    params = _params(6, 1, True, True)
    x, h0, out_w, hn_w = _data(8, 1, True, True, True)
    options = dict(lengths=LENGTHS, dtype=jnp.bfloat16)
    with _dispatch.interpret_kernel(kernel):
        got = _jax_run(params, x, h0, out_w, hn_w, impl="pallas", **options)
    want = _jax_run(params, x, h0, out_w, hn_w, impl="xla", **options)
    _assert_trees_close(got, want, rtol=2e-2, atol=2e-2)
    assert got[0].dtype == jnp.float32


def test_linen_and_nnx_modules_with_pallas():
    """``impl="pallas"`` on both modules gives torch's outputs (shares the first torch
    case's configuration, so the forward compiles once for both modules)."""
    torch.manual_seed(3)
    ref = torch.nn.GRU(D, H, 2, batch_first=True, bidirectional=True)
    x, h0, _, _ = _data(9, 2, True, True, True)
    t_out, t_hn = _torch_run(ref, torch.from_numpy(x), torch.from_numpy(h0), LENGTHS, True)
    params = from_torch(ref.state_dict())
    linen = gru_jax.GRU(H, 2, bidirectional=True, impl="pallas")
    module = gru_jax.nnx.GRU.from_params(params, impl="pallas")
    for out, hn in (
        linen.apply({"params": params}, x, h0, lengths=LENGTHS),
        module(x, h0, lengths=LENGTHS),
    ):
        np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(hn, t_hn.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_no_steps_and_unbatched_input():
    """T=0 launches no kernel (empty output, h_n = h0); an unbatched (T, D) input runs as
    a batch of one: both as on the XLA path."""
    params = _params(4, 1, True, True)
    h0 = np.random.default_rng(4).standard_normal((2, 2, H)).astype(np.float32)
    out, hn = gru_jax.gru(params, np.zeros((2, 0, D), np.float32), h0, impl="pallas")
    assert out.shape == (2, 0, 2 * H)
    np.testing.assert_array_equal(hn, h0)
    x = np.random.default_rng(5).standard_normal((T, D)).astype(np.float32)
    got = gru_jax.gru(params, x, impl="pallas")
    want = gru_jax.gru(params, x, impl="xla")
    _assert_trees_close(got, want, rtol=1e-5, atol=1e-6)


def test_forward_mode_ad_raises():
    """Forward-mode AD is not supported by the kernel's custom VJP (the XLA path has it)."""
    params = _params(1, 1, False, True)
    x = jnp.ones((B, T, D), jnp.float32)

    def f(x):
        return gru_jax.gru(params, x, impl="pallas")[0]

    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(f, (x,), (x,))


def test_bench_times_pallas_off_the_cpu_only_unless_asked():
    """Interpret mode is no benchmark: the bench's default peers leave it out on the CPU."""
    from gru_jax.bench import _cli, _peers

    assert "pallas" not in _peers.default_peers("cpu")
    assert _peers.default_peers("gpu") == list(_peers.PEERS)
    assert "pallas" in _peers.PEERS and _cli.plan(True, peers=["pallas"]).peers == ["pallas"]
    if jax.default_backend() == "cpu":
        assert "pallas" not in _cli.plan(True).peers


def _gradient_step(params, x):
    def loss(params, x):
        out, hn = gru_jax.gru(params, x, lengths=LENGTHS, reset_after=False, impl="pallas")
        return jnp.sum(out) + jnp.sum(hn)

    return jax.grad(loss, argnums=(0, 1))(params, x)


def _forward(params, x):
    return gru_jax.gru(params, x, lengths=LENGTHS, impl="pallas")


@pytest.mark.parametrize(
    "platform,call", [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")]
)
def test_kernels_lower_for_gpu_and_tpu_from_a_cpu_host(platform, call):
    """An export for ``cuda`` (``tpu``) made here holds the compiled kernels, Triton
    (Mosaic) custom calls, one per direction-pass, for the forward and the gradient: the
    lowering is chosen for the platform exported for, not for this CPU."""
    params = _params(2, 1, True, True)
    x = jnp.ones((B, T, D), jnp.float32)
    for fn, kernels in (
        (_forward, {"gru_forward": 1}),
        (_gradient_step, {"gru_forward": 1, "gru_backward": 1}),
    ):
        text = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=[TRITON])(
            params, x
        ).mlir_module()
        assert text.count(call) == sum(kernels.values()), fn.__name__
        for name, count in kernels.items():
            assert text.count(name) >= count


def test_multi_platform_export_of_the_kernel_runs_on_the_cpu():
    """One artefact for the CPU, CUDA and TPU: each platform's branch lowers its own kernel
    (the CPU's interpreted), and called here it equals the direct call (to 1e-6)."""
    params = _params(2, 1, True, True)
    x = np.random.default_rng(3).standard_normal((B, T, D)).astype(np.float32)
    exported = jax.export.export(
        jax.jit(_gradient_step), platforms=["cpu", "cuda", "tpu"], disabled_checks=[TRITON]
    )(params, x)
    text = exported.mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 2 and text.count("tpu_custom_call") == 2
    # To the last bits: the multi-platform program is fused around its platform switch.
    _assert_trees_close(exported.call(params, x), _gradient_step(params, x), rtol=1e-6, atol=1e-6)


def test_symbolic_shapes_refuse_the_kernel_and_auto_takes_xla():
    """A symbolic batch or time: ``impl="pallas"`` raises a ValueError naming ``"xla"`` and
    ``"auto"``; ``impl="auto"`` exports (the XLA loops)."""
    params = _params(2, 1, False, True)
    for dims in ("b, 6, 3", "4, t, 3"):
        spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(dims), jnp.float32)
        with pytest.raises(ValueError, match='impl="pallas" needs concrete batch and time'):
            jax.export.export(jax.jit(lambda p, x: gru_jax.gru(p, x, impl="pallas")))(params, spec)
        exported = jax.export.export(jax.jit(lambda p, x: gru_jax.gru(p, x, impl="auto")))(
            params, spec
        )
        assert "gru_forward" not in exported.mlir_module()


def test_interpret_mode_warns_once():
    """On the CPU the kernel runs interpreted: a warning says so once, naming impl="xla"."""
    params = _params(2, 1, False, True)
    x = np.ones((B, T, D), np.float32)
    _pallas_platforms._warned = False
    with pytest.warns(UserWarning, match='interpret mode on the CPU.*impl="xla"'):
        gru_jax.gru(params, x, impl="pallas", unroll=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gru_jax.gru(params, x, impl="pallas", unroll=3)  # another compile, no second warning


def test_vmap_of_the_kernel():
    """``vmap`` over a leading axis runs the kernel batched, equal to a loop over the axis."""
    params = _params(2, 1, True, True)
    x = np.random.default_rng(6).standard_normal((2, B, T, D)).astype(np.float32)
    got = jax.vmap(lambda x: gru_jax.gru(params, x, lengths=LENGTHS, impl="pallas"))(x)
    for i in range(2):
        want = gru_jax.gru(params, x[i], lengths=LENGTHS, impl="xla")
        _assert_trees_close((got[0][i], got[1][i]), want, rtol=1e-5, atol=1e-6)
