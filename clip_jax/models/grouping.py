"""GroupViT's image tower (Xu et al., CVPR 2022): transformer stages separated by grouping blocks that merge the
image tokens into fewer segment tokens, so that segments emerge from image-text training alone.

Stage s runs `stage_depths[s]` residual blocks over its input tokens and `num_group_tokens[s]` learned group tokens
concatenated after them; a `GroupingBlock` then assigns every input token to one of `num_output_groups[s]` groups
and returns one segment token per group, the next stage's input tokens. The last stage has no group tokens and no
grouping. The image embedding is the average of the final segment tokens (after `ln_post`), projected.

The per-stage assignments ([B, G_s, N_s], each image token's weights over the groups) multiplied together map every
patch to a final segment (`segment_assignment`), which zero-shot segmentation upsamples to pixels
(`assignment_to_pixels`).

Differences from the reference (NVlabs/GroupViT): the patch embedding is a ViT's (`conv1` without bias, learned
positions, then `ln_pre` over patch and group tokens alike, where the reference puts a LayerNorm right after the
conv), so that stage 1 can start from a trained ViT (`vit_to_groupvit_params`); no drop-path; new dense layers use
this repository's fan-in initialisation instead of trunc-normal 0.02 (the group tokens keep the reference's).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from clip_jax.models.layers import (
    ACTIVATIONS,
    Dtype,
    LayerNorm,
    Mlp,
    OutProj,
    PatchEmbedding,
    TowerOutput,
    Transformer,
    constrain,
    partitioned,
)
from clip_jax.models.positions import resize_grid_positions
from clip_jax.models.towers import VisionConfig


def gumbel_assignment(logits: jax.Array, rng: jax.Array | None, *, hard: bool, tau: float = 1.0,
                      gumbel: bool = True) -> jax.Array:
    """Assignment weights [..., G, N] of N image tokens to G groups from logits [..., G, N].

    The softmax runs over the **group axis (-2)**: each image token's weights over the groups sum to 1 (a token
    picks a group; a group may receive no token), the opposite of ordinary attention, where each query's weights
    over the keys sum to 1.
    gumbel: Gumbel(0, 1) noise g = -log(-log U) is *added* to the logits, then divided by `tau` (argmax(logits + g)
    is a sample of softmax(logits), the Gumbel-max trick). Without noise `tau` is not used, as in the reference,
    whose evaluation softmax ignores it.
    hard: the forward value is the one-hot of the argmax over groups; the gradient is the soft weights' one
    (straight-through: y_hard - stop_gradient(y_soft) + y_soft).
    Training: gumbel=True, hard=True (needs `rng`); evaluation: gumbel=False, hard=False, the plain softmax.
    `rng` is one key, or one per example ([B, 2] raw keys, logits [B, G, N]): an example's noise then depends on
    its own key alone, not on how the batch is split over devices and micro-batches.
    """
    logits = logits.astype(jnp.float32)
    if gumbel:
        if rng is None:
            raise ValueError("gumbel_assignment with gumbel=True needs an rng")
        if rng.ndim == 2:  # a key per example
            noise = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[1:], jnp.float32))(rng)
        else:
            noise = jax.random.gumbel(rng, logits.shape, jnp.float32)
        logits = (logits + noise) / tau
    y_soft = jax.nn.softmax(logits, axis=-2)
    if not hard:
        return y_soft
    y_hard = jax.nn.one_hot(jnp.argmax(y_soft, axis=-2), logits.shape[-2], dtype=y_soft.dtype, axis=-2)
    return y_hard - jax.lax.stop_gradient(y_soft) + y_soft


def group_pool(assignment: jax.Array, values: jax.Array, eps: float = 1.0) -> jax.Array:
    """[B, G, N] weights x [B, N, D] values -> [B, G, D]: each group's weighted sum of its tokens' values divided by
    its total weight plus `eps`. The reference's eps is 1, not a tiny constant: a group that received no token gives
    exactly 0 and one that received a few is shrunk towards 0 instead of being divided by almost nothing."""
    weights = assignment / (assignment.sum(-1, keepdims=True) + eps)
    return jnp.einsum("bgn,bnd->bgd", weights.astype(values.dtype), values)


def segment_assignment(assignments: tuple[jax.Array, ...] | list[jax.Array]) -> jax.Array:
    """[B, G_last, N_patches]: the stage assignments multiplied, last stage first (stage 2 [B, G2, G1] @ stage 1
    [B, G1, N]): the weight of every patch for every final segment. Each patch's weights still sum to 1 over the
    final segments, since a product of matrices whose columns sum to 1 has columns that sum to 1."""
    if not assignments:
        raise ValueError("segment_assignment needs at least one stage assignment")
    out = assignments[0]
    for stage in assignments[1:]:
        out = jnp.einsum("bhg,bgn->bhn", stage, out)
    return out


def assignment_to_pixels(assignment: jax.Array, grid: int | tuple[int, int], image_size: int | tuple[int, int]
                         ) -> jax.Array:
    """[B, G, h * w] patch assignment -> [B, G, H, W] by bilinear upsampling (half-pixel centres, as PyTorch's
    `interpolate(..., align_corners=False)` that the reference's segmentation uses). `grid`: (h, w) or h = w;
    `image_size`: (H, W) or H = W."""
    h, w = (grid, grid) if isinstance(grid, int) else grid
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    batch, groups, n = assignment.shape
    if n != h * w:
        raise ValueError(f"assignment has {n} patches, the grid {h}x{w} has {h * w}")
    maps = assignment.reshape(batch, groups, h, w)
    return jax.image.resize(maps, (batch, groups, height, width), "bilinear", antialias=False)


class FeedForward(nn.Module):
    """Dense -> activation -> Dense on the last axis, `hidden` then `out` wide. The grouping block's token-mixing
    MLP runs it on transposed tokens (`axis` "positions": it mixes tokens), its channel MLP on features ("embed")."""

    hidden: int
    out: int
    activation: str
    axis: str = "embed"
    dtype: Dtype = jnp.float32
    out_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.hidden, kernel_init=partitioned(nn.initializers.lecun_normal(), (self.axis, "mlp")),
                     bias_init=partitioned(nn.initializers.zeros, ("mlp",)), dtype=self.dtype, name="c_fc")(x)
        h = ACTIVATIONS[self.activation](h)
        return nn.Dense(self.out, kernel_init=partitioned(nn.initializers.lecun_normal(), ("mlp", self.axis)),
                        bias_init=partitioned(nn.initializers.zeros, ("norm",)), use_bias=self.out_bias,
                        dtype=self.dtype, name="c_proj")(h)


def mix_tokens(module: FeedForward, tokens: jax.Array) -> jax.Array:
    """[B, G_in, D] -> [B, G_out, D]: `module` applied along the token axis (an MLP-Mixer token-mixing MLP)."""
    return module(tokens.swapaxes(1, 2)).swapaxes(1, 2)


class CrossAttention(nn.Module):
    """Multi-head attention of `queries` [B, G, D] to `keys` [B, N, D] (the same tokens give keys and values);
    `key_mask` [B, N], False for keys no query may attend to (padding tokens)."""

    num_heads: int
    head_dim: int
    num_layers: int  # only for the output projection's init scale, as in `Attention`
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, queries: jax.Array, keys: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        width = queries.shape[-1]
        heads = (self.num_heads, self.head_dim)
        init = nn.initializers.normal(width**-0.5)
        q_kernel = self.param("q_kernel", partitioned(init, ("embed", "heads", "kv")), (width, *heads), jnp.float32)
        q_bias = self.param("q_bias", partitioned(nn.initializers.zeros, ("heads", "kv")), heads, jnp.float32)
        kv_kernel = self.param("kv_kernel", partitioned(init, ("embed", "qkv", "heads", "kv")), (width, 2, *heads),
                               jnp.float32)
        kv_bias = self.param("kv_bias", partitioned(nn.initializers.zeros, ("qkv", "heads", "kv")), (2, *heads),
                             jnp.float32)
        q = jnp.einsum("bgd,dhk->bghk", queries.astype(self.dtype), q_kernel.astype(self.dtype))
        q = q + q_bias.astype(self.dtype)
        kv = jnp.einsum("bnd,dchk->cbnhk", keys.astype(self.dtype), kv_kernel.astype(self.dtype))
        kv = kv + kv_bias.astype(self.dtype)[:, None, None]
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, heads, G, N] by broadcasting
        out = jax.nn.dot_product_attention(q, kv[0], kv[1], mask=mask)
        out = constrain(out, ("batch", "length", "act_heads", "act_kv"))
        return OutProj(width, width**-0.5 * (2 * self.num_layers) ** -0.5, self.dtype, name="out_proj")(out)


class CrossAttentionBlock(nn.Module):
    """Group tokens attend to image tokens, post-norm as the reference's block before the assignment: both inputs
    arrive normalised (by the grouping block), so no LayerNorm before the attention; x = q + attn(q, keys),
    x = x + mlp(ln_2(x)), then ln_post(x)."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    activation: str
    num_layers: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, queries: jax.Array, keys: jax.Array) -> jax.Array:
        x = queries + CrossAttention(self.num_heads, self.head_dim, self.num_layers, self.dtype, name="attn")(
            queries, keys)
        x = x + Mlp(self.mlp_dim, self.activation, self.num_layers, self.dtype, name="mlp")(
            LayerNorm(self.dtype, name="ln_2")(x))
        return LayerNorm(self.dtype, name="ln_post")(x)


class AssignAttention(nn.Module):
    """Single-head attention whose softmax runs over the queries (groups, `gumbel_assignment`), followed by the eps-1
    normalisation over the image tokens (`group_pool`). Returns (the pooled values projected [B, G, D], the
    assignment [B, G, N] before the normalisation).

    Training: Gumbel noise and, with `hard`, one-hot forward values with straight-through gradients. Evaluation:
    no noise; the soft assignment (what the reference's code uses, GroupViT#22), or with `eval_hard` the one-hot of
    its argmax (what the paper describes): it both pools and is returned, so segmentation reads the same assignment
    the forward used.
    """

    hard: bool = True
    tau: float = 1.0
    eval_hard: bool = False
    eps: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, groups: jax.Array, tokens: jax.Array, *, train: bool, rng: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        width = groups.shape[-1]

        def dense(name: str, names: tuple[str, str]) -> nn.Dense:
            bias = ("kv",) if names[1] == "kv" else ("norm",)
            return nn.Dense(width, kernel_init=partitioned(nn.initializers.lecun_normal(), names),
                            bias_init=partitioned(nn.initializers.zeros, bias), dtype=self.dtype, name=name)

        q = dense("q_proj", ("embed", "kv"))(groups)
        k = dense("k_proj", ("embed", "kv"))(tokens)
        v = dense("v_proj", ("embed", "kv"))(tokens)
        logits = jnp.einsum("bgd,bnd->bgn", q.astype(jnp.float32), k.astype(jnp.float32)) * width**-0.5
        if train:
            assignment = gumbel_assignment(logits, rng, hard=self.hard, tau=self.tau, gumbel=True)
            pooling = assignment
        else:
            assignment = gumbel_assignment(logits, None, hard=self.eval_hard, gumbel=False)
            pooling = assignment
        out = group_pool(pooling, v, self.eps)
        return dense("proj", ("kv", "embed"))(out), assignment


class GroupingBlock(nn.Module):
    """Merges image tokens x [B, N, D] into `num_output_groups` segment tokens, guided by group tokens
    [B, G_in, D]: LayerNorm both; group tokens -> token-mixing MLP (G_in -> G_out, hidden D // 2) -> LayerNorm ->
    `CrossAttentionBlock` to the image tokens -> `AssignAttention`; segment = pooled values + the group token; then
    a channel MLP with a residual (LayerNorm + bias-free linear reduction on the residual when `out_width` differs).
    Returns (segment tokens [B, G_out, out_width], assignment [B, G_out, N]: hard in training, soft at evaluation,
    before the eps-1 normalisation)."""

    num_output_groups: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    activation: str
    out_width: int | None = None  # None: the input width
    num_layers: int = 1  # init scale of the cross-attention block's output projections
    hard: bool = True
    tau: float = 1.0
    eval_hard: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, groups: jax.Array, *, train: bool, rng: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        width = x.shape[-1]
        out_width = self.out_width or width
        x = LayerNorm(self.dtype, name="ln_x")(x)
        groups = LayerNorm(self.dtype, name="ln_groups")(groups)
        # No output bias: a bias per output token is constant over its features, which the LayerNorm after removes
        # (its gradient is zero; Adam would move it by rounding noise alone).
        groups = mix_tokens(FeedForward(width // 2, self.num_output_groups, self.activation, "positions", self.dtype,
                                        out_bias=False, name="token_mlp"), groups)
        groups = LayerNorm(self.dtype, name="ln_mixed")(groups)
        groups = CrossAttentionBlock(self.num_heads, self.head_dim, self.mlp_dim, self.activation, self.num_layers,
                                     self.dtype, name="cross_attn")(groups, x)
        pooled, assignment = AssignAttention(self.hard, self.tau, self.eval_hard, dtype=self.dtype, name="assign")(
            groups, x, train=train, rng=rng)
        segments = constrain(pooled + groups, ("batch", "length", "act_embed"))
        residual = segments
        if out_width != width:
            residual = nn.Dense(out_width, use_bias=False, dtype=self.dtype, name="reduction",
                                kernel_init=partitioned(nn.initializers.lecun_normal(), ("embed", None)))(
                LayerNorm(self.dtype, name="ln_reduction")(segments))
        mlp = FeedForward(self.mlp_dim, out_width, self.activation, "embed", self.dtype, name="mlp_channels")
        return residual + mlp(LayerNorm(self.dtype, name="ln_channels")(segments)), assignment


class GroupProjector(nn.Module):
    """The previous stage's group tokens [B, G_prev, D] -> [B, G, D] (LayerNorm, token-mixing MLP with hidden
    D // 2): added to a stage's own zero-initialised group tokens, so that stage 2 starts from what stage 1's
    groups learned."""

    num_groups: int
    activation: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, groups: jax.Array) -> jax.Array:
        groups = LayerNorm(self.dtype, name="ln")(groups)
        return mix_tokens(FeedForward(groups.shape[-1] // 2, self.num_groups, self.activation, "positions",
                                      self.dtype, name="mlp"), groups)


def check_stages(layers: int, stage_depths: tuple[int, ...], num_group_tokens: tuple[int, ...],
                 num_output_groups: tuple[int, ...]) -> None:
    """ValueError unless the stage layout is one `GroupVisionTransformer` can build."""
    stages = len(stage_depths)
    if sum(stage_depths) != layers or min(stage_depths, default=-1) < 0:
        raise ValueError(f"stage_depths {stage_depths} must be >= 0 and sum to the tower's {layers} layers")
    if len(num_group_tokens) != stages or len(num_output_groups) != stages - 1:
        raise ValueError(f"{stages} stages need {stages} num_group_tokens (got {len(num_group_tokens)}) and "
                         f"{stages - 1} num_output_groups (got {len(num_output_groups)}): the last stage has no "
                         "grouping")
    if num_group_tokens[-1] != 0 or any(g <= 0 for g in (*num_group_tokens[:-1], *num_output_groups)):
        raise ValueError(f"num_group_tokens {num_group_tokens} must be > 0 but for the last stage (0), and "
                         f"num_output_groups {num_output_groups} > 0")


def stage_key(rng: jax.Array, stage: int) -> jax.Array:
    """Grouping stage `stage`'s key(s) from the tower's: one key, or one per example [B, 2]."""
    if rng.ndim == 2:
        return jax.vmap(lambda key: jax.random.fold_in(key, stage))(rng)
    return jax.random.fold_in(rng, stage)


class GroupVisionTransformer(nn.Module):
    """GroupViT image tower: ViT patch embedding (no class token), stages of blocks separated by grouping blocks.

    Stage 1's group tokens are learned (trunc-normal 0.02); a later stage's are zero-initialised parameters plus a
    `GroupProjector` of the previous stage's group tokens (as they leave that stage's blocks). Parameter names
    shared with `VisionTransformer` (`conv1`, `positional_embedding`, `ln_pre`, `transformer/resblocks_*`, `ln_post`,
    `proj`) let `vit_to_groupvit_params` start stage 1 from a trained ViT; stage s > 1's blocks are `transformer_s-1`
    (0-based: `transformer_1`, `transformer_2`), its grouping `grouping_s-1`, its group tokens `group_tokens_s-1`.

    `__call__` returns (TowerOutput, assignments): `tokens` are the final segment tokens after `ln_post`
    [B, G_last, width] (unlike the ViT's, after the LayerNorm: `tokens @ proj` are then the segment embeddings),
    `feature` their average, `pooled` = feature @ proj; `assignments` one [B, G_s, N_s] per grouping block.
    """

    config: VisionConfig
    embed_dim: int
    stage_depths: tuple[int, ...] = (6, 3, 3)
    num_group_tokens: tuple[int, ...] = (64, 8, 0)
    num_output_groups: tuple[int, ...] = (64, 8)
    dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention: str = "auto"  # layers.ATTENTION_IMPLEMENTATIONS
    layer_norm: str = "auto"  # layers.LAYER_NORM_IMPLEMENTATIONS
    hard: bool = True  # one-hot assignments in training (straight-through); False trains with soft Gumbel weights
    tau: float = 1.0
    eval_hard: bool = False  # see AssignAttention

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool, rng: jax.Array | None = None
                 ) -> tuple[TowerOutput, tuple[jax.Array, ...]]:
        """images: float [B, H, W, 3], already normalised. train: Gumbel noise (from `rng`, required: one key, or
        one per example [B, 2], see `gumbel_assignment`) and hard assignments; otherwise soft assignments and no rng
        needed."""
        cfg = self.config
        check_stages(cfg.layers, self.stage_depths, self.num_group_tokens, self.num_output_groups)
        if images.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"image tower expects {cfg.image_size}x{cfg.image_size} images, got {images.shape[1]}x"
                             f"{images.shape[2]}; resize them or set model.vision.image_size")
        groupings = len(self.num_output_groups)
        if train and groupings and rng is None:
            raise ValueError("GroupVisionTransformer(train=True) needs an rng for the Gumbel noise")
        rngs = [stage_key(rng, s) if train else None for s in range(groupings)]
        x = PatchEmbedding(cfg.width, cfg.patch_size, self.dtype, name="conv1")(images)
        batch = x.shape[0]
        x = x.reshape(batch, -1, cfg.width)
        positions = self.param("positional_embedding",
                               partitioned(nn.initializers.normal(cfg.width**-0.5), ("positions", "embed")),
                               (x.shape[1], cfg.width), jnp.float32)
        x = x + positions.astype(self.dtype)

        assignments, groups = [], None
        for stage, depth in enumerate(self.stage_depths):
            count = self.num_group_tokens[stage]
            if count:
                init = nn.initializers.truncated_normal(0.02) if stage == 0 else nn.initializers.zeros
                tokens = self.param(f"group_tokens_{stage}", partitioned(init, ("positions", "embed")),
                                    (count, cfg.width), jnp.float32)
                tokens = jnp.broadcast_to(tokens.astype(self.dtype), (batch, count, cfg.width))
                if stage > 0:
                    tokens = tokens + GroupProjector(count, cfg.activation, self.dtype,
                                                     name=f"group_projector_{stage}")(groups)
                x = jnp.concatenate([x, tokens], axis=1)
            if stage == 0:
                # Over the group tokens too, as the ViT's over its class token: the blocks see what they were
                # trained on when they come from a ViT.
                x = LayerNorm(self.dtype, name="ln_pre")(x)
            x = constrain(x, ("batch", "length", "act_embed"))
            x = Transformer(
                depth, cfg.heads, cfg.head_dim, cfg.mlp_dim, cfg.activation, causal=False,
                scan_layers=self.scan_layers, remat_policy=self.remat_policy, dtype=self.dtype,
                attention=self.attention, layer_norm=self.layer_norm,
                name="transformer" if stage == 0 else f"transformer_{stage}",
            )(x)
            if count:
                x, groups = x[:, :-count], x[:, -count:]
                x, assignment = GroupingBlock(
                    self.num_output_groups[stage], cfg.heads, cfg.head_dim, cfg.mlp_dim, cfg.activation,
                    num_layers=cfg.layers, hard=self.hard, tau=self.tau, eval_hard=self.eval_hard,
                    dtype=self.dtype, name=f"grouping_{stage}",
                )(x, groups, train=train, rng=rngs[stage])
                assignments.append(assignment)

        tokens = LayerNorm(self.dtype, name="ln_post")(x)
        feature = tokens.mean(axis=1)
        proj = self.param("proj", partitioned(nn.initializers.normal(cfg.width**-0.5), ("embed", "proj")),
                          (cfg.width, self.embed_dim), jnp.float32)
        return TowerOutput(feature @ proj.astype(self.dtype), tokens, feature), tuple(assignments)


def _block(blocks: dict[str, Any], i: int) -> Any:
    """Block i of a `Transformer`'s params, unrolled (`resblocks_i`) or scanned (`resblocks`, stacked on axis 0)."""
    if f"resblocks_{i}" in blocks:
        return blocks[f"resblocks_{i}"]
    return jax.tree.map(lambda a: a[i], blocks["resblocks"])


def _num_blocks(blocks: dict[str, Any]) -> int:
    if "resblocks" in blocks:
        return len(jax.tree.leaves(blocks["resblocks"])[0])
    return sum(1 for k in blocks if k.startswith("resblocks_"))


def _checked(name: str, source: Any, target: Any) -> Any:
    """`source`, after checking it has `target`'s tree structure and leaf shapes."""
    if jax.tree.structure(source) != jax.tree.structure(target):
        raise ValueError(f"{name}: the ViT's parameters do not have the GroupViT's structure")
    for s, t in zip(jax.tree.leaves(source), jax.tree.leaves(target), strict=True):
        if np.shape(s) != np.shape(t):
            raise ValueError(f"{name}: ViT shape {np.shape(s)} vs GroupViT {np.shape(t)} (width and patch size must "
                             "match)")
    return source


def vit_to_groupvit_params(vit_params: Any, groupvit_params: Any, stage1_depth: int) -> dict[str, Any]:
    """`groupvit_params` with `conv1`, `positional_embedding` (without the class token's row; the grid resized
    bilinearly when the image sizes differ), `ln_pre` and the first `stage1_depth` residual blocks taken from a
    trained `VisionTransformer`'s; the rest (group tokens, grouping blocks, later stages, ln_post, proj) keep theirs.

    Both are one tower's plain (unboxed) params, e.g. `nn.unbox(variables["params"])["visual"]`; either may have
    scanned or unrolled layers. ValueError when widths, patch sizes or block shapes differ, or when either has fewer
    than `stage1_depth` stage-1 blocks.
    """
    vit, out = unfreeze(vit_params), unfreeze(groupvit_params)
    source, target = vit["transformer"], out["transformer"]
    if not 0 <= stage1_depth <= min(_num_blocks(source), _num_blocks(target)):
        raise ValueError(f"stage1_depth {stage1_depth}: the ViT has {_num_blocks(source)} blocks, the GroupViT's "
                         f"stage 1 {_num_blocks(target)}")
    out["conv1"] = _checked("conv1", vit["conv1"], out["conv1"])
    out["ln_pre"] = _checked("ln_pre", vit["ln_pre"], out["ln_pre"])

    table, patches = np.asarray(vit["positional_embedding"]), out["positional_embedding"].shape[0]
    if table.shape[0] - 1 != patches:
        grid = math.isqrt(patches)
        if grid * grid != patches:
            raise ValueError(f"GroupViT positions: {patches} is not a square grid")
        table = resize_grid_positions(table, grid, leading=1)
    out["positional_embedding"] = _checked("positional_embedding", jnp.asarray(table[1:]),
                                           out["positional_embedding"])

    blocks = [_block(source, i) for i in range(stage1_depth)]
    if "resblocks" in target:  # scanned: write the first stage1_depth slices of the stacked leaves
        if blocks:
            stacked = jax.tree.map(lambda *b: jnp.stack(b), *blocks)
            head = jax.tree.map(lambda t: t[:stage1_depth], target["resblocks"])
            _checked("transformer/resblocks", stacked, head)
            target["resblocks"] = jax.tree.map(lambda t, s: jnp.asarray(t).at[:stage1_depth].set(s),
                                               target["resblocks"], stacked)
    else:
        for i, block in enumerate(blocks):
            target[f"resblocks_{i}"] = _checked(f"transformer/resblocks_{i}", block, target[f"resblocks_{i}"])
    return out
