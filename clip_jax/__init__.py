"""clip_jax: CLIP-style image-text models in JAX. From Python, `clip_jax.load(workdir)` reads a trained model
(clip_jax/inference.py); the `clip-jax` command does the rest."""


__all__ = ["Model", "load"]


def __dir__() -> list[str]:  # the lazy names too, for editors and dir()
    return sorted([*globals(), *__all__])


def __getattr__(name: str):
    # Imported on first use: importing clip_jax must not import JAX, whose CPU backend the CLI configures first.
    if name in __all__:
        from clip_jax import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'clip_jax' has no attribute {name!r}")
