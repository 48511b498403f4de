"""Long-CLIP stretching against REFERENCE section 5's formulas, written out element by element."""

import numpy as np
import pytest

from clip_jax.longclip import interpolate_positions, stretch_positions, stretched_length


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
