"""Training recipes: each module's `get_config()` returns a full config (clip_jax.config.default_config with the
recipe's changes). `clip-jax train --config configs/<name>.py[:arg]` loads one; modules here import each other and
`configs.common` as `configs.<module>`."""
