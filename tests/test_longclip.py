"""Long-CLIP stretching against REFERENCE section 5's formulas, written out element by element; the text tower's
two position tables; stretching a params tree; the short caption."""

import numpy as np
import pytest

from clip_jax.methods.longclip import first_sentence
from clip_jax.models.positions import (
    interpolate_positions,
    stretch_positions,
    stretch_text_positions,
    stretched_length,
)


def test_stretch_77_to_248_matches_the_paper_formula_elementwise():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(77, 8)).astype(np.float64)
    q = stretch_positions(p, keep=20, ratio=4)
    assert q.shape == (248, 8) and stretched_length(77) == 248
    for i in range(20):
        np.testing.assert_array_equal(q[i], p[i])
    for i in range(56):
        for j in range(4):
            np.testing.assert_allclose(q[20 + 4 * i + j], (1 - j / 4) * p[20 + i] + (j / 4) * p[21 + i])
    for k in range(4):
        np.testing.assert_allclose(q[244 + k], p[76] + k * (p[76] - p[75]) / 4)


def test_stretch_small_hand_computed_case():
    # 1-d table [0, 1, 3, 7] with keep 1, ratio 2: kept 0; pairs (1,3) -> 1, 2; (3,7) -> 3, 5; tail 7, 9.
    p = np.array([[0.0], [1.0], [3.0], [7.0]])
    np.testing.assert_allclose(stretch_positions(p, keep=1, ratio=2)[:, 0], [0, 1, 2, 3, 5, 7, 9])


def test_other_keep_and_ratio():
    p = np.arange(10.0)[:, None]
    q = stretch_positions(p, keep=3, ratio=3)
    assert q.shape[0] == 3 + 3 * 7
    # On a linear table stretching is a finer linear ramp: Q[keep + m] = keep + m / ratio.
    np.testing.assert_allclose(q[3:, 0], 3 + np.arange(21) / 3)


def test_interpolation_baseline_keeps_ends_and_is_linear():
    p = np.arange(77.0)[:, None] * 2.0
    q = interpolate_positions(p, 248)
    assert q.shape == (248, 1)
    np.testing.assert_allclose(q[[0, -1], 0], [0.0, 152.0])
    np.testing.assert_allclose(np.diff(q[:, 0]), 152.0 / 247)


@pytest.mark.parametrize("keep,ratio", [(-1, 4), (76, 4), (20, 0)])
def test_bad_arguments_are_refused(keep, ratio):
    with pytest.raises(ValueError):
        stretch_positions(np.zeros((77, 4)), keep=keep, ratio=ratio)


# --- the two position tables of a stretched model -----------------------------------------------------------------
def _tiny_text(context_length, keep_positions):
    from clip_jax.models.towers import TextConfig, TextTransformer

    config = TextConfig(width=16, layers=1, heads=2, head_dim=8, mlp_dim=32, vocab_size=50,
                        context_length=context_length, keep_positions=keep_positions)
    return TextTransformer(config, embed_dim=8)


def test_two_tables_read_kept_positions_from_the_first_and_train_only_the_rest():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    tower = _tiny_text(12, keep_positions=4)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 49, size=(3, 12)))
    params = nn.unbox(jax.jit(tower.init)(jax.random.key(0), tokens)["params"])  # compiled: one program each
    params = {**params, "positional_embedding_res": params["positional_embedding"] + 1.0}
    # The same tower with one table that holds rows 0-3 of the first and rows 4-11 of the second.
    single = _tiny_text(12, keep_positions=0)
    merged = {k: v for k, v in params.items() if k != "positional_embedding_res"}
    merged["positional_embedding"] = np.concatenate([params["positional_embedding"][:4],
                                                     params["positional_embedding_res"][4:]])
    np.testing.assert_allclose(jax.jit(tower.apply)({"params": params}, tokens).pooled,
                               jax.jit(single.apply)({"params": merged}, tokens).pooled, atol=1e-6)
    grads = jax.jit(jax.grad(lambda p: tower.apply({"params": p}, tokens).pooled.sum()))(params)
    kept, rest = np.abs(grads["positional_embedding"]), np.abs(grads["positional_embedding_res"])
    assert kept[4:].max() == 0 < kept[:4].max() and rest[:4].max() == 0 < rest[4:].max()


def test_stretch_text_positions_of_a_params_tree():
    table = np.random.default_rng(1).normal(size=(77, 4)).astype(np.float32)
    params = {"text": {"positional_embedding": table, "ln_final": {}}, "logit_scale": np.float32(2.0)}
    text = {"context_length": 77, "keep_positions": 0, "width": 4}
    out, out_text = stretch_text_positions(params, text, keep=20, ratio=4)
    assert out_text == {"context_length": 248, "keep_positions": 20, "width": 4}
    for name in ("positional_embedding", "positional_embedding_res"):
        np.testing.assert_array_equal(out["text"][name], stretch_positions(table, 20, 4))
    assert out["logit_scale"] == 2.0 and out["text"]["ln_final"] == {}
    # Stretching again starts from the table in use, rows < 20 of the first and the rest of the second.
    out["text"]["positional_embedding_res"] = out["text"]["positional_embedding_res"] + 1.0
    used = np.concatenate([out["text"]["positional_embedding"][:20], out["text"]["positional_embedding_res"][20:]])
    again, again_text = stretch_text_positions(out, out_text, method="interpolate", length=300)
    assert again_text["keep_positions"] == 0 and "positional_embedding_res" not in again["text"]
    np.testing.assert_allclose(again["text"]["positional_embedding"], interpolate_positions(used, 300), atol=1e-6)
    with pytest.raises(ValueError, match="needs the new length"):
        stretch_text_positions(params, text, method="interpolate")


def test_first_sentence_is_the_reference_split():
    assert first_sentence("A red car. It is parked. Behind it, a tree.") == "A red car"
    assert first_sentence("no full stop here") == "no full stop here"
    assert first_sentence("v1.2 of a plan. next") == "v1.2 of a plan"  # ". " only, not every "."
