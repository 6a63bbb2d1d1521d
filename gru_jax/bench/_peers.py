"""The implementations the harness times: gru_jax and its peers, all on the same weights.

Every builder takes a :class:`Case` (a config and its data: our params tree, ``x``, lengths)
and returns an :class:`Impl` whose ``forward()`` and ``train_step()`` run once, block until
the result is ready and return it. ``forward()`` returns the output sequence
``(B, T, K*H)`` so that tests can check that every peer computes the same function as ours
(compare at valid steps only: peers differ in what they write at padded steps).

``train_step()`` is the gradient of the loss ``mean(output ** 2)`` (over valid steps) with
respect to every parameter (not the input), as a training step would compute it.

``forward()`` leaves its result where it was computed (a JAX array, or a torch tensor on
the GPU when torch runs there); :func:`as_numpy` brings any of them to the host.

A case's ``dtype`` is ``"float32"`` or ``"bfloat16"``: with the latter every implementation
runs its own bfloat16 mode (see :data:`DTYPES`), and ``forward()`` returns float32 all the
same.

A builder raises :class:`Unavailable` when its library is missing or cannot run the case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import gru_jax

# The cases: re-exported, so that the harness and tests name them as peers' inputs.
from gru_jax.bench._cases import (
    BFLOAT16_RECIPES,
    DTYPES,
    Case,
    Config,
    Unavailable,
    make_case,
)

# The peers get our weights through the package's own converters.
from gru_jax.interop import _keras_weights, to_flax_linen_gru_cell, to_torch

__all__ = [
    "BFLOAT16_RECIPES",
    "DTYPES",
    "PEERS",
    "Case",
    "Config",
    "Impl",
    "Unavailable",
    "as_numpy",
    "default_peers",
    "loss_weights",
    "make_case",
    "torch_device",
    "torch_threads",
]


@dataclasses.dataclass
class Impl:
    """A runnable implementation: ``forward()`` and ``train_step()`` each run once and block."""

    name: str
    forward: Callable[[], Any]
    train_step: Callable[[], Any]
    note: str = ""


def _block(tree):
    return jax.block_until_ready(tree)


def as_numpy(out) -> np.ndarray:
    """A ``forward()`` result (a JAX array, or a torch tensor on any device) as float32 NumPy."""
    if hasattr(out, "detach"):  # torch
        out = out.detach().cpu().float().numpy()
    return np.asarray(out, np.float32)


@contextlib.contextmanager
def _default_promotion():
    """JAX's default promotion rules, for building and tracing third-party peers.

    Peers are not written for ``jax_numpy_rank_promotion="raise"`` or strict dtype promotion
    (our test suite's settings); gru_jax itself is always traced under the caller's settings.
    """
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        yield


def _lenient(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run under :func:`_default_promotion`."""

    def call():
        with _default_promotion():
            return fn()

    return call


def loss_weights(case: Case) -> np.ndarray:
    """``(B, T, 1)`` float32 weights of the loss: ``1 / (number of valid steps)`` at valid
    steps, 0 at padded ones (peers differ in what they output there)."""
    valid = case.valid_steps()
    w = valid / max(1, int(valid.sum()))
    return w[..., None].astype(np.float32)


def _loss(out, weights):
    """The training loss of every peer: the mean of ``out ** 2`` over valid steps."""
    return jnp.sum(jnp.square(out) * weights)


# --------------------------------------------------------------------------------------------
# gru_jax
# --------------------------------------------------------------------------------------------


def build_ours(case: Case, **options) -> Impl:
    """gru_jax's linen ``GRU`` under ``jax.jit``; ``options`` go to the module (``remat`` ...)."""
    cfg = case.config
    if case.bf16:
        options = {"dtype": jnp.bfloat16, **options}
    model = gru_jax.GRU(
        hidden_size=cfg.hidden,
        num_layers=cfg.layers,
        bidirectional=cfg.bidirectional,
        **options,
    )
    variables = {"params": jax.tree.map(jnp.asarray, case.params)}
    x = jnp.asarray(case.x)
    lengths = None if case.lengths is None else jnp.asarray(case.lengths)

    def apply(v, x, lengths):
        return model.apply(v, x, lengths=lengths)[0]

    fwd = jax.jit(apply)
    weights = jnp.asarray(loss_weights(case))
    grad = jax.jit(jax.grad(lambda v, x, lengths: _loss(apply(v, x, lengths), weights)))
    return Impl(
        "gru_jax",
        lambda: _block(fwd(variables, x, lengths)),
        lambda: _block(grad(variables, x, lengths)),
    )


def build_pallas(case: Case) -> Impl:
    """gru_jax with ``impl="pallas"``: the fused Pallas kernel (interpret mode on the CPU).

    Off the CPU both passes run once here, so that a kernel the GPU compiler rejects (one
    too large for the chip, say) is a skipped peer with its reason rather than a failed run.
    """
    impl = dataclasses.replace(build_ours(case, impl="pallas"), name="gru_jax (pallas)")
    if jax.default_backend() != "cpu":
        try:
            impl.forward()
            impl.train_step()
        except Exception as e:  # any compiler or launch error: the report names it
            raise Unavailable(f"kernel failed: {type(e).__name__}: {str(e)[:300]}") from e
    return impl


# --------------------------------------------------------------------------------------------
# flax.linen.RNN(GRUCell), stacked and made bidirectional by hand
# --------------------------------------------------------------------------------------------


def _with_default_promotion(build):
    @functools.wraps(build)
    def wrapped(case: Case) -> Impl:
        with _default_promotion():
            return build(case)

    return wrapped


@_with_default_promotion
def build_flax(case: Case) -> Impl:
    """``flax.linen.RNN(GRUCell)`` per layer, ``nn.Bidirectional`` for two directions."""
    try:
        import flax.linen as nn
    except ImportError as e:  # pragma: no cover - flax is a dependency
        raise Unavailable(f"flax not importable: {e}") from e
    cfg = case.config
    # bfloat16 matmul inputs and gate math, float32 params (flax's mixed precision).
    cell_dtype = jnp.bfloat16 if case.bf16 else None

    class FlaxStack(nn.Module):
        @nn.compact
        def __call__(self, x, seq_lengths=None):
            for i in range(cfg.layers):
                # Cells named explicitly: their params sit at the top level, "l{i}_d{k}".
                fwd = nn.RNN(nn.GRUCell(cfg.hidden, dtype=cell_dtype, name=f"l{i}_d0"))
                if cfg.bidirectional:
                    cell = nn.GRUCell(cfg.hidden, dtype=cell_dtype, name=f"l{i}_d1")
                    bwd = nn.RNN(cell, reverse=True, keep_order=True)
                    x = nn.Bidirectional(fwd, bwd)(x, seq_lengths=seq_lengths)
                else:
                    x = fwd(x, seq_lengths=seq_lengths)
            return x

    model = FlaxStack()
    # flax has no b_hr, b_hz: the converter folds them into its input biases (same function).
    params = {
        f"l{i}_d{k}": to_flax_linen_gru_cell(gru_jax.cell_of(case.params, i, k))
        for i in range(cfg.layers)
        for k in range(cfg.directions)
    }
    variables = {"params": jax.tree.map(jnp.asarray, params)}
    x = jnp.asarray(case.x)
    lengths = None if case.lengths is None else jnp.asarray(case.lengths)

    def apply(v, x, lengths):
        return model.apply(v, x, seq_lengths=lengths).astype(jnp.float32)

    fwd = jax.jit(apply)
    weights = jnp.asarray(loss_weights(case))
    grad = jax.jit(jax.grad(lambda v, x, lengths: _loss(apply(v, x, lengths), weights)))
    return Impl(
        "flax.linen.RNN(GRUCell)",
        _lenient(lambda: _block(fwd(variables, x, lengths))),
        _lenient(lambda: _block(grad(variables, x, lengths))),
    )


# --------------------------------------------------------------------------------------------
# Keras 3 layers.GRU on the JAX backend
# --------------------------------------------------------------------------------------------


@_with_default_promotion
def build_keras(case: Case) -> Impl:
    """Keras 3 ``layers.GRU`` (``Bidirectional`` for two directions), jitted stateless call.

    Lengths become a ``(B, T)`` boolean mask: Keras then freezes the state at masked steps,
    and ``go_backwards`` with right padding runs the valid prefix in reverse, as torch does.
    """
    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import keras
    except Exception as e:  # ImportError, or a backend that fails to load
        raise Unavailable(f"keras not importable: {e}") from e
    if keras.backend.backend() != "jax":
        raise Unavailable(f"keras backend is {keras.backend.backend()!r}, not 'jax'")
    cfg = case.config
    layers, variables, frozen = [], [], []
    policy = "mixed_bfloat16" if case.bf16 else None
    if policy and not hasattr(keras.src.backend, "AutocastScope"):
        raise Unavailable("this Keras has no keras.src.backend.AutocastScope (see apply below)")
    compute = keras.DTypePolicy(policy).compute_dtype if policy else None
    for i, d_in in enumerate(cfg.layer_inputs()):
        base = keras.layers.GRU(cfg.hidden, return_sequences=True, reset_after=True, dtype=policy)
        layer = keras.layers.Bidirectional(base) if cfg.bidirectional else base
        layer.build((cfg.batch, cfg.steps, d_in))
        # get_weights()'s order: each direction's [kernel, recurrent_kernel, bias].
        values = [
            w
            for k in range(cfg.directions)
            for w in _keras_weights(gru_jax.cell_of(case.params, i, k))
        ]
        if len(values) != len(layer.trainable_variables):
            raise Unavailable("unexpected Keras GRU variable layout")
        for var, value in zip(layer.trainable_variables, values, strict=True):
            if tuple(var.shape) != value.shape:
                raise Unavailable(f"Keras variable {var.path} has shape {var.shape}")
            var.assign(value)
        layers.append(layer)
        variables.append([jnp.asarray(v.value) for v in layer.trainable_variables])
        # Not trained (e.g. the dropout seed state), but stateless_call wants them.
        frozen.append([jnp.asarray(v.value) for v in layer.non_trainable_variables])

    x = jnp.asarray(case.x)
    mask = None
    if case.lengths is not None:
        mask = jnp.asarray(case.valid_steps())

    def apply(tv, x, mask):
        # A layer's stateless_call runs its call() without what Layer.__call__ (and so a
        # Model's stateless_call) does for a mixed policy: cast the inputs and read the
        # variables in the compute dtype. The scope and the one cast of x do that here.
        scope = keras.src.backend.AutocastScope(compute) if policy else contextlib.nullcontext()
        with scope:
            if compute is not None:
                x = x.astype(compute)
            for layer, layer_vars, layer_frozen in zip(layers, tv, frozen, strict=True):
                x, _ = layer.stateless_call(layer_vars, layer_frozen, x, mask=mask)
        return x.astype(jnp.float32)

    fwd = jax.jit(apply)
    weights = jnp.asarray(loss_weights(case))
    grad = jax.jit(jax.grad(lambda tv, x, mask: _loss(apply(tv, x, mask), weights)))
    return Impl(
        f"keras {keras.__version__} GRU (jax)",
        _lenient(lambda: _block(fwd(variables, x, mask))),
        _lenient(lambda: _block(grad(variables, x, mask))),
        note="lengths as a (B, T) mask" if mask is not None else "",
    )


# --------------------------------------------------------------------------------------------
# torch.nn.GRU
# --------------------------------------------------------------------------------------------


def torch_threads() -> int:
    """The thread count XLA's CPU client uses: every core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def torch_device():
    """Where the torch peer runs: the GPU (cuDNN) when JAX runs on one and torch has CUDA,
    else the CPU. Raises ``ImportError`` without torch."""
    import torch

    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    return torch.device("cuda" if on_gpu else "cpu")


def build_torch(case: Case) -> Impl:
    """``torch.nn.GRU`` (packed sequences when lengths are given).

    On CPU it runs with as many threads as XLA; when JAX runs on a GPU and torch has CUDA,
    on that GPU (cuDNN).
    """
    try:
        import torch
    except ImportError as e:
        raise Unavailable(f"torch not importable: {e}") from e
    cfg = case.config
    device = torch_device()
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(torch_threads())
    model = torch.nn.GRU(
        cfg.features,
        cfg.hidden,
        cfg.layers,
        batch_first=True,
        bidirectional=cfg.bidirectional,
    )
    state = {name: torch.from_numpy(a) for name, a in to_torch(case.params).items()}
    model.load_state_dict(state, strict=True)
    dtype = torch.bfloat16 if case.bf16 else torch.float32
    model = model.to(device, dtype)
    x = torch.from_numpy(case.x).to(device, dtype)
    lengths = None if case.lengths is None else torch.from_numpy(case.lengths.astype(np.int64))
    params = list(model.parameters())
    weights = torch.from_numpy(loss_weights(case)).to(device)

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    def run():
        if lengths is None:
            return model(x)[0]
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            x, lengths, batch_first=True, enforce_sorted=False
        )
        out, _ = model(packed)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(
            out, batch_first=True, total_length=cfg.steps
        )
        return out

    def run_f32():
        return run().float()

    def forward():
        # The tensor stays where it was computed: a copy to the host is no part of the
        # forward pass (gru_jax's forward leaves its output on the device too).
        with torch.inference_mode():
            out = run_f32()
        sync()
        return out

    def train_step():
        loss = (run_f32().square() * weights).sum()
        grads = torch.autograd.grad(loss, params)
        sync()
        return grads

    threads = "cuDNN" if on_gpu else f"{torch.get_num_threads()} threads"
    return Impl(
        f"torch {torch.__version__.split('+')[0]} nn.GRU",
        forward,
        train_step,
        note=threads
        + (", packed sequences" if lengths is not None else "")
        + (", bfloat16 params and state" if case.bf16 else ""),
    )


PEERS: dict[str, Callable[[Case], Impl]] = {
    "flax": build_flax,
    "keras": build_keras,
    "torch": build_torch,
    "pallas": build_pallas,
}
# Peers timed only when asked for on the CPU: Pallas there runs in interpret mode, which
# checks the kernel's numbers but is no benchmark.
ACCELERATOR_ONLY = ("pallas",)


def default_peers(backend: str | None = None) -> list[str]:
    """The peers a run times unless told otherwise: all of :data:`PEERS`, less
    :data:`ACCELERATOR_ONLY` on the CPU (``backend``: default ``jax.default_backend()``)."""
    on_cpu = (backend or jax.default_backend()) == "cpu"
    return [k for k in PEERS if not (on_cpu and k in ACCELERATOR_ONLY)]
