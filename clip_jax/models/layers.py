"""Transformer building blocks shared by the towers.

Parameter names follow the OpenAI CLIP checkpoints (`ln_1`, `attn/in_proj`, `mlp/c_fc`, ...) so that conversion
to and from PyTorch is a rename plus a transpose. Every parameter and the main activations carry *logical* axis
names; `clip_jax.sharding.LOGICAL_RULES` maps them to mesh axes in one place.

Logical parameter axes: `embed` (model width), `mlp`, `heads`, `kv` (head width), `qkv` (the 3 of a fused
projection), `vocab`, `positions`, `patch` (conv kernel spatial/input dims), `channels` / `channels_in` (a ResNet
convolution's output / input channels), `proj` (joint embedding), `norm`, `layers` (the stacked axis of a scanned
transformer).
Logical activation axes: `batch`, `length`, `act_embed`, `act_heads`, `act_kv`, `act_mlp`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype | type

# Named rematerialisation policies (MaxText style): what the backward pass may keep instead of recomputing.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no remat: keep every activation (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute elementwise ops
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projections, not attention
}

# Implementations of the towers' self-attention (`model.attention`): XLA's (JAX's default on every backend),
# cuDNN's fused attention (NVIDIA GPUs only, bf16/fp16), or "auto": cuDNN's where it runs, XLA's elsewhere. On an H200
# cuDNN's made the B/16 bf16 training step 1.43x and Long-CLIP L/14's 1.39x faster (docs/benchmarks.md).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
# LayerNorm's implementations in the transformer blocks and the towers' full-sequence norms: XLA's fusions, Pallas
# (Triton) kernels for NVIDIA GPUs (`layer_norm_kernel.py`), or "auto": the kernels on Hopper GPUs (timed on an H100),
# XLA's elsewhere. On an H100 the kernels ran B/16's LayerNorm forward and backward 1.9-2.1x faster than XLA's fusions
# and made the B/16 bf16 training step 1.21x and Long-CLIP L/14's 1.08x faster (docs/benchmarks.md, 2026-12-06).
LAYER_NORM_IMPLEMENTATIONS = ("auto", "xla", "pallas")

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # OpenAI's checkpoints were trained with QuickGELU; open_clip's own models with exact GELU. The weights do not
    # record which, so it is an explicit config field.
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


class TowerOutput(NamedTuple):
    """What a tower computes: `pooled`, its projected feature [B, embed_dim] (unnormalised); `tokens`, the last
    block's token states [B, T, width] before the tower's final LayerNorm, or a ResNet's final feature grid
    [B, H * W, channels] (dense and region methods read them); `feature`, the pooled feature before the
    projection [B, width] (SLIP's self-supervised head reads it)."""

    pooled: jax.Array
    tokens: jax.Array
    feature: jax.Array


def partitioned(init: Callable, names: tuple[str | None, ...]) -> Callable:
    """An initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, names)


def dense(features: int, names: tuple[str | None, str | None], name: str, dtype: Dtype = jnp.float32) -> nn.Dense:
    """A Dense layer of a head (SLIP's, LSeg's decoder): fan-in (LeCun normal) kernel with logical axis `names`
    (input, output) and a zero bias along the output's."""
    return nn.Dense(features, dtype=dtype, name=name, kernel_init=partitioned(nn.initializers.lecun_normal(), names),
                    bias_init=partitioned(nn.initializers.zeros, (names[1],)))


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh + rules context (e.g. on one device)."""
    return nn.with_logical_constraint(x, names)


def class_token_and_positions(module: nn.Module, tokens: jax.Array, dtype: Dtype) -> jax.Array:
    """[B, 1 + N, width]: a learned class token before the N patch tokens, plus learned positions; parameters
    `class_embedding` and `positional_embedding` of `module` (called from its compact `__call__`), initialised
    with CLIP's width^-0.5 scale. Shared by the ViT image tower and the spectrogram audio tower."""
    batch, n, width = tokens.shape
    init = partitioned(nn.initializers.normal(width**-0.5), ("embed",))
    class_embedding = module.param("class_embedding", init, (width,), jnp.float32)
    positions = module.param("positional_embedding",
                             partitioned(nn.initializers.normal(width**-0.5), ("positions", "embed")),
                             (n + 1, width), jnp.float32)
    cls = jnp.broadcast_to(class_embedding.astype(dtype), (batch, 1, width))
    x = jnp.concatenate([cls, tokens.astype(dtype)], axis=1) + positions.astype(dtype)
    return constrain(x, ("batch", "length", "act_embed"))


def keep_random_patches(tokens: jax.Array, keep: int, rng: jax.Array) -> jax.Array:
    """[B, 1 + N, width] -> [B, 1 + keep, width]: the class token, then `keep` of the N patch tokens drawn at random
    without replacement, independently per row (patch dropout). The kept tokens carry their positions already.
    `rng`: one key, or one per example ([B, 2] raw keys: a row's draw then depends on its key alone)."""
    batch, patches = tokens.shape[0], tokens.shape[1] - 1
    if rng.ndim == 2:
        scores = jax.vmap(lambda key: jax.random.uniform(key, (patches,)))(rng)
    else:
        scores = jax.random.uniform(rng, (batch, patches))
    _, kept = jax.lax.top_k(scores, keep)  # the highest of uniform scores: a uniform random subset per row
    patch_tokens = jnp.take_along_axis(tokens[:, 1:], kept[..., None], axis=1)
    return constrain(jnp.concatenate([tokens[:, :1], patch_tokens], axis=1), ("batch", "length", "act_embed"))


def stochastic_depth_scales(rng: jax.Array, num_layers: int, rate: float, batch: int) -> jax.Array:
    """Stochastic depth (Huang et al. 2016; DeiT's and timm's `drop_path`): [num_layers, 2, B] factors for the
    attention and MLP branches of each block, 0 where an example skips the branch, 1 / (1 - p) where it keeps it, so
    the expected residual update is the full model's. Block l of L drops each branch with p = rate * l / (L - 1),
    from 0 at the first block to `rate` at the last (their linear rule). `rng`: one key, or one per example ([B, 2]
    raw keys, as `keep_random_patches`, which draws from the key itself: this draw folds in 1 to stay independent)."""
    rates = rate * jnp.arange(num_layers, dtype=jnp.float32) / max(num_layers - 1, 1)
    if rng.ndim == 2:
        draws = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 1), (num_layers, 2)))(rng)
    else:
        draws = jax.random.uniform(jax.random.fold_in(rng, 1), (batch, num_layers, 2))
    kept = draws >= rates[:, None]  # a uniform draw below p drops the branch
    return jnp.where(kept, 1 / (1 - rates[:, None]), 0.0).transpose(1, 2, 0)


class PatchEmbedding(nn.Module):
    """[B, H, W, C] -> [B, H/ph, W/pw, width]: a convolution without bias, strided by its own ph x pw size, written
    as one matmul of the reshaped patches with the same `kernel` [ph, pw, C, width] (the conv's own parameter, so
    checkpoints and converters see `conv1/kernel` as before). On XLA:CPU the convolution's forward and kernel
    gradient took 1.5-1.9x the time of this matmul (jitted forward + kernel gradient of each at the demo's and
    B/32's shapes, 2026-12-04). Pixels past the last whole patch are dropped, as by the VALID convolution. The ViT
    and GroupViT image towers (square patches) and the spectrogram audio tower use it."""

    width: int
    patch_size: int | tuple[int, int]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        ph, pw = (self.patch_size, self.patch_size) if isinstance(self.patch_size, int) else self.patch_size
        batch, height, width, channels = images.shape
        kernel = self.param("kernel", partitioned(nn.initializers.lecun_normal(), ("patch", "patch", "patch", "embed")),
                            (ph, pw, channels, self.width), jnp.float32)
        rows, cols = height // ph, width // pw
        patches = images[:, : rows * ph, : cols * pw].astype(self.dtype).reshape(batch, rows, ph, cols, pw, channels)
        return jnp.einsum("bhpwqc,pqcd->bhwd", patches, kernel.astype(self.dtype))


@jax.custom_vjp
def block_boundary(x: jax.Array) -> jax.Array:
    """Identity between two blocks of an unrolled stack whose backward pass, on XLA:CPU only, hands the gradient
    on through a conditional, which XLA cannot fuse across (other platforms get the plain identity).

    Why: the residual stream's gradient at block i sums the contributions of every later block. XLA:CPU fuses
    that chain of adds into each block's consumers (the transposed copies feeding the weight gradients) instead of
    materialising it once per block, so each block recomputes the chain of all the later ones: quadratic in depth.
    B/32 fp32 at batch 32 took 12.3 s a step instead of 5.6 s on the 2-core development machine (2026-12-03;
    benchmarks/train_step.py --profile shows it as `layout` time). A scanned stack materialises the carry anyway.
    """
    return x


def _block_boundary_fwd(x: jax.Array) -> tuple[jax.Array, None]:
    return x, None


def _block_boundary_bwd(_, gradient: jax.Array) -> tuple[jax.Array]:
    def through_conditional(g: jax.Array) -> jax.Array:
        # The predicate depends on the data (false only for a NaN), so XLA cannot fold the conditional; the
        # branches must differ or it merges them: `a + 0.0` is a real float op (it turns -0.0 into +0.0, so XLA
        # keeps it), taken only when the gradient is already NaN.
        first = g.ravel()[0]
        return jax.lax.cond(first == first, lambda a: a, lambda a: a + 0.0, g)

    return (jax.lax.platform_dependent(gradient, cpu=through_conditional, default=lambda g: g),)


block_boundary.defvjp(_block_boundary_fwd, _block_boundary_bwd)


class LayerNorm(nn.Module):
    """LayerNorm with eps 1e-5 (CLIP) that normalises in float32 whatever the compute dtype."""

    dtype: Dtype = jnp.float32
    epsilon: float = 1e-5
    implementation: str = "auto"  # LAYER_NORM_IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        scale = self.param("scale", partitioned(nn.initializers.ones, ("norm",)), (width,), jnp.float32)
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("norm",)), (width,), jnp.float32)
        if resolved_layer_norm(self.implementation) == "pallas":
            from clip_jax.models import layer_norm_kernel  # Pallas loads only for the models that use it

            return layer_norm_kernel.layer_norm_on_gpu(x, scale, bias, self.epsilon, self.dtype)
        return layer_norm(x, {"scale": scale, "bias": bias}, self.epsilon).astype(self.dtype)


def layer_norm(x: jax.Array, params: dict[str, jax.Array], epsilon: float = 1e-5) -> jax.Array:
    """`LayerNorm`'s computation with its parameters given (a tower reading its own LayerNorm outside the call that
    made it), in float32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + epsilon) * params["scale"] + params["bias"]


class InProj(nn.Module):
    """Fused q/k/v projection: kernel [embed, 3, heads, head_dim], bias [3, heads, head_dim]. Explicit parameters
    and einsum rather than DenseGeneral, which initialises a flattened kernel and so loses per-axis names."""

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        width = x.shape[-1]
        shape = (3, self.num_heads, self.head_dim)
        kernel = self.param(
            "kernel", partitioned(nn.initializers.normal(width**-0.5), ("embed", "qkv", "heads", "kv")),
            (width, *shape), jnp.float32,
        )
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("qkv", "heads", "kv")), shape, jnp.float32)
        # [b, t, 3, h, k]: the plain [tokens, width] x [width, 3 * heads * head_dim] matmul's own layout, so
        # neither it nor its two backward matmuls need a transposed copy.
        qkv = jnp.einsum("btd,dchk->btchk", x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


class OutProj(nn.Module):
    """Output projection of attention: kernel [heads, head_dim, embed]."""

    width: int
    init_std: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        heads, head_dim = x.shape[-2:]
        kernel = self.param(
            "kernel", partitioned(nn.initializers.normal(self.init_std), ("heads", "kv", "embed")),
            (heads, head_dim, self.width), jnp.float32,
        )
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("norm",)), (self.width,), jnp.float32)
        return jnp.einsum("bthk,hkd->btd", x, kernel.astype(self.dtype)) + bias.astype(self.dtype)


def resolved_attention(implementation: str, dtype: jnp.dtype, head_dim: int | None = None) -> str:
    """The implementation that `implementation` (one of ATTENTION_IMPLEMENTATIONS) runs with `dtype` inputs of
    `head_dim` features a head: "auto" is cuDNN's where its flash attention runs (an NVIDIA GPU of compute
    capability 8.0 or later, bfloat16 or float16, head_dim a multiple of 8 up to 128, 256 from 9.0), XLA's
    otherwise, so that no model or GPU that XLA's attention runs on fails with "auto"."""
    if _chosen(implementation, ATTENTION_IMPLEMENTATIONS, "attention"):
        return implementation
    capability = cuda_compute_capability()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if capability is None or capability < (8, 0) or not half:
        return "xla"
    max_head_dim = 256 if capability >= (9, 0) else 128
    return "cudnn" if head_dim is None or (head_dim % 8 == 0 and head_dim <= max_head_dim) else "xla"


def resolved_layer_norm(implementation: str) -> str:
    """The implementation that `implementation` (one of LAYER_NORM_IMPLEMENTATIONS) runs: "auto" is the Pallas
    kernels on NVIDIA GPUs of compute capability 9.x (Hopper: the H100, where they were timed, and the H200), XLA's
    elsewhere. "pallas" runs them on any NVIDIA GPU that Triton compiles for; untimed before Hopper and after it."""
    if _chosen(implementation, LAYER_NORM_IMPLEMENTATIONS, "LayerNorm"):
        return implementation
    capability = cuda_compute_capability()
    return "pallas" if capability is not None and capability[0] == 9 else "xla"


def _chosen(implementation: str, implementations: tuple[str, ...], what: str) -> bool:
    """Whether `implementation`, one of `implementations`, names one itself rather than "auto"; ValueError if it
    is none of them."""
    if implementation not in implementations:
        raise ValueError(f"unknown {what} implementation {implementation!r}; choose one of "
                         f"{', '.join(implementations)}")
    return implementation != "auto"


def cuda_compute_capability() -> tuple[int, ...] | None:
    """(major, minor) of the first device when JAX runs on NVIDIA GPUs; None on a CPU, a TPU or AMD's GPUs (whose
    devices name an architecture such as gfx90a instead)."""
    if jax.default_backend() != "gpu":
        return None
    try:
        return tuple(int(part) for part in jax.devices()[0].compute_capability.split("."))
    except (AttributeError, ValueError):
        return None


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, is_causal: bool = False,
                          implementation: str = "auto", valid_length: int | None = None) -> jax.Array:
    """`jax.nn.dot_product_attention` of [B, T, heads, head_dim] inputs with `implementation`, one of
    ATTENTION_IMPLEMENTATIONS. `valid_length`: the sequences hold that many tokens and then padding, which the
    sequence-length mask keeps out (`Transformer` pads an odd sequence once for cuDNN's attention). cuDNN's runs
    otherwise through `padded_to_even`: JAX 0.11's cuDNN rule refuses odd lengths in training (a ViT's 197 tokens,
    the text's 77)."""
    implementation = resolved_attention(implementation, query.dtype, query.shape[-1])
    if valid_length is not None and valid_length < query.shape[1]:
        return attention_with_lengths(query, key, value, valid_length, valid_length, is_causal=is_causal,
                                      implementation=implementation)
    if implementation == "cudnn":
        return padded_to_even(query, key, value, is_causal=is_causal, implementation="cudnn")
    return jax.nn.dot_product_attention(query, key, value, is_causal=is_causal, implementation=implementation)


def attention_with_lengths(query: jax.Array, key: jax.Array, value: jax.Array, length: int, kv_length: int, *,
                           is_causal: bool, implementation: str) -> jax.Array:
    """Attention whose queries and keys past `length` and `kv_length` are padding: masked out of every softmax (the
    padded queries' outputs are meaningless, for the caller to drop)."""
    lengths = lambda n: jnp.full((query.shape[0],), n, jnp.int32)
    return jax.nn.dot_product_attention(query, key, value, is_causal=is_causal, query_seq_lengths=lengths(length),
                                        key_value_seq_lengths=lengths(kv_length), implementation=implementation)


def padded_to_even(query: jax.Array, key: jax.Array, value: jax.Array, *, is_causal: bool,
                   implementation: str) -> jax.Array:
    """Attention over sequences of even length only, with the same result. JAX 0.11.2's cuDNN training rule asks for
    even lengths whenever it sees a bias, and it always sees one (its placeholder for none): ViT-B/16 failed on an
    H200 with "Unsupported sequence length Q 197, KV 197". An odd length gets one padded position, kept out of every
    softmax by the sequence-length mask, and the padded query's output row is dropped."""
    length, kv_length = query.shape[1], key.shape[1]
    if not (length % 2 or kv_length % 2):
        return jax.nn.dot_product_attention(query, key, value, is_causal=is_causal, implementation=implementation)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, 0), (0, 0)))
    out = attention_with_lengths(pad(query), pad(key), pad(value), length, kv_length, is_causal=is_causal,
                                 implementation=implementation)
    return out[:, :length]


class Attention(nn.Module):
    """Multi-head self-attention computed by `dot_product_attention` with `implementation`."""

    num_heads: int
    head_dim: int
    causal: bool
    num_layers: int  # only for the output projection's init scale
    dtype: Dtype = jnp.float32
    implementation: str = "auto"
    valid_length: int | None = None  # see dot_product_attention

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        q, k, v = InProj(self.num_heads, self.head_dim, self.dtype, name="in_proj")(x)
        q = constrain(q, ("batch", "length", "act_heads", "act_kv"))
        out = dot_product_attention(q, k, v, is_causal=self.causal, implementation=self.implementation,
                                    valid_length=self.valid_length)
        out = constrain(out, ("batch", "length", "act_heads", "act_kv"))
        return OutProj(width, width**-0.5 * (2 * self.num_layers) ** -0.5, self.dtype, name="out_proj")(out)


class Mlp(nn.Module):
    mlp_dim: int
    activation: str
    num_layers: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        h = nn.Dense(
            self.mlp_dim,
            kernel_init=partitioned(nn.initializers.normal((2 * width) ** -0.5), ("embed", "mlp")),
            bias_init=partitioned(nn.initializers.zeros, ("mlp",)),
            dtype=self.dtype,
            name="c_fc",
        )(x)
        h = constrain(ACTIVATIONS[self.activation](h), ("batch", "length", "act_mlp"))
        return nn.Dense(
            width,
            kernel_init=partitioned(
                nn.initializers.normal(width**-0.5 * (2 * self.num_layers) ** -0.5), ("mlp", "embed")
            ),
            bias_init=partitioned(nn.initializers.zeros, ("norm",)),
            dtype=self.dtype,
            name="c_proj",
        )(h)


class ResidualBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)). With `prompt` = (tokens [M, width], use []), the
    tokens at positions [prompt_start, prompt_start + M) are first replaced by `tokens` where `use` is true (deep
    prompting: each layer reads its own learned prompt tokens, MaPLe)."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    activation: str
    causal: bool
    num_layers: int
    dtype: Dtype = jnp.float32
    prompt_start: int = 1
    attention: str = "auto"  # ATTENTION_IMPLEMENTATIONS
    valid_length: int | None = None  # tokens before the padding that `Transformer` added for cuDNN, if any
    layer_norm: str = "auto"  # LAYER_NORM_IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x: jax.Array, prompt: tuple[jax.Array, jax.Array] | None = None,
                 branch_scales: jax.Array | None = None):
        """`branch_scales` [2, B] (stochastic depth, training): the attention and MLP branches' factor per example
        (`stochastic_depth_scales`)."""
        if prompt is not None:
            tokens, use = prompt
            start, count = self.prompt_start, tokens.shape[-2]
            replaced = x.at[:, start : start + count].set(
                jnp.broadcast_to(tokens, (x.shape[0], count, x.shape[-1])).astype(x.dtype))
            x = jnp.where(use, replaced, x)
        x = constrain(x, ("batch", "length", "act_embed"))
        def scaled(branch: jax.Array, index: int) -> jax.Array:
            if branch_scales is None:
                return branch
            return branch * branch_scales[index].astype(branch.dtype)[:, None, None]

        y = LayerNorm(self.dtype, implementation=self.layer_norm, name="ln_1")(x)
        x = x + scaled(Attention(self.num_heads, self.head_dim, self.causal, self.num_layers, self.dtype,
                                 self.attention, self.valid_length, name="attn")(y), 0)
        y = LayerNorm(self.dtype, implementation=self.layer_norm, name="ln_2")(x)
        x = x + scaled(Mlp(self.mlp_dim, self.activation, self.num_layers, self.dtype, name="mlp")(y), 1)
        # The (carry, output) signature lets the same block run under nn.scan.
        return x, None


class Transformer(nn.Module):
    """A stack of residual blocks, optionally scanned (one compiled block, stacked params on a `layers` axis:
    fast compiles for deep models) and rematerialised with a named policy."""

    num_layers: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    activation: str
    causal: bool
    scan_layers: bool = False
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    prompt_start: int = 1  # where deep prompts go: after the class token (vision) or the start token (text)
    attention: str = "auto"  # ATTENTION_IMPLEMENTATIONS
    layer_norm: str = "auto"  # LAYER_NORM_IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x: jax.Array, layer_prompts: jax.Array | None = None,
                 prompt_layers: jax.Array | None = None, branch_scales: jax.Array | None = None) -> jax.Array:
        """x: [B, T, width]. layer_prompts: [num_layers, M, width], the prompt tokens each block reads (the caller
        puts layer 0's in x itself); prompt_layers: bool [num_layers], the blocks that replace their prompt tokens
        (default: all but the first). branch_scales: [num_layers, 2, B], stochastic depth's factors
        (`stochastic_depth_scales`)."""
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}")
        block_cls = ResidualBlock
        if self.remat_policy != "none":
            block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan_layers)
        # cuDNN's attention needs an even length: an odd sequence is padded by one token here, once for the whole
        # stack, rather than q, k and v in every layer (~11 ms of B/16's 220 ms step on an H200), and every layer
        # masks the padding out.
        length = x.shape[1]
        padded = length % 2 == 1 and resolved_attention(self.attention, self.dtype, self.head_dim) == "cudnn"
        if padded:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
        block_args = dict(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            mlp_dim=self.mlp_dim,
            activation=self.activation,
            causal=self.causal,
            num_layers=self.num_layers,
            dtype=self.dtype,
            prompt_start=self.prompt_start,
            attention=self.attention,
            valid_length=length if padded else None,
            layer_norm=self.layer_norm,
        )
        prompts = None
        if layer_prompts is not None:
            if layer_prompts.shape[0] != self.num_layers:
                raise ValueError(f"layer_prompts has {layer_prompts.shape[0]} layers; the transformer has "
                                 f"{self.num_layers}")
            if prompt_layers is None:
                prompt_layers = jnp.arange(self.num_layers) > 0
            prompts = (layer_prompts, jnp.asarray(prompt_layers, bool))
        if self.scan_layers:
            scanned = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(**block_args, name="resblocks")(x, prompts, branch_scales)
        else:
            for i in range(self.num_layers):
                layer_prompt = None if prompts is None else jax.tree.map(lambda a, i=i: a[i], prompts)
                layer_scales = None if branch_scales is None else branch_scales[i]
                x, _ = block_cls(**block_args, name=f"resblocks_{i}")(x, layer_prompt, layer_scales)
                x = block_boundary(x)
        return x[:, :length] if padded else x


def relayout_blocks(tree: Any, like: Any, stack: Callable[[list], Any], take: Callable[[Any, int], Any]) -> Any:
    """`tree` (nested dicts: parameters, or their shapes) with each Transformer's blocks in `like`'s layout where
    the two differ: stacked, one `resblocks` with a leading layer axis (scan_layers=True), or unrolled,
    `resblocks_0`, `resblocks_1`, ... `stack(leaves)` joins a leaf's blocks, `take(leaf, i)` reads block i of a
    stacked leaf. What `like` lacks is kept as it is."""
    if not isinstance(tree, Mapping) or not isinstance(like, Mapping):
        return tree
    blocks = [key for key in tree if _BLOCK.fullmatch(key)]
    out = {key: relayout_blocks(value, like.get(key), stack, take) for key, value in tree.items() if key not in blocks}
    if "resblocks" in like and "resblocks_0" in tree:
        unrolled = [tree[f"resblocks_{i}"] for i in range(len(blocks))]
        out["resblocks"] = jax.tree.map(lambda *leaves: stack(list(leaves)), *unrolled)
    elif "resblocks_0" in like and "resblocks" in tree:
        for i in range(jax.tree.leaves(tree["resblocks"])[0].shape[0]):  # (a count unlike `like`'s is then told)
            out[f"resblocks_{i}"] = jax.tree.map(lambda leaf, i=i: take(leaf, i), tree["resblocks"])
    else:
        out.update({key: relayout_blocks(tree[key], like.get(key), stack, take) for key in blocks})
    return out


def relayout_parameter_trees(tree: Any, like: Mapping, stack: Callable[[list], Any],
                             take: Callable[[Any, int], Any]) -> Any:
    """`relayout_blocks` of every parameter tree within `tree`: a train state's parameters and the optimizer's
    trees of them (Adam's moments, with optax's placeholders for frozen parameters), told apart by `like`'s top-level
    keys. Raises ValueError where blocks cannot be stacked: frozen in some and trained in others."""
    keys = set(like)
    is_parameter_tree = lambda sub: isinstance(sub, Mapping) and set(sub) == keys
    return jax.tree.map(lambda sub: relayout_blocks(sub, like, stack, take) if is_parameter_tree(sub) else sub, tree,
                        is_leaf=is_parameter_tree)


def has_stacked_blocks(tree: Any) -> bool:
    """Whether the parameter tree holds its Transformer blocks stacked (model.scan_layers)."""
    return isinstance(tree, Mapping) and any(key == "resblocks" or has_stacked_blocks(value)
                                             for key, value in tree.items())


_BLOCK = re.compile(r"resblocks(_\d+)?")  # a Transformer's blocks, stacked or one of the unrolled
