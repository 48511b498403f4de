"""curves.png: what each series draws."""

import matplotlib.axes

from clip_jax.plots import plot_training_curves
from clip_jax.train.metrics import MetricsWriter


def drawn_lines(tmp_path, monkeypatch, steps):
    """{label: the keyword arguments of its Axes.plot call} of the curves of a run that logged at `steps`."""
    tmp_path.mkdir()
    writer = MetricsWriter(tmp_path, 4, 0, tensorboard=False, progress_bar=False)
    for step in steps:
        writer.write(step, {"loss": 3.0 / step, "loss_ssl": 1.0 / step, "i2t_acc": 0.1 * step})
    writer.close()
    calls, plot = {}, matplotlib.axes.Axes.plot

    def record(self, *args, **kwargs):
        calls[kwargs.get("label")] = kwargs
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record)
    plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    return calls


def test_a_series_of_one_point_is_drawn_as_a_dot(tmp_path, monkeypatch):
    """A run shorter than log.every_steps logs one train record, and a line of one point drew nothing: the loss
    panel showed its legend alone."""
    one = drawn_lines(tmp_path / "one", monkeypatch, [20])
    assert {label: kwargs.get("marker") for label, kwargs in one.items()} == {
        "train loss": "o", "loss_ssl": "o", "train batch i2t acc": "o"}
    two = drawn_lines(tmp_path / "two", monkeypatch, [10, 20])
    assert not any(kwargs.get("marker") for kwargs in two.values())
