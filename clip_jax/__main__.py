"""`python -m clip_jax ...` is the same as the `clip-jax` console script."""

from clip_jax.cli import main

main()
