"""WiSE-FT (Wortsman et al., CVPR 2022): end-to-end fine-tuning of CLIP's image tower with a zero-shot head, then
weight-space ensembling of the fine-tuned model with the zero-shot one (docs/few_shot.md).

The classifier is CLIP's image tower and a linear head over the training (base) classes: the head normalises the
image feature, its weight rows start as the prompt-ensemble text embeddings of the classes times the temperature
exp(logit_scale) and its bias at zero, so the model starts as zero-shot CLIP exactly. Fine-tuning trains the image
tower and the head with cross-entropy (optionally label-smoothed); the text tower and the temperature stay frozen.
Classes without a head row (the new classes of a base/new split) are scored by the (fine-tuned) image tower against
their zero-shot text embeddings.

`clip-jax wise-ft` (train/wise_ft.py) then evaluates theta_alpha = (1 - alpha) theta_0 + alpha theta_1 over a grid of
alpha, theta_0 being the run's starting parameters (its `init_from` towers and the zero-shot head, what `warm_start`
gave it) and theta_1 its last checkpoint's: every parameter is interpolated (`interpolate`, here), the optimizer
state never.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.errors import ConfigError
from clip_jax.losses import classification_loss
from clip_jax.methods.base import StepFns
from clip_jax.methods.few_shot import FewShotCLIP, FewShotMethod
from clip_jax.models import flops
from clip_jax.models.clip import CLIP, l2_normalize
from clip_jax.sharding import match_any, param_paths

# The optimizer.frozen rule of a WiSE-FT run: the text tower and the temperature; the image tower and the head train.
FROZEN = (r"^(text|logit_scale|logit_bias)/?",)


@dataclasses.dataclass(frozen=True)
class WiseFtConfig:
    label_smoothing: float = 0.0  # the reference's option (default 0)

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"method.label_smoothing must be in [0, 1), got {self.label_smoothing}")


class ZeroShotHead(nn.Module):
    """The classification head: logits = normalise(f) @ kernel + bias, kernel [D, C] (`init_learner` sets it to the
    zero-shot class embeddings x exp(logit_scale), the bias to 0)."""

    dim: int
    n_classes: int

    @nn.compact
    def __call__(self, features):
        kernel = self.param("kernel", nn.initializers.zeros, (self.dim, self.n_classes), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.n_classes,), jnp.float32)
        return l2_normalize(features) @ kernel + bias


class WiseFtMethod(FewShotMethod):
    """WiSE-FT's fine-tuning (module docstring): the image tower and a zero-shot-initialised head train on the K-shot
    images of the base classes."""

    name = "wise_ft"
    Config = WiseFtConfig
    inputs = "images"

    def learner(self) -> nn.Module:
        return ZeroShotHead(self.config.model.embed_dim, len(self.task.base))

    def class_inputs(self, classes):
        # rows: the head column of each class (-1: none, scored zero-shot against embeds)
        column = {c: i for i, c in enumerate(self.task.base)}
        rows = np.asarray([column.get(c, -1) for c in classes], np.int32)
        return {"rows": rows, "embeds": self._zero_shot(tuple(classes))}

    def logits(self, model: FewShotCLIP, classes: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]):
        features = model.encode_image(batch["images"], normalize=False)
        head = model.learner(features)  # [B, C_base]
        scale, _ = model.temperature()
        zero_shot = scale * l2_normalize(features) @ classes["embeds"].T  # [B, C]
        rows = classes["rows"]
        return jnp.where(rows >= 0, jnp.take(head, jnp.maximum(rows, 0), axis=1), zero_shot)

    def init_learner(self, learner, clip):
        scale = float(np.exp(np.asarray(jax.device_get(clip["logit_scale"]), np.float32)))
        if self.config.model.max_logit_scale > 0:  # the model's temperature (`CLIP.temperature`) is clamped
            scale = min(scale, self.config.model.max_logit_scale)
        embeds = self._zero_shot(tuple(self.task.base))  # [C, D]
        return {"kernel": jnp.asarray((embeds * np.float32(scale)).T), "bias": jnp.zeros_like(learner["bias"])}

    def check(self, mesh) -> None:
        frozen = tuple(self.config.optimizer.frozen)
        boxed = jax.eval_shape(CLIP(self.model_config()).init, jax.random.PRNGKey(0), *self.init_inputs())["params"]
        paths = jax.tree.leaves(param_paths(nn.unbox(boxed)))
        wrong = [p for p in paths if match_any(frozen, p) == p.startswith("visual/")]
        if wrong:
            what = (
                "freezes the image tower" if wrong[0].startswith("visual/") else "trains the text tower or temperature"
            )
            raise ConfigError(
                f"method wise_ft fine-tunes the image tower with the text tower and temperature frozen, but "
                f'optimizer.frozen {what} ({wrong[0]}): set --config.optimizer.frozen="{FROZEN}"'
            )

    def step_fns(self, model: FewShotCLIP) -> StepFns:
        fns = super().step_fns(model)
        smoothing = self.hparams.label_smoothing
        loss = lambda outputs, *, axis_name: classification_loss(
            outputs, axis_name=axis_name, label_smoothing=smoothing
        )
        return dataclasses.replace(fns, loss=loss)

    def flops_per_example(self, trainable) -> float:
        # The image tower forward and back (3 passes), and the head's [D] x [D, C] product.
        return 3 * (
            flops.image_forward_flops(self.model_config()) + 2.0 * self.config.model.embed_dim * len(self.task.base)
        )


# --- weight-space ensembling ------------------------------------------------------------------------------------------
def _leaf_shapes(tree) -> dict[str, tuple]:
    return {
        jax.tree_util.keystr(path): (tuple(np.shape(leaf)), np.dtype(leaf.dtype).name)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def check_same_tree(theta0, theta1) -> None:
    """Raises ConfigError (one line) unless the two parameter trees have the same leaves, shapes and dtypes."""
    a, b = _leaf_shapes(theta0), _leaf_shapes(theta1)
    if a == b:
        return
    only = sorted(set(a) ^ set(b))
    if only:
        raise ConfigError(
            f"the two parameter trees differ: {len(only)} parameters are in one only (e.g. {only[0]}); WiSE-FT "
            "interpolates two models of one architecture"
        )
    key = next(k for k in sorted(a) if a[k] != b[k])
    raise ConfigError(
        f"the two parameter trees differ at {key}: shape/dtype {a[key]} vs {b[key]}; WiSE-FT interpolates two models "
        "of one architecture"
    )


def interpolate(theta0, theta1, alpha: float):
    """theta_alpha = (1 - alpha) theta0 + alpha theta1, parameter by parameter (each in its own dtype): theta0 at
    alpha 0, theta1 at alpha 1. Raises ConfigError if the trees differ."""
    check_same_tree(theta0, theta1)
    return jax.tree.map(lambda a, b: ((1.0 - alpha) * a + alpha * b).astype(a.dtype), theta0, theta1)
