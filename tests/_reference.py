"""A float64 NumPy GRU written from the cell's equations below, for tests to compare against.

Deliberately naive and independent of ``gru_jax``: one sequence at a time, one time step at a
time, one gate at a time, each written exactly as the equations read. Variable lengths follow
torch's ``PackedSequence``: a sequence of length ``n`` is simply the first ``n`` steps run
alone; everything past ``n`` is padding, which this code never reads.

Shape legend: B batch, T time, D input features, H hidden size, L layers, K directions.

Cell (gates ``r, z, n`` stacked in that order along the last axis of every parameter)::

    r  = sigmoid(x W_ir + b_ir + h W_hr + b_hr)
    z  = sigmoid(x W_iz + b_iz + h W_hz + b_hz)
    n  = tanh(x W_in + b_in + r * (h W_hn + b_hn))     # reset_after=True  (torch, cuDNN)
    n  = tanh(x W_in + b_in + (r * h) W_hn + b_hn)     # reset_after=False (Cho et al. 2014)
    h' = (1 - z) * n + z * h

The parameters use the gru_jax tree layout (the data format under test, not its code):
``{"layer_l": {"w_ih": (K, D_l, 3H), "w_hh": (K, H, 3H), "b_ih": (K, 3H), "b_hh": (K, 3H)}}``,
direction 0 forward, 1 reverse; ``b_*`` absent without bias.
"""

from __future__ import annotations

import numpy as np

__all__ = ["random_params", "reference_cell", "reference_gru", "to_numpy_tree"]


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def to_numpy_tree(params) -> dict:
    """Copies a params tree (of any array type) into float64 NumPy arrays."""
    return {
        layer: {name: np.asarray(value, dtype=np.float64) for name, value in cell.items()}
        for layer, cell in params.items()
    }


def random_params(
    rng,
    in_features: int,
    hidden: int,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    bias: bool = True,
    scale: float = 1.0,
    dtype=np.float32,
) -> dict:
    """A params tree of NumPy arrays drawn from ``scale * U(-1/sqrt(H), 1/sqrt(H))`` (torch).

    NumPy rather than ``jax.random``: tests build many trees of many shapes, and every new
    shape of an eager ``jax.random`` call costs a compilation.

    Args:
      rng: a ``np.random.Generator`` or an integer seed.
    """
    rng = np.random.default_rng(rng)
    num_dirs = 2 if bidirectional else 1
    bound = scale / np.sqrt(hidden)
    params = {}
    for layer in range(num_layers):
        d_in = in_features if layer == 0 else num_dirs * hidden
        shapes = {"w_ih": (num_dirs, d_in, 3 * hidden), "w_hh": (num_dirs, hidden, 3 * hidden)}
        if bias:
            shapes |= {"b_ih": (num_dirs, 3 * hidden), "b_hh": (num_dirs, 3 * hidden)}
        params[f"layer_{layer}"] = {
            k: rng.uniform(-bound, bound, s).astype(dtype) for k, s in shapes.items()
        }
    return params


def reference_cell(cell, h, x, *, reset_after: bool = True):
    """One GRU step for one sequence.

    Args:
      cell: ``{"w_ih": (D, 3H), "w_hh": (H, 3H)}`` and optionally ``"b_ih"``, ``"b_hh"`` (3H,).
      h: ``(H,)`` previous state.
      x: ``(D,)`` input.
      reset_after: variant of the candidate ``n`` (see module docstring).

    Returns:
      ``(H,)`` new state, float64.
    """
    h = np.asarray(h, np.float64)
    x = np.asarray(x, np.float64)
    hidden = h.shape[0]
    gate = {name: slice(i * hidden, (i + 1) * hidden) for i, name in enumerate("rzn")}
    w_ih, w_hh = cell["w_ih"], cell["w_hh"]
    zero = np.zeros(3 * hidden)
    b_ih, b_hh = cell.get("b_ih", zero), cell.get("b_hh", zero)

    def w_i(g):
        return w_ih[:, gate[g]]

    def w_h(g):
        return w_hh[:, gate[g]]

    r = _sigmoid(x @ w_i("r") + b_ih[gate["r"]] + h @ w_h("r") + b_hh[gate["r"]])
    z = _sigmoid(x @ w_i("z") + b_ih[gate["z"]] + h @ w_h("z") + b_hh[gate["z"]])
    if reset_after:
        n = np.tanh(x @ w_i("n") + b_ih[gate["n"]] + r * (h @ w_h("n") + b_hh[gate["n"]]))
    else:
        n = np.tanh(x @ w_i("n") + b_ih[gate["n"]] + (r * h) @ w_h("n") + b_hh[gate["n"]])
    return (1.0 - z) * n + z * h


def _one_sequence(params, x, h0, *, reset_after):
    """The whole stack on one unpadded sequence ``x`` ``(n, D)``; ``h0`` ``(L*K, H)``.

    Returns ``(output (n, K*H), h_n (L*K, H))``.
    """
    num_layers = len(params)
    num_dirs, hidden = params["layer_0"]["w_hh"].shape[:2]
    steps = x.shape[0]
    layer_in = x
    h_n = np.zeros((num_layers * num_dirs, hidden))
    for layer in range(num_layers):
        stacked = params[f"layer_{layer}"]
        out = np.zeros((steps, num_dirs * hidden))
        for k in range(num_dirs):
            cell = {name: value[k] for name, value in stacked.items()}
            h = h0[layer * num_dirs + k]
            order = range(steps) if k == 0 else range(steps - 1, -1, -1)
            for t in order:
                h = reference_cell(cell, h, layer_in[t], reset_after=reset_after)
                out[t, k * hidden : (k + 1) * hidden] = h
            h_n[layer * num_dirs + k] = h
        layer_in = out
    return layer_in, h_n


def reference_gru(params, x, h0=None, *, lengths=None, batch_first=True, reset_after=True):
    """``torch.nn.GRU`` (no dropout) in float64 NumPy, sequence by sequence, step by step.

    Args:
      params: a stack params tree (see module docstring); converted to float64.
      x: ``(B, T, D)`` if ``batch_first`` else ``(T, B, D)``, or unbatched ``(T, D)``.
      h0: ``(L*K, B, H)`` (unbatched ``(L*K, H)``) or ``None`` for zeros.
      lengths: ``(B,)`` integers in ``[0, T]`` (a scalar or ``None`` when unbatched), or
        ``None`` for full-length sequences.
      batch_first: layout of ``x`` and of the returned output.
      reset_after: cell variant.

    Returns:
      ``(output, h_n)`` in float64: ``output`` ``(B, T, K*H)`` (time-major if not
      ``batch_first``, ``(T, K*H)`` unbatched), exactly zero at ``t >= lengths[b]``;
      ``h_n`` ``(L*K, B, H)`` (``(L*K, H)`` unbatched): the forward direction's state after
      step ``lengths[b] - 1`` (``h0`` for length 0), the reverse direction's after step 0.
    """
    params = to_numpy_tree(params)
    x = np.asarray(x, np.float64)
    num_layers = len(params)
    num_dirs, hidden = params["layer_0"]["w_hh"].shape[:2]
    unbatched = x.ndim == 2
    if unbatched:
        xb = x[None]
        h0 = None if h0 is None else np.asarray(h0, np.float64)[:, None]
        lengths = None if lengths is None else np.reshape(lengths, (1,))
    else:
        xb = x if batch_first else np.swapaxes(x, 0, 1)  # (B, T, D)
    batch, steps = xb.shape[:2]
    states = num_layers * num_dirs
    h0 = np.zeros((states, batch, hidden)) if h0 is None else np.asarray(h0, np.float64)
    lengths = np.full(batch, steps) if lengths is None else np.asarray(lengths)
    output = np.zeros((batch, steps, num_dirs * hidden))
    h_n = np.zeros((states, batch, hidden))
    for b in range(batch):
        n = int(lengths[b])
        if not 0 <= n <= steps:
            raise ValueError(f"lengths[{b}] = {n} is outside [0, {steps}]")
        out_b, h_n[:, b] = _one_sequence(params, xb[b, :n], h0[:, b], reset_after=reset_after)
        output[b, :n] = out_b
    if unbatched:
        return output[0], h_n[:, 0]
    if not batch_first:
        output = np.swapaxes(output, 0, 1)
    return output, h_n
