"""Prompt learning beyond CoOp (docs/few_shot.md): CoCoOp and MaPLe, few-shot methods on a frozen CLIP.

- CoCoOp (Zhou et al., CVPR 2022): CoOp's shared context, shifted for each image by a small meta-net on its image
  embedding, so every image has its own C class prompts (B x C text passes a step, in one pass of the text tower).
- MaPLe (Khattak et al., CVPR 2023): learned text prompts in the first J blocks of the text tower (deep prompts), and
  vision prompts in the first J blocks of the image tower that are linear maps of them (the coupling functions).
  The image tower then sees learned tokens, so the batch holds images (`inputs = "images"`), not cached embeddings.

Both build on CoOp's pieces (few_shot.py): the prompt layout (`prompt_layout`), the learned context, its start from
a phrase's token embeddings.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.errors import ConfigError
from clip_jax.methods.few_shot import CoOpMethod, FewShotMethod, PromptContext, check_n_ctx, prompt_layout
from clip_jax.models import flops


def torch_linear_init(fan_in: int):
    """(kernel_init, bias_init) of PyTorch's nn.Linear, the references' layers: both U(-1/sqrt(fan_in), ...)."""
    bound = 1.0 / math.sqrt(fan_in)
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
    return uniform, uniform


# --- CoCoOp ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CoCoOpConfig:
    n_ctx: int = 4  # learned context tokens M (with ctx_init: the phrase's token count instead)
    ctx_init: str = "a photo of a"  # the released config's start; "": N(0, 0.02)
    meta_reduction: int = 16  # the meta-net's bottleneck: embed_dim // meta_reduction
    # CoOp's options the reference does not have: the class name at the end, one context for all classes.
    class_position: ClassVar[str] = "end"
    csc: ClassVar[bool] = False

    def __post_init__(self):
        check_n_ctx(self.n_ctx)
        if self.meta_reduction < 1:
            raise ConfigError(f"method.meta_reduction must be >= 1, got {self.meta_reduction}")


class MetaNet(nn.Module):
    """CoCoOp's meta-net: Linear(D, D / r) - ReLU - Linear(D / r, text width), on the normalised image embedding."""

    hidden: int
    width: int

    @nn.compact
    def __call__(self, features):
        kernel, bias = torch_linear_init(features.shape[-1])
        x = nn.relu(nn.Dense(self.hidden, kernel_init=kernel, bias_init=bias, name="linear1")(features))
        kernel, bias = torch_linear_init(self.hidden)
        return nn.Dense(self.width, kernel_init=kernel, bias_init=bias, name="linear2")(x)


class ConditionalContext(nn.Module):
    """The context [M, width] (`ctx`, as CoOp's) and, for image embeddings [B, D], the shift pi(x) [B, width] the
    meta-net (`meta_net`) adds to every context vector."""

    n_ctx: int
    width: int
    hidden: int

    @nn.compact
    def __call__(self, features):
        ctx = PromptContext(self.n_ctx, self.width, None, name="context")()
        return ctx, MetaNet(self.hidden, self.width, name="meta_net")(features)


class CoCoOpMethod(CoOpMethod):
    """CoCoOp (Zhou et al., CVPR 2022): CoOp's context plus an image-conditional shift, v_m(x) = v_m + pi(x);
    logits s f(x) . w_c(x), each image's C prompts through the frozen text tower."""

    name = "cocoop"
    Config = CoCoOpConfig

    def learner(self):
        hidden = max(1, self.config.model.embed_dim // self.hparams.meta_reduction)
        return ConditionalContext(self._n_ctx(), self.config.model.text.width, hidden)

    def init_learner(self, learner, clip):
        started = super().init_learner({"ctx": learner["context"]["ctx"]}, clip)
        return {**learner, "context": started}

    def logits(self, model, classes, batch):
        features = batch["features"]
        ctx, shift = model.learner(features)  # [M, W], [B, W]
        words = model.text.embed_tokens(classes["ids"])  # [C, T, W]
        slots = classes["slots"]
        contexts = (ctx[None] + shift[:, None]).astype(words.dtype)  # [B, M, W]: each image's context
        vectors = jnp.take(contexts, jnp.maximum(slots, 0), axis=1)  # [B, C, T, W]
        prompts = jnp.where((slots >= 0)[None, ..., None], vectors, words[None])
        batch_size, n_classes, length, width = prompts.shape
        pool = jnp.broadcast_to(jnp.argmax(classes["ids"], axis=-1), (batch_size, n_classes))
        text = model.encode_text(token_embeddings=prompts.reshape(-1, length, width), pool_index=pool.reshape(-1))
        scale, _ = model.temperature()
        return scale * jnp.einsum("bd,bcd->bc", features, text.reshape(batch_size, n_classes, -1))

    def score_chunk(self, n_classes):
        # Every image has its own C prompts: about eval.batch_size text sequences at once.
        return self.config.eval.batch_size // n_classes

    def flops_per_example(self, trainable):
        # Each example's C prompts through the text tower, forward and back to the context.
        return 2.0 * len(self.task.base) * flops.text_forward_flops(self.model_config())


# --- MaPLe -----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MapleConfig:
    n_ctx: int = 2  # learned prompt tokens M per prompted layer, in both towers
    # The first n_ctx tokens of this phrase start the layer-0 text prompts; its other tokens stay in the prompt as
    # fixed words before the class name (the reference: "a photo of a" with M = 2 learns "a photo", keeps "of a").
    # "": N(0, 0.02) and no fixed words.
    ctx_init: str = "a photo of a"
    prompt_depth: int = 9  # J: the blocks of each tower with prompts (the reference: 9 of ViT-B/16's 12)

    def __post_init__(self):
        check_n_ctx(self.n_ctx)
        if self.prompt_depth < 1:
            raise ConfigError(
                f"method.prompt_depth must be >= 1 (the prompted blocks of each tower), got {self.prompt_depth}"
            )


class MultimodalPrompts(nn.Module):
    """MaPLe's learned part: the text prompts of the first J blocks, `ctx` [M, Wt] (layer 0, spliced into the token
    embeddings) and `deep_ctx` [J - 1, M, Wt] (J > 1), and the coupling maps `couple_kernel` [J, Wt, Wv], `couple_bias`
    [J, Wv], one linear map per layer from its text prompts to its vision prompts. Returns (text prompts
    [J, M, Wt], vision prompts [J, M, Wv])."""

    n_ctx: int
    depth: int
    text_width: int
    vision_width: int

    @nn.compact
    def __call__(self, features=None):
        del features
        normal = nn.initializers.normal(0.02)
        ctx = self.param("ctx", normal, (self.n_ctx, self.text_width), jnp.float32)
        text = ctx[None]
        if self.depth > 1:  # no zero-size parameter for J = 1 ("shallow" MaPLe)
            deep = self.param("deep_ctx", normal, (self.depth - 1, self.n_ctx, self.text_width), jnp.float32)
            text = jnp.concatenate([text, deep], axis=0)
        kernel_init, bias_init = torch_linear_init(self.text_width)
        kernel = self.param("couple_kernel", kernel_init, (self.depth, self.text_width, self.vision_width))
        bias = self.param("couple_bias", bias_init, (self.depth, self.vision_width))
        return text, couple(text, kernel, bias)


def couple(text: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Vision prompts [J, M, Wv] of text prompts [J, M, Wt]: layer k's through its own linear map."""
    return jnp.einsum("kmt,ktv->kmv", text, kernel) + bias[:, None]


def layer_stack(prompts: jax.Array, layers: int) -> tuple[jax.Array, jax.Array]:
    """A tower's (layer_prompts [layers, M, W], prompt_layers bool [layers]) from the prompts of its first J blocks:
    zeros beyond J, and replacement at the blocks 1..J-1 (block 0's are the tower's input)."""
    depth = prompts.shape[0]
    padded = jnp.concatenate([prompts, jnp.zeros((layers - depth, *prompts.shape[1:]), prompts.dtype)])
    index = jnp.arange(layers)
    return padded, (index >= 1) & (index < depth)


class MapleMethod(FewShotMethod):
    """MaPLe (Khattak et al., CVPR 2023): deep text prompts in the first J blocks of the text tower and vision
    prompts coupled to them (a linear map per layer) in the first J blocks of the image tower; logits
    s normalize(image(x; vision prompts)) . normalize(text(prompts))."""

    name = "maple"
    Config = MapleConfig
    inputs = "images"

    def __init__(self, config):
        super().__init__(config)
        if config.model.vision.type != "vit":
            raise ConfigError(f"maple prompts the image tower's transformer blocks: it needs model.vision.type 'vit', "
                              f"not {config.model.vision.type!r} (use coop or cocoop with a resnet)")
        text, vision = config.model.text.layers, config.model.vision.layers
        if self.hparams.prompt_depth > min(text, vision):
            raise ConfigError(
                f"method.prompt_depth {self.hparams.prompt_depth} exceeds the towers' depth (text "
                f"{text}, image {vision} blocks): set it to at most {min(text, vision)}"
            )

    def _phrase(self) -> tuple[list[int], str]:
        """(the ids starting the learned prompts, the fixed words after them) of ctx_init."""
        h = self.hparams
        if not h.ctx_init:
            return [], ""
        ids = self.prep.tokenizer.encode(h.ctx_init)
        if h.n_ctx > len(ids):
            raise ConfigError(
                f"method.ctx_init {h.ctx_init!r} has {len(ids)} tokens, fewer than method.n_ctx "
                f'{h.n_ctx}: lower n_ctx or set ctx_init="" (random prompts)'
            )
        return ids[: h.n_ctx], self.prep.tokenizer.decode(ids[h.n_ctx :]).strip()

    def learner(self):
        model = self.config.model
        return MultimodalPrompts(self.hparams.n_ctx, self.hparams.prompt_depth, model.text.width, model.vision.width)

    def check_prompts(self) -> None:
        self.class_inputs([*self.task.base, *self.task.new])

    def class_inputs(self, classes):
        _, words = self._phrase()
        layouts = [
            prompt_layout(
                self.prep.tokenizer,
                f"{words} {self.task.class_names[c]}".strip(),
                self.hparams.n_ctx,
                "end",
                self.config.model.text.context_length,
                self.task.class_names[c],
                # The phrase's tokens past n_ctx are fixed words: a smaller n_ctx leaves the prompt as long.
                "shorten method.ctx_init (or set it to \"\") or the class name" if self.hparams.ctx_init else
                "lower method.n_ctx",
            )
            for c in classes
        ]
        return {"ids": np.stack([ids for ids, _ in layouts]), "slots": np.stack([s for _, s in layouts])}

    def init_learner(self, learner, clip):
        ids, _ = self._phrase()
        if not ids:
            return learner
        phrase = jnp.asarray(clip["text"]["token_embedding"]["embedding"])[np.asarray(ids)]
        return {**learner, "ctx": phrase.astype(learner["ctx"].dtype)}

    def logits(self, model, classes, batch):
        cfg = self.config.model
        text_prompts, vision_prompts = model.learner()
        words = model.text.embed_tokens(classes["ids"])  # [C, T, Wt]
        slots = classes["slots"]
        vectors = jnp.take(text_prompts[0].astype(words.dtype), jnp.maximum(slots, 0), axis=0)  # [C, T, Wt]
        embeddings = jnp.where((slots >= 0)[..., None], vectors, words)
        layers, use = layer_stack(text_prompts, cfg.text.layers)
        text = model.encode_text(
            token_embeddings=embeddings,
            pool_index=jnp.argmax(classes["ids"], axis=-1),
            layer_prompts=layers,
            prompt_layers=use,
        )
        layers, use = layer_stack(vision_prompts, cfg.vision.layers)
        image = model.encode_image(batch["images"], layer_prompts=layers, prompt_layers=use)
        scale, _ = model.temperature()
        return scale * image @ text.T

    def flops_per_example(self, trainable):
        # The image tower forward and back to its prompts, and the C class prompts through the text tower forward
        # and back, once per step.
        cfg = self.model_config()
        text = 2.0 * len(self.task.base) * flops.text_forward_flops(cfg) / self.config.batch_size
        return 2.0 * flops.image_forward_flops(cfg) + text


PROMPT_LEARNING_METHODS = (CoCoOpMethod, MapleMethod)
