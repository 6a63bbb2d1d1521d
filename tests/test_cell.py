"""GRUCell: torch.nn.GRUCell parity, seed 001's step loop, and use inside flax.linen.RNN."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gru_jax
from gru_jax.interop import from_torch, to_torch

torch.set_num_threads(1)


@pytest.mark.parametrize("bias", [True, False])
def test_cell_matches_torch_grucell_values_and_gradients(bias):
    torch.manual_seed(1)
    ref = torch.nn.GRUCell(3, 4, bias=bias)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    h = rng.standard_normal((5, 4)).astype(np.float32)
    tx, th = torch.tensor(x, requires_grad=True), torch.tensor(h, requires_grad=True)
    t_new = ref(tx, th)
    (t_new**2).sum().backward()

    params = from_torch(ref.state_dict())
    assert set(params) == ({"w_ih", "w_hh", "b_ih", "b_hh"} if bias else {"w_ih", "w_hh"})
    cell = gru_jax.GRUCell(4, bias=bias)

    def loss(p, h, x):
        new, out = cell.apply({"params": p}, h, x)
        return jnp.sum(new**2), (new, out)

    (g_p, g_h, g_x), (new, out) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(params, h, x)
    np.testing.assert_allclose(new, t_new.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(new, out)
    np.testing.assert_allclose(g_x, tx.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_h, th.grad.numpy(), rtol=1e-5, atol=1e-6)
    for name, grad in to_torch(g_p).items():
        np.testing.assert_allclose(
            grad, dict(ref.named_parameters())[name].grad.numpy(), 1e-5, 1e-6
        )


def test_seed_001_step_loop_without_bias():
    """Seed 001: GRUCell(3, 4, bias=False) stepped over L=2 time steps of a batch of 1."""
    torch.manual_seed(666)
    inputs = torch.randn(2, 1, 3)
    h = torch.randn(1, 4)
    ref = torch.nn.GRUCell(3, 4, bias=False)
    cell = gru_jax.GRUCell(4, bias=False)
    variables = {"params": from_torch(ref.state_dict())}
    h_jax = h.numpy()
    for i in range(inputs.shape[0]):
        h = ref(inputs[i], h)
        h_jax, _ = cell.apply(variables, h_jax, inputs[i].numpy())
        np.testing.assert_allclose(h_jax, h.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_cell_init_is_torch_uniform_and_carry_is_zero():
    cell = gru_jax.GRUCell(16)
    variables = cell.init(jax.random.key(0), jnp.zeros((2, 16)), jnp.zeros((2, 8)))
    params = variables["params"]
    assert params["w_ih"].shape == (8, 48) and params["w_hh"].shape == (16, 48)
    for leaf in jax.tree.leaves(params):
        assert float(jnp.max(jnp.abs(leaf))) <= 1 / 4  # U(-1/sqrt(16), 1/sqrt(16))
    carry = cell.initialize_carry(jax.random.key(1), (2, 8))
    np.testing.assert_array_equal(carry, np.zeros((2, 16), np.float32))


def _stack_from_cells(*cells):
    """A one-layer stack tree whose directions are the given cells."""
    return {"layer_0": {k: jnp.stack([c[k] for c in cells]) for k in cells[0]}}


def test_cell_in_flax_rnn_equals_gru_with_lengths():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 6, 5)).astype(np.float32)
    lengths = jnp.array([6, 2, 4])
    rnn = nn.RNN(gru_jax.GRUCell(7))
    variables = rnn.init(jax.random.key(0), x)
    ys = rnn.apply(variables, x, seq_lengths=lengths)
    cell = variables["params"]["cell"]
    out, h_n = gru_jax.gru(_stack_from_cells(cell), x, lengths=lengths)
    valid = np.arange(6)[None, :, None] < np.asarray(lengths)[:, None, None]
    # nn.RNN leaves garbage past each length; only the valid part is defined there.
    np.testing.assert_allclose(np.where(valid, ys, 0), out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ys[np.arange(3), np.asarray(lengths) - 1], h_n[0], 1e-5, 1e-6)


def test_cell_in_flax_bidirectional_equals_bidirectional_gru():
    x = np.random.default_rng(5).standard_normal((2, 5, 3)).astype(np.float32)
    lengths = jnp.array([5, 3])
    bi = nn.Bidirectional(nn.RNN(gru_jax.GRUCell(4)), nn.RNN(gru_jax.GRUCell(4)))
    variables = bi.init(jax.random.key(0), x)
    ys = bi.apply(variables, x, seq_lengths=lengths)
    p = variables["params"]
    params = _stack_from_cells(p["forward_rnn"]["cell"], p["backward_rnn"]["cell"])
    out, _ = gru_jax.gru(params, x, lengths=lengths)
    valid = np.arange(5)[None, :, None] < np.asarray(lengths)[:, None, None]
    np.testing.assert_allclose(np.where(valid, ys, 0), out, rtol=1e-5, atol=1e-6)
