"""LayerNorm forward and backward as Pallas (Triton) kernels for NVIDIA GPUs: `model.layer_norm = "pallas"`.

Why: on an H200 (2026-12-04, docs/benchmarks.md) XLA ran the B/16 step's LayerNorm backward as Triton normalisation
fusions with 255 registers a thread and 12.5% occupancy, at ~1 TB/s of the chip's 4.8: 38.5 ms of a 220 ms step. On
an H100 (2026-12-06) these kernels ran B/16's LayerNorms 1.9-2.1x faster (in the training step at 2.2-2.9 TB/s of
its 3.35), and the step 1.21x faster; `model.layer_norm="auto"` runs them on Hopper GPUs. These kernels read and
write each tensor once: the forward reads x and writes y (in the compute dtype) with each row's mean and 1/std; the
backward reads x, dy and those statistics, writes dx, and sums the scale's and bias's gradients per program into
partials (flat, [programs * width]) that XLA adds up.

Each program of the forward takes `rows` rows; each of the backward `rows * chunks`, `rows` at a time. Triton's
tiles are powers of two, so a row of `width` features is read as `next_power_of_2(width)` lanes, the rest masked.
Statistics and arithmetic are float32 whatever the input dtype, as `layers.layer_norm`'s. `interpret=True` runs the
same kernels on any backend: the tests check them on the CPU against `layers.layer_norm` and its autodiff, and
lower them to Triton for CUDA; `benchmarks/layer_norm.py` times them against XLA's on a GPU.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from clip_jax.errors import ConfigError
from clip_jax.sharding import logical_to_spec


def _lanes(width: int) -> int:
    return pl.next_power_of_2(width)


def _tile(rows: int, width: int, first_row: jax.Array, n_rows: int) -> tuple[jax.Array, ...]:
    """Row and lane indices of a [rows, lanes] tile from `first_row`, and its masks (rows, lanes, both)."""
    row = first_row + jnp.arange(rows)
    lane = jnp.arange(_lanes(width))
    row_ok, lane_ok = row < n_rows, lane < width
    return row, lane, row_ok, lane_ok, row_ok[:, None] & lane_ok[None, :]


def _forward_kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, *, rows: int, eps: float):
    n_rows, width = x_ref.shape
    row, lane, row_ok, lane_ok, ok = _tile(rows, width, pl.program_id(0) * rows, n_rows)
    x = plgpu.load(x_ref.at[row[:, None], lane[None, :]], mask=ok, other=0.0).astype(jnp.float32)
    mean = x.sum(axis=1) / width
    centred = jnp.where(ok, x - mean[:, None], 0.0)
    rstd = jax.lax.rsqrt((centred * centred).sum(axis=1) / width + eps)
    scale = plgpu.load(scale_ref.at[lane], mask=lane_ok, other=0.0).astype(jnp.float32)
    bias = plgpu.load(bias_ref.at[lane], mask=lane_ok, other=0.0).astype(jnp.float32)
    y = centred * rstd[:, None] * scale[None, :] + bias[None, :]
    plgpu.store(y_ref.at[row[:, None], lane[None, :]], y.astype(y_ref.dtype), mask=ok)
    plgpu.store(mean_ref.at[row], mean, mask=row_ok)
    plgpu.store(rstd_ref.at[row], rstd, mask=row_ok)


def _backward_kernel(x_ref, scale_ref, mean_ref, rstd_ref, dy_ref, dx_ref, dscale_ref, dbias_ref, *, rows: int,
                     chunks: int):
    n_rows, width = x_ref.shape
    lane = jnp.arange(_lanes(width))
    lane_ok = lane < width
    scale = plgpu.load(scale_ref.at[lane], mask=lane_ok, other=0.0).astype(jnp.float32)
    program = pl.program_id(0)

    def chunk(i, sums):
        row, lane_, row_ok, _, ok = _tile(rows, width, (program * chunks + i) * rows, n_rows)
        at = (row[:, None], lane_[None, :])
        x = plgpu.load(x_ref.at[at], mask=ok, other=0.0).astype(jnp.float32)
        dy = plgpu.load(dy_ref.at[at], mask=ok, other=0.0).astype(jnp.float32)
        mean = plgpu.load(mean_ref.at[row], mask=row_ok, other=0.0)
        rstd = plgpu.load(rstd_ref.at[row], mask=row_ok, other=0.0)
        x_hat = jnp.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        scaled_dy = dy * scale[None, :]  # zero outside the tile's valid rows and lanes, as dy is
        # d/dx of (x_hat * scale + bias): rstd * (g - mean(g) - x_hat * mean(g * x_hat)), with g = dy * scale
        mean_g = scaled_dy.sum(axis=1) / width
        mean_g_x_hat = (scaled_dy * x_hat).sum(axis=1) / width
        dx = (scaled_dy - mean_g[:, None] - x_hat * mean_g_x_hat[:, None]) * rstd[:, None]
        plgpu.store(dx_ref.at[at], dx.astype(dx_ref.dtype), mask=ok)
        dscale, dbias = sums  # [rows, lanes] each: summed over rows once, after the loop, not in every chunk
        return dscale + dy * x_hat, dbias + dy

    zeros = jnp.zeros((rows, _lanes(width)), jnp.float32)
    dscale, dbias = jax.lax.fori_loop(0, chunks, chunk, (zeros, zeros))
    dscale, dbias = dscale.sum(axis=0), dbias.sum(axis=0)
    # [programs * width] partials, flat: a vector index alone, as the other loads and stores take
    plgpu.store(dscale_ref.at[program * width + lane], dscale, mask=lane_ok)
    plgpu.store(dbias_ref.at[program * width + lane], dbias, mask=lane_ok)


def _warps(rows: int, width: int) -> int:
    """Triton warps for a [rows, lanes] tile: ~16 float32 values a thread, 1 to 8 warps."""
    return max(1, min(8, rows * _lanes(width) // (16 * 32)))


def _forward(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, out_dtype: jnp.dtype | None, rows: int,
             chunks: int, interpret: bool):
    flat = x.reshape(-1, x.shape[-1])
    n_rows, width = flat.shape
    y, mean, rstd = pl.pallas_call(
        functools.partial(_forward_kernel, rows=rows, eps=eps),
        grid=(pl.cdiv(n_rows, rows),),
        out_shape=(jax.ShapeDtypeStruct(flat.shape, out_dtype or x.dtype), jax.ShapeDtypeStruct((n_rows,), jnp.float32),
                   jax.ShapeDtypeStruct((n_rows,), jnp.float32)),
        compiler_params=plgpu.CompilerParams(num_warps=_warps(rows, width)),
        interpret=interpret,
        name="layer_norm_forward",
    )(flat, scale, bias)
    return y.reshape(x.shape), (flat, scale, mean, rstd)


def _backward(eps: float, out_dtype: jnp.dtype | None, rows: int, chunks: int, interpret: bool, residuals,
              dy: jax.Array):
    del eps, out_dtype  # eps is in rstd already; dy comes in the output's dtype
    flat, scale, mean, rstd = residuals
    n_rows, width = flat.shape
    programs = pl.cdiv(n_rows, rows * chunks)
    dx, dscale, dbias = pl.pallas_call(
        functools.partial(_backward_kernel, rows=rows, chunks=chunks),
        grid=(programs,),
        out_shape=(jax.ShapeDtypeStruct(flat.shape, flat.dtype),
                   jax.ShapeDtypeStruct((programs * width,), jnp.float32),
                   jax.ShapeDtypeStruct((programs * width,), jnp.float32)),
        compiler_params=plgpu.CompilerParams(num_warps=_warps(rows, width)),
        interpret=interpret,
        name="layer_norm_backward",
    )(flat, scale, mean, rstd, dy.reshape(flat.shape))
    dscale, dbias = (partial.reshape(programs, width).sum(0).astype(scale.dtype) for partial in (dscale, dbias))
    return dx.reshape(dy.shape), dscale, dbias


# The tests run the kernels on a CPU through Pallas's interpreter by setting this.
INTERPRET = False


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-5, out_dtype: jnp.dtype | None = None,
               rows: int = 4, chunks: int = 32, interpret: bool = False) -> jax.Array:
    """LayerNorm of x's last axis with `scale` and `bias` [width], in `out_dtype` (default x's; the statistics and
    arithmetic in float32): the kernels above, `rows` rows a program forward, `rows * chunks` backward."""
    return _forward(x, scale, bias, eps, out_dtype, rows, chunks, interpret)[0]


layer_norm.defvjp(_forward, _backward)


def layer_norm_on_gpu(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, out_dtype: jnp.dtype) -> jax.Array:
    """`layer_norm` for `LayerNorm(implementation="pallas")` on x [batch, ..., width]: refused in one line off an
    NVIDIA GPU. Inside a mesh of several devices (the trainer's), the kernels run per device on its rows through
    `jax.shard_map`, the batch split as the logical rules split it and the width whole: XLA cannot partition a Triton
    call, and would gather the whole batch onto every device for it. The scale's and bias's gradients are summed
    over the devices by shard_map's transpose."""
    if not INTERPRET and jax.default_backend() != "gpu":  # the trainer says so before it builds anything
        raise ConfigError(f"model.layer_norm 'pallas' runs Triton kernels on NVIDIA GPUs; this machine runs on "
                          f"{jax.default_backend()}: use model.layer_norm 'xla'")
    norm = functools.partial(layer_norm, eps=eps, out_dtype=jnp.dtype(out_dtype), interpret=INTERPRET)
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or mesh.size == 1 or not rules:
        return norm(x, scale, bias)
    rows = logical_to_spec(("batch", *[None] * (x.ndim - 1)), x.shape, mesh, rules)
    return jax.shard_map(norm, mesh=mesh, in_specs=(rows, P(), P()), out_specs=rows, check_vma=False)(x, scale, bias)
