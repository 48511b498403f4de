"""clip_jax: CLIP-style image-text models in JAX. From Python, `clip_jax.load(workdir)` reads a trained model
(clip_jax/inference.py); the `clip-jax` command does the rest."""


def __getattr__(name: str):
    # Imported on first use: importing clip_jax must not import JAX, whose CPU backend the CLI configures first.
    if name in ("load", "Model"):
        from clip_jax import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'clip_jax' has no attribute {name!r}")
