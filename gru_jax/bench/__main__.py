"""Entry point of ``python -m gru_jax.bench``."""

from gru_jax.bench._cli import main

main()
