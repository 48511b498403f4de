"""Checkpoint interop with PyTorch: OpenAI / open_clip / Long-CLIP state dicts and Hugging Face `CLIPModel`.

Modules:
  safe_load.py  reading and writing tensor files (safetensors without torch; `.pt`/`.bin` only with
                `torch.load(weights_only=True)`: a file that needs arbitrary unpickling is refused, never run)
  openai.py     the OpenAI state-dict layout <-> our params tree; architecture inference from tensor shapes
  hf.py         Hugging Face `CLIPModel` / `CLIPTextModelWithProjection` keys, config.json and tokenizer files
  workdir.py    `clip-jax convert` (any source -> a workdir `train`/`eval`/`encode` accept) and `clip-jax export`

Every format goes through the OpenAI layout (the HF mapping is a rename + q/k/v split on top of it), so the
transposes and head reshapes live in one place (`openai.py`).
"""

from __future__ import annotations

from clip_jax.errors import ConfigError


class ConversionError(ConfigError):
    """A checkpoint that cannot be converted, stated in one message naming the file, key or shape.

    A ConfigError so that the CLI prints it as a one-line error rather than a traceback."""
