"""Oracle: torch.nn.GRU with the same weights gives the same outputs, h_n and gradients."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gru_jax
from gru_jax.interop import from_torch, to_torch

torch.set_num_threads(1)

D, H, T, B = 5, 6, 7, 4

# Every (num_layers, bidirectional, variable lengths) combination; bias, batch_first and h0
# vary across them so that each value of each option meets the others.
_CASES = [
    (layers, bidir, var_len, i % 2 == 0, (i // 2) % 2 == 0, i % 3 != 0)
    for i, (layers, bidir, var_len) in enumerate(
        itertools.product((1, 2, 3), (False, True), (False, True))
    )
]


def _torch_run(module, x, h0, lengths, batch_first):
    """Runs torch with packed sequences when lengths are given; returns padded output."""
    if lengths is None:
        return module(x, h0)
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        x, torch.as_tensor(lengths), batch_first=batch_first, enforce_sorted=False
    )
    out, h_n = module(packed, h0)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(
        out, batch_first=batch_first, total_length=x.shape[1 if batch_first else 0]
    )
    return out, h_n


@pytest.mark.parametrize("num_layers,bidirectional,var_len,bias,batch_first,with_h0", _CASES)
def test_gru_matches_torch_outputs_and_gradients(
    num_layers, bidirectional, var_len, bias, batch_first, with_h0
):
    rng = np.random.default_rng(num_layers * 100 + bidirectional * 10 + var_len)
    torch.manual_seed(int(rng.integers(1 << 30)))
    ref = torch.nn.GRU(
        D, H, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional
    )
    k = 2 if bidirectional else 1
    shape = (B, T, D) if batch_first else (T, B, D)
    x = rng.standard_normal(shape).astype(np.float32)
    h0 = rng.standard_normal((num_layers * k, B, H)).astype(np.float32) if with_h0 else None
    lengths = np.array([T, 1, 4, 6]) if var_len else None
    out_w = rng.standard_normal((*shape[:2], k * H)).astype(np.float32)
    hn_w = rng.standard_normal((num_layers * k, B, H)).astype(np.float32)

    # torch: loss = <out, out_w> + <h_n, hn_w>, gradients w.r.t. x, h0 and every weight.
    tx = torch.tensor(x, requires_grad=True)
    th0 = torch.tensor(h0, requires_grad=True) if with_h0 else None
    t_out, t_hn = _torch_run(ref, tx, th0, lengths, batch_first)
    t_loss = (t_out * torch.from_numpy(out_w)).sum() + (t_hn * torch.from_numpy(hn_w)).sum()
    t_loss.backward()

    params = from_torch(ref.state_dict())
    model = gru_jax.GRU(
        H, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional
    )

    def loss(params, x, h0):
        out, hn = model.apply({"params": params}, x, h0, lengths=lengths)
        return jnp.sum(out * out_w) + jnp.sum(hn * hn_w), (out, hn)

    grads, (out, hn) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(params, x, h0)
    g_params, g_x, g_h0 = grads

    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hn, t_hn.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_x, tx.grad.numpy(), rtol=1e-4, atol=1e-5)
    if with_h0:
        np.testing.assert_allclose(g_h0, th0.grad.numpy(), rtol=1e-4, atol=1e-5)
    torch_grads = to_torch(g_params)
    assert set(torch_grads) == {name for name, _ in ref.named_parameters()}
    for name, p in ref.named_parameters():
        np.testing.assert_allclose(torch_grads[name], p.grad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_unbatched_input_matches_torch(bidirectional):
    torch.manual_seed(3)
    ref = torch.nn.GRU(D, H, 2, bidirectional=bidirectional)
    k = 2 if bidirectional else 1
    x = np.random.default_rng(0).standard_normal((T, D)).astype(np.float32)
    h0 = np.random.default_rng(1).standard_normal((2 * k, H)).astype(np.float32)
    t_out, t_hn = ref(torch.from_numpy(x), torch.from_numpy(h0))
    out, hn = gru_jax.GRU(H, 2, bidirectional=bidirectional).apply(
        {"params": from_torch(ref.state_dict())}, x, h0
    )
    assert out.shape == (T, k * H) and hn.shape == (2 * k, H)
    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hn, t_hn.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_seed_004_gru_5_6_2_with_explicit_h0():
    """Seed 004: ``nn.GRU(5, 6, 2)``, time-major input (1, 3, 5) and h0 (2, 3, 6)."""
    torch.manual_seed(0)
    ref = torch.nn.GRU(5, 6, 2)
    x, h0 = torch.randn(1, 3, 5), torch.randn(2, 3, 6)
    t_out, t_hn = ref(x, h0)
    out, hn = gru_jax.GRU(6, 2, batch_first=False).apply(
        {"params": from_torch(ref.state_dict())}, x.numpy(), h0.numpy()
    )
    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hn, t_hn.detach().numpy(), rtol=1e-5, atol=1e-6)
    # The last layer's final state is the last output step, as the seed prints.
    np.testing.assert_array_equal(hn[-1], out[-1])


def test_random_configurations_match_torch_under_jit():
    """Random options with packed variable lengths, the issue's 'done when' check, jitted."""
    rng = np.random.default_rng(2026)
    for _ in range(4):
        num_layers = int(rng.integers(1, 4))
        bidirectional, bias, batch_first = (bool(v) for v in rng.integers(0, 2, 3))
        d, h, t, b = (int(v) for v in rng.integers(1, 9, 4))
        torch.manual_seed(int(rng.integers(1 << 30)))
        ref = torch.nn.GRU(
            d, h, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional
        )
        shape = (b, t, d) if batch_first else (t, b, d)
        x = rng.standard_normal(shape).astype(np.float32)
        lengths = rng.integers(1, t + 1, b)
        t_out, t_hn = _torch_run(ref, torch.from_numpy(x), None, lengths, batch_first)
        model = gru_jax.GRU(
            h, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional
        )
        run = jax.jit(lambda p, x, n, m=model: m.apply({"params": p}, x, lengths=n))
        out, hn = run(from_torch(ref.state_dict()), x, jnp.asarray(lengths))
        np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(hn, t_hn.detach().numpy(), rtol=1e-5, atol=1e-6)
