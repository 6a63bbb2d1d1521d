"""The pieces of the XLA time loops that the strategies share, and the strategies' contract.

The contract (:class:`Strategy`, :class:`Options`, :func:`layer_output`): every strategy
is a function ``layer(lp, xs, h0, lengths, opts) -> (ys, h_n)`` of one layer's params, its
input in either layout, the initial states, the lengths (or ``None``) and the static
options; it runs every direction, and returns the layer output, zero at padded steps, and
the last states.
The strategies are :mod:`gru_jax._xla` (the reset-after loops with their custom JVP),
:mod:`gru_jax._scan` (the plain scan) and :mod:`gru_jax._pallas` (the fused kernel);
:mod:`gru_jax._dispatch` is the one place that names them.

The loops here run every direction of one layer over time; the reverse direction reads its
input valid-prefix-reversed (:func:`source`), so that every loop runs forward in time.

* :func:`inplace_forward`: the reset-after forward pass that keeps no gates: it writes each
  new state over a projection nothing reads again, in the caller's layout, and with
  ``lengths`` runs the rows sorted by length in phases that skip most padded steps.
* :func:`scan_with_partials`: the reset-after forward loop that also hands out the cell's
  partial derivatives, for :mod:`gru_jax._derivative`.
* :func:`gru_jax._remat.chunked_forward` (in a module of its own, with the chunking that the
  derivative shares): the reset-after forward pass of ``remat``, projecting the input chunk
  by chunk so that memory stays near the states.

Layout: the reset-after loops take the input projections as separate per-gate arrays and run
one ``(B, H) @ (H, 3H)`` hidden matmul per step and direction (batched over the directions),
sliced per gate: the layouts measured fastest on the CPU (see the performance docs).

This module imports jax and :mod:`gru_jax._cell`, :mod:`gru_jax._masking`.
"""

from __future__ import annotations

import functools
import itertools
import operator
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from gru_jax import _cell, _masking

# The unroll factor that ``unroll=None`` stands for off the CPU (measured on a GPU; see the
# performance docs): every loop iteration there costs kernel launches.
ACCELERATOR_UNROLL = 8

# Inference with lengths runs the rows sorted by length in up to this many phases, each over
# a static prefix of the rows (B, 3B/4, B/2, B/4) and only while a row of that prefix is
# alive, as torch's PackedSequence shrinks its batch. More phases skip more padding and cost
# compile time (each is a loop of its own); the performance docs have the measurements.
PHASES = 4


def default_unroll(backend: str | None = None) -> int:
    """The time loops' unroll factor that ``unroll=None`` stands for on ``backend``.

    ``1`` on the CPU, where a loop iteration is a few thunks and unrolling measured no
    faster; :data:`ACCELERATOR_UNROLL` (8) on any other backend, where every iteration
    costs kernel launches (measured on a GPU; a TPU takes the same value unmeasured).

    The loops read it for the platform they are compiled for, not the one that traces
    them: a CPU host exporting for ``cuda`` gets the accelerator's unroll.

    Args:
      backend: a JAX platform name (``"cpu"``, ``"gpu"``, ``"cuda"``, ``"tpu"``, ...);
        ``None``: the platform that computations go to by default: that of
        ``jax.default_device`` where one is set (say the CPU, on a machine with a GPU), else
        ``jax.default_backend()``.
    """
    return 1 if (backend or platform()) == "cpu" else ACCELERATOR_UNROLL


def platform() -> str:
    """The platform that computations go to at trace time: that of ``jax.default_device``
    where one is set (a device or a platform name), else ``jax.default_backend()``."""
    device = jax.config.jax_default_device
    if device is None:
        return jax.default_backend()
    return device if isinstance(device, str) else device.platform


def unrolled(loop, unroll: int | None, *args):
    """``loop(unroll, *args)``; ``unroll=None`` becomes the :func:`default_unroll` of the
    platform the call is compiled for: ``jax.lax.platform_dependent`` of one branch for the
    CPU and one for the accelerators, each traced once. Wrapped around a single loop (not a
    layer), the choice costs a second trace of one step."""
    if unroll is not None:
        return loop(unroll, *args)
    return jax.lax.platform_dependent(
        *args,
        cpu=functools.partial(loop, default_unroll("cpu")),
        default=functools.partial(loop, ACCELERATOR_UNROLL),
    )


def scan(body, init, xs, unroll: int | None):
    """``jax.lax.scan(body, init, xs, unroll=unroll)``, ``unroll=None`` as :func:`unrolled`."""
    return unrolled(lambda u, init, xs: jax.lax.scan(body, init, xs, unroll=u), unroll, init, xs)


def per_platform(fn, opts: Options, *args):
    """``fn(opts, *args)``, with ``opts.unroll=None`` resolved as :func:`unrolled` does."""
    return unrolled(lambda u, *a: fn(opts._replace(unroll=u), *a), opts.unroll, *args)


def check_unroll(unroll) -> int | None:
    """``unroll`` as an ``int >= 1``, or ``None`` (each platform's :func:`default_unroll`,
    chosen where the computation is lowered), else ``ValueError``."""
    if unroll is None:
        return None
    try:  # any integer type (Python or NumPy), but not a float or a bool
        value = None if isinstance(unroll, bool) else operator.index(unroll)
    except TypeError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"unroll must be an integer >= 1 or None; got {unroll!r}")
    return value


class Options(NamedTuple):
    """The static options of one layer, as every strategy takes them (hashable: a
    ``custom_jvp`` nondiff argument).

    ``time_axis``: the time axis of the layer's input and output (0: ``(T, B, ·)``, 1:
    ``(B, T, ·)``, a batch-first input read where it lies). ``unroll``: the time loops'
    unroll factor; ``None``: that of the platform each loop is compiled for
    (:func:`unrolled`; the Pallas kernel: where it is lowered).
    ``phases``: whether inference with lengths may run the rows sorted, in phases (see
    :func:`inplace_forward`). ``interpret_kernel``: which Pallas kernel the CPU interprets,
    ``"gpu"`` or ``"tpu"`` (tests of the TPU kernel).
    """

    unroll: int | None
    remat: bool
    compute_dtype: Any
    time_axis: int = 0
    phases: bool = True
    reset_after: bool = True
    interpret_kernel: str = "gpu"


class Strategy(Protocol):
    """The contract of every strategy: one layer, every direction."""

    def __call__(self, lp, xs, h0, lengths, opts: Options) -> tuple[jax.Array, jax.Array]:
        """Runs one layer over time.

        Args:
          lp: the layer's params, ``w_ih (K, D, 3H)``, ``w_hh (K, H, 3H)``, biases
            ``(K, 3H)``.
          xs: ``(T, B, D)`` (``(B, T, D)`` for ``opts.time_axis=1``), zero at padded steps.
          h0: ``(K, B, H)`` in the accumulation dtype (float32, or float64).
          lengths: ``int32[B]`` in ``[0, T]``, or ``None`` when every sequence is full.
          opts: the static options.

        Returns:
          ``(ys, h_n)``: ``ys`` ``(T, B, K*H)`` (``(B, T, K*H)``) in the accumulation dtype,
          zero at padded steps (:func:`layer_output`), and ``h_n`` ``(K, B, H)``, each
          direction's state after its last valid step (``h0`` for length 0).
        """


class Recurrence(NamedTuple):
    """A reset-after layer's recurrence, ready for the loops.

    ``w``: ``w_hh`` ``(K, H, 3H)`` in the compute dtype; ``b_ih``, ``b_hh``: ``(K, 3H)`` in
    the accumulation dtype, or ``None`` (no bias). The biases stay torch's two, added inside
    the step's elementwise fusions: ``b_ih`` to each gate's input projection, ``b_hh``
    whole to the hidden product. Folding part of ``b_hh`` into ``b_ih`` before the loop
    made a kernel for the sum and one per gate, each one more for XLA to compile.
    """

    w: jax.Array
    b_ih: jax.Array | None
    b_hh: jax.Array | None

    @classmethod
    def of(cls, w_hh, b_ih, b_hh, compute_dtype, acc_dtype) -> Recurrence:
        def cast(b):
            return None if b is None else b.astype(acc_dtype)

        return cls(w_hh.astype(compute_dtype), cast(b_ih), cast(b_hh))


# --------------------------------------------------------------------------------------------
# Pieces shared by the loops
# --------------------------------------------------------------------------------------------


def time_major(a, time_axis: int):
    """``a`` with its time axis (0 or 1) moved to the front (its own inverse)."""
    return jnp.swapaxes(a, 0, 1) if time_axis else a


def source(xs, lengths, k: int, time_axis: int = 0):
    """Direction ``k``'s input sequence in scan order (the reverse one valid-reversed)."""
    return xs if k == 0 else _masking.reverse_valid(xs, lengths, time_axis)


def layer_output(states, lengths, time_axis: int):
    """The layer output of the contract from the per-direction states in scan order.

    Args:
      states: per direction, ``(T, B, H)`` (``(B, T, H)`` for ``time_axis=1``), the reverse
        direction's valid-reversed; padded steps unspecified.
      lengths: ``int32[B]`` or ``None``.
      time_axis: 0 or 1.

    Returns:
      ``(T, B, K*H)`` (``(B, T, K*H)``): the reverse direction put back in forward order,
      the directions concatenated, padded steps exactly 0.
    """
    y = states[0]
    if len(states) == 2:
        y = jnp.concatenate([y, _masking.reverse_valid(states[1], lengths, time_axis)], axis=-1)
    if lengths is not None:
        mask = _masking.time_mask(lengths, y.shape[time_axis], time_axis)
        y = jnp.where(mask, y, jnp.zeros((), y.dtype))
    return y


def mm(a, w, compute_dtype, acc_dtype, spec: str = "...i,io->...o"):
    """``a @ w`` (or another 2-operand ``spec``) with inputs in ``compute_dtype``.

    Leading axes of ``a`` are flattened into one: a 2-D matmul, whose transposes (the weight
    gradients) XLA:CPU runs faster than those of a ``(T, B, D)`` einsum.
    """
    a, w = a.astype(compute_dtype), w.astype(compute_dtype)
    if a.ndim > 2 and spec == "...i,io->...o":
        out = jnp.matmul(a.reshape(-1, a.shape[-1]), w, preferred_element_type=acc_dtype)
        return out.reshape((*a.shape[:-1], w.shape[-1]))
    return jnp.einsum(spec, a, w, preferred_element_type=acc_dtype)


def project(src, w_ih_k, compute_dtype, acc_dtype):
    """``[x_r, x_z, x_n]``: the ``(T, B, H)`` input projections of one direction, no bias.

    The bias is added where the projections are read (inside the loop's elementwise fusion),
    which saves a pass over these arrays.
    """
    hidden = w_ih_k.shape[-1] // 3
    return [
        mm(src, w_ih_k[:, g * hidden : (g + 1) * hidden], compute_dtype, acc_dtype)
        for g in range(3)
    ]


def project_fused(xs, w_ih, bias_x, lengths, compute_dtype, acc_dtype):
    """Per direction, ``x @ w_ih + bias_x`` of every step in scan order, ``(T, B, 3H)``: the
    input projection as one matmul outside the recurrence, gates fused (the loops that read
    them whole: :mod:`gru_jax._scan` and the Pallas kernel).

    Args:
      xs: ``(T, B, D)``, zero at padded steps.
      w_ih: ``(K, D, 3H)``; bias_x: ``(K, 3H)`` or ``None`` (see
        :func:`gru_jax._cell.split_bias`).
      lengths: ``int32[B]`` or ``None``.
      compute_dtype, acc_dtype: of the matmul inputs and of its result.
    """
    xs_c, w_ih_c = xs.astype(compute_dtype), w_ih.astype(compute_dtype)
    out = []
    for k in range(w_ih.shape[0]):
        xp_k = jnp.einsum(
            "tbd,dg->tbg", source(xs_c, lengths, k), w_ih_c[k], preferred_element_type=acc_dtype
        )
        out.append(xp_k if bias_x is None else xp_k + bias_x[k].astype(acc_dtype)[None, None])
    return out


def hidden_matmuls(hs, w, compute_dtype, transposed: bool = False):
    """``[hs[k] @ w[k]]`` for the ``K`` directions (``w``: ``(K, H, 3H)``; ``transposed``:
    ``(K, 3H, H)``, used as ``hs[k] @ w[k].T``).

    The forward loops run two directions as one matmul batched over ``K``; the tangent loop
    (whose transpose is the backward loop) as separate matmuls: each the faster on the CPU.
    """
    acc_dtype = hs[0].dtype
    spec = "bi,oi->bo" if transposed else "bi,io->bo"
    if len(hs) == 1 or transposed:
        return [mm(h, w[k], compute_dtype, acc_dtype, spec) for k, h in enumerate(hs)]
    out = mm(jnp.stack(hs), w, compute_dtype, acc_dtype, "kbi,kio->kbo")
    return [out[k] for k in range(len(hs))]


def step(hs, x_t, m_t, rec: Recurrence, compute_dtype, *, partials: bool = False):
    """One reset-after time step of every direction.

    Args:
      hs: per direction, the state ``(B, H)``.
      x_t: per direction, its three ``(B, H)`` input projections of this step, without
        bias.
      m_t: ``bool[B, 1]``, False where the step is past a sequence's end, or ``None``.
      rec: the recurrence (:class:`Recurrence`).
      compute_dtype: dtype of the matmul inputs.
      partials: also return the cell's partial derivatives
        (:func:`gru_jax._cell.reset_after_partials`) per direction, packed as
        :func:`scan_with_partials` hands them out.

    Returns:
      ``new_hs``, or ``(new_hs, partials)``.
    """
    hps = hidden_matmuls(hs, rec.w, compute_dtype)
    new, saved = [], []
    for k, h in enumerate(hs):
        hidden = h.shape[-1]
        b_ih = None if rec.b_ih is None else rec.b_ih[k]
        b_hh = None if rec.b_hh is None else rec.b_hh[k]
        b_x = (None,) * 3 if b_ih is None else _cell.gates(b_ih, hidden)
        x = tuple(_cell.plus(x_g, b) for x_g, b in zip(x_t[k], b_x, strict=True))
        args = _cell.wire(x, _cell.gates(_cell.plus(hps[k], b_hh), hidden))
        if partials:
            h_new, (d_r, d_z, d_xn, d_hn, d_h) = _cell.reset_after_partials(*args, h)
            # Packed per step as the tangent loop reads them: the three hidden-side
            # coefficients side by side (one (B, 3H) block), then x_n's and h's.
            saved.append((jnp.concatenate([d_r, d_z, d_hn], axis=-1), d_xn, d_h))
        else:
            h_new = _cell.reset_after_cell(*args, h)
        if m_t is not None:
            # Past a sequence's end its state is frozen, as with torch's PackedSequence.
            h_new = jnp.where(m_t, h_new, h)
        new.append(h_new)
    return (tuple(new), tuple(saved)) if partials else tuple(new)


# --------------------------------------------------------------------------------------------
# The in-place (phased) forward pass
# --------------------------------------------------------------------------------------------


def run_steps(opts: Options, carry, xg, rec: Recurrence, lengths, *, start, stop,
              n_from_states: bool, origin=0, rows=None):  # fmt: skip
    """Steps ``[start, stop)`` of a loop that keeps no gates, writing the states in place.

    Args:
      opts: the loop options; ``opts.time_axis`` is that of ``xg`` and ``states``.
      carry: ``(hs, states)``: the current state per direction, and per direction the array
        that step ``t``'s state is written into (at ``t`` along the time axis).
      xg: per direction, its three input projections, step ``t`` at position ``t - origin``.
      rec: the recurrence.
      lengths: ``int32[B]`` or ``None``.
      start, stop: the steps to run; traced bounds run without unrolling.
      n_from_states: read the ``n`` gate's projection of step ``t`` from ``states`` instead
        of ``xg`` (the states overwrite it, see :func:`inplace_forward`).
      origin: the step at position 0 of ``xg``.
      rows: only the first ``rows`` sequences step (``hs`` then holds those rows); ``None``:
        all of them.

    Returns:
      The carry after step ``stop - 1``.
    """
    ax, cd = opts.time_axis, opts.compute_dtype

    def starts(a, t):
        # One index dtype for the dynamic slices (int64 zeros under x64, int32 bounds).
        out = [jnp.int32(0)] * a.ndim
        out[ax] = jnp.asarray(t, jnp.int32)
        return out

    def at(a, j):
        if rows is None:
            return jax.lax.dynamic_index_in_dim(a, j, ax, False)
        sizes = [*a.shape[:ax], 1, *a.shape[ax + 1 :]]
        sizes[1 - ax] = rows
        return jax.lax.squeeze(jax.lax.dynamic_slice(a, starts(a, j), sizes), (ax,))

    def put(a, h, t):
        if rows is None:
            return jax.lax.dynamic_update_index_in_dim(a, h, t, ax)
        return jax.lax.dynamic_update_slice(a, jnp.expand_dims(h, ax), starts(a, t))

    alive = None if lengths is None else lengths[:rows]

    def body(t, carry):
        hs, states = carry
        i = t if isinstance(origin, int) and origin == 0 else t - origin
        x_t = [
            (at(g[0], i), at(g[1], i), at(st, t) if n_from_states else at(g[2], i))
            for g, st in zip(xg, states, strict=True)
        ]
        # In scan order both directions are valid for t < length.
        m_t = None if alive is None else (t < alive)[:, None]
        hs = step(hs, x_t, m_t, rec, cd)
        states = tuple(put(st, h, t) for st, h in zip(states, hs, strict=True))
        return hs, states

    static_bounds = isinstance(start, int) and isinstance(stop, int)
    if not static_bounds:
        return jax.lax.fori_loop(start, stop, body, carry)
    return unrolled(
        lambda u, carry: jax.lax.fori_loop(start, stop, body, carry, unroll=u), opts.unroll, carry
    )


def phase_bounds(batch: int, phases: int) -> list[int]:
    """``0 = b_0 < b_1 < ... < b_P = B``: the row prefixes ``[0, b_j)`` of the phases."""
    return sorted({round(j * batch / phases) for j in range(phases + 1)})


def inplace_forward(opts: Options, xs, w_ih, b_ih, w_hh, b_hh, h0, lengths):
    """The reset-after forward pass that keeps no gates (inference), in ``opts.time_axis``'s
    layout.

    The primal of the reset-after strategy (:mod:`gru_jax._xla`). The
    input projections of all steps come first; the loop then reads step ``t`` of them and
    writes the new state into the slot of the ``n`` gate's projection of step ``t``, which
    nothing reads again: that array leaves the loop as the states, so the output needs no
    buffer of its own. A batch-first input is read where it lies and its output written
    batch-first, without transposing either.

    With ``lengths``, ``unroll=1`` and ``opts.phases`` the rows run sorted by length, in
    phases (see :data:`PHASES`), so that most padded steps are skipped (their states are left
    unwritten: the caller masks the output). Phases need traced loop bounds, which rule out
    unrolling, and static row counts, which rule out a symbolic batch size.

    Args:
      opts: the loop options.
      xs: ``(T, B, D)`` (``(B, T, D)`` for ``time_axis=1``), zero at padded steps.
      w_ih: ``(K, D, 3H)``; w_hh: ``(K, H, 3H)``; b_ih, b_hh: ``(K, 3H)``, or both
        ``None``.
      h0: ``(K, B, H)`` in the accumulation dtype.
      lengths: ``int32[B]`` or ``None``.

    Returns:
      ``(states, h_last)``: per direction the states in scan order, in the input's layout,
      and the last states ``(B, H)``.
    """
    if opts.unroll is None:  # the CPU's loop runs phased, the accelerators' unrolled
        return per_platform(inplace_forward, opts, xs, w_ih, b_ih, w_hh, b_hh, h0, lengths)
    ax = opts.time_axis
    acc_dtype, cd = h0.dtype, opts.compute_dtype
    num_dirs = w_hh.shape[0]
    steps, batch = xs.shape[ax], xs.shape[1 - ax]
    rec = Recurrence.of(w_hh, b_ih, b_hh, cd, acc_dtype)
    phased = opts.phases and lengths is not None and steps > 0 and batch > 0 and opts.unroll == 1
    if phased:
        order = jnp.argsort(-lengths, stable=True)
        lengths = lengths[order]
        xs = jnp.take(xs, order, axis=1 - ax)
        h0 = jnp.take(h0, order, axis=1)
    xg = [project(source(xs, lengths, k, ax), w_ih[k], cd, acc_dtype) for k in range(num_dirs)]
    hs, states = tuple(h0[k] for k in range(num_dirs)), tuple(g[2] for g in xg)
    if not phased:
        if steps:
            hs, states = run_steps(
                opts, (hs, states), xg, rec, lengths, start=0, stop=steps, n_from_states=True
            )
        return states, hs
    start = 0
    for lo, rows in reversed(list(itertools.pairwise(phase_bounds(batch, min(PHASES, batch))))):
        # Rows [0, rows) step while row `lo` (the longest of those the next phase drops)
        # is alive; sorted lengths make the phases contiguous in time.
        stop = lengths[lo]
        sub, states = run_steps(
            opts, (tuple(h[:rows] for h in hs), states), xg, rec, lengths,
            start=start, stop=stop, n_from_states=True, rows=rows,
        )  # fmt: skip
        hs = tuple(jnp.concatenate([a, h[rows:]]) for a, h in zip(sub, hs, strict=True))
        start = stop
    unsort = jnp.argsort(order)
    return (
        tuple(jnp.take(st, unsort, axis=1 - ax) for st in states),
        tuple(jnp.take(h, unsort, axis=0) for h in hs),
    )


# --------------------------------------------------------------------------------------------
# The scan that hands out partial derivatives (for the derivative)
# --------------------------------------------------------------------------------------------


def scan_with_partials(xg, rec: Recurrence, h0, mask, opts: Options):
    """The reset-after forward loop that also hands out the cell's partial derivatives,
    time-major; chosen by :mod:`gru_jax._derivative` for every stretch it linearizes.

    Args:
      xg: per direction, its three ``(T, B, H)`` input projections in scan order.
      rec: the recurrence.
      h0: per direction, the state before the first step, ``(B, H)``.
      mask: ``bool[T, B, 1]`` or ``None``.
      opts: the loop options.

    Returns:
      ``(h_last, (states, partials))``: per direction the state after each sequence's last
      step, the ``(T, B, H)`` states, and the partial derivatives of
      :func:`gru_jax._cell.reset_after_partials` packed as ``(d_g, d_xn, d_h)``:
      ``d_g = [∂h'/∂a_r, ∂h'/∂a_z, ∂h'/∂hn]`` ``(T, B, 3H)``, ``∂h'/∂x_n`` and ``∂h'/∂h``
      ``(T, B, H)``.
    """

    def body(hs, inputs):
        new, partials = step(hs, *inputs, rec, opts.compute_dtype, partials=True)
        return new, (new, partials)

    return scan(body, tuple(h0), (xg, mask), opts.unroll)
