"""Training curves (loss, accuracies) of a workdir's metrics.jsonl as a PNG."""

from __future__ import annotations

import io

from etils import epath

from clip_jax.files import write_atomic
from clip_jax.train.metrics import read_metrics


def _dot_if_one(points: list) -> dict:
    """A line of one point draws nothing (a run shorter than log.every_steps logs one train record): a dot then."""
    return {"marker": "o"} if len(points) == 1 else {}


def plot_training_curves(metrics_path: epath.PathLike, out_path: epath.PathLike) -> None:
    """Paths through etils.epath: the workdir may be a bucket."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator, NullFormatter

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", **_dot_if_one(train))
    # a method's loss terms (SLIP's loss_clip and loss_ssl, Long-CLIP's loss_long and loss_short, ...)
    for key in sorted({k for r in train for k in r if k.startswith("loss_")}):
        points = [(r["step"], r[key]) for r in train if key in r]
        ax_loss.plot(*zip(*points, strict=True), label=key, alpha=0.7, linewidth=1, **_dot_if_one(points))
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    # Plain numbers (2, 3, 4 rather than 2 x 10^0). Minor ticks are labelled only within one decade, where they are
    # the only labels; over several decades their labels would overlap, and the decades' own suffice.
    ax_loss.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    losses = [v for r in train for k, v in r.items() if (k == "loss" or k.startswith("loss_")) and v > 0]
    within_a_decade = bool(losses) and max(losses) < 10 * min(losses)
    ax_loss.yaxis.set_minor_formatter(FormatStrFormatter("%g") if within_a_decade else NullFormatter())
    ax_loss.legend()
    for key, label in (("i2t_acc", "train batch i2t acc"), ("train_acc", "train batch top-1"),
                       ("pixel_acc", "train batch pixel acc")):
        points = [(r["step"], r[key]) for r in train if key in r]  # (a record may lack one: another method's)
        if points:
            ax_acc.plot(*zip(*points, strict=True), label=label, alpha=0.6, **_dot_if_one(points))
    few_shot = sorted({k for r in evals for k in r if k.endswith(("_base", "_new", "_hm", "_all"))})
    for key in ("zero_shot_top1", "zero_shot_top1_seen", "i2t_r1", "t2i_r1", "seg_seen_miou", "seg_novel_miou",
                *few_shot):
        points = [(r["step"], r[key]) for r in evals if key in r]
        if points:
            ax_acc.plot(*zip(*points, strict=True), marker="o", label=key)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("score (evaluations: dots)")
    ax_acc.set_ylim(0, 1.02)
    if ax_acc.get_legend_handles_labels()[0]:  # a run with no accuracy metric logged leaves the panel empty
        ax_acc.legend(loc="best", fontsize="small")  # where it covers the fewest points
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, not 2.25 of a short run
    fig.tight_layout()
    png = io.BytesIO()  # matplotlib writes local files only
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_atomic(out_path, png.getvalue())
