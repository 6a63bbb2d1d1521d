"""Benchmark harness: gru_jax against its peers, side by side in one process.

``python -m gru_jax.bench [--quick] [--out DIR]`` times forward (inference) and
forward+backward (the gradient of ``mean(output ** 2)`` over valid steps) of gru_jax's linen
``GRU`` and of

* ``flax.linen.RNN(nn.GRUCell)``, stacked, with ``nn.Bidirectional`` by hand;
* Keras 3 ``layers.GRU`` on the JAX backend (jitted ``stateless_call``, lengths as a mask);
* ``torch.nn.GRU`` with as many threads as XLA (packed sequences when lengths are given;
  cuDNN when JAX runs on a GPU and torch has CUDA),

all with the same weights and inputs, repetitions interleaved, medians reported with their
ratio to gru_jax. It also measures the float32 matmul rate (the FLOP floor of each config),
time vs ``T`` (plotted), compile time vs ``T`` and vs the number of layers, and XLA's memory
figure of the backward pass with and without ``remat``, and compile time side by side:
trace + lower + compile seconds of gru_jax and each JAX peer for every config's forward and
training step, and the cold start of a fresh process, imports to first gradient, without and
with JAX's persistent compilation cache (torch has no compile step).
``python -m gru_jax.bench --compile-only`` (or :func:`compile_report`) prints those compile
tables alone. Peers that are not installed are skipped with a note. ``--dtype bfloat16``
runs the peer comparison with every implementation in its own bfloat16 mode and reports each
one's error against gru_jax's float32 output.
"""

from gru_jax.bench._cli import Plan, compile_report, main, plan, run
from gru_jax.bench._peers import Config, make_case

__all__ = ["Config", "Plan", "compile_report", "main", "make_case", "plan", "run"]
