"""`clip-jax wise-ft`: a WiSE-FT run (clip_jax/methods/wise_ft.py) read back, interpolated with the zero-shot model it
started from for a list of alphas, each evaluated with the run's evaluations; one of them may be saved as a new
workdir, the model `classify`, `eval` and `export` read."""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from clip_jax.config import read_config
from clip_jax.errors import ConfigError
from clip_jax.evaluate.suite import evaluate
from clip_jax.files import (
    absolute_path,
    canonical_path,
    is_remote,
    refuse_folder_name,
    refuse_inside_workdir,
    refuse_replacing,
    results_json,
    write_atomic,
)
from clip_jax.interop.workdir import check_new_workdir, write_workdir
from clip_jax.methods.wise_ft import check_same_tree, interpolate
from clip_jax.train import loop
from clip_jax.train.checkpoint import Checkpointer

log = logging.getLogger(__name__)

DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))


def parse_alphas(text: str) -> list[float]:
    """The alphas of a comma-separated list ("0,0.5,1"), each in [0, 1]; ConfigError otherwise."""
    try:
        alphas = [float(a) for a in text.split(",")]
    except ValueError:
        raise ConfigError(f"--alphas {text!r}: give comma-separated numbers in [0, 1], e.g. 0,0.25,0.5,1") from None
    bad = [a for a in alphas if not (math.isfinite(a) and 0.0 <= a <= 1.0)]
    if bad:
        raise ConfigError(f"--alphas: {bad[0]:g} is outside [0, 1] (0: the zero-shot model, 1: the fine-tuned one)")
    return alphas


def zero_shot_params(trained, workdir) -> Any:
    """theta_0 of a WiSE-FT run read back (`train.loop.Trained` of `workdir`): the parameters it started from,
    rebuilt as the run built them (the CLIP of `config.init_from`, or of the workdir's step-0 warm start, and the
    zero-shot head of `warm_start`), in the shardings of the run's parameters. ConfigError if that CLIP is gone or
    has changed (its frozen text tower is no longer the run's)."""
    config, method = trained.config, trained.method
    if config.init_from:
        if not loop.checkpoint_steps(epath.Path(config.init_from)):  # (train's own advice names a flag of train's)
            raise ConfigError(f"config.init_from: {config.init_from}, the CLIP this run started from, holds no "
                              "checkpoint now, and wise-ft interpolates toward it: put that workdir back at this path")
        source, step = loop.init_from_checkpoint(config)
        where = f"config.init_from {config.init_from}"
    else:  # a warm start from the workdir's own step 0 (a converted CLIP)
        source, step, where = Checkpointer(workdir, config.checkpoint, reader=True), 0, f"{workdir}/checkpoints/0"
        if not (source.directory / "0").exists():
            raise ConfigError(
                f"{workdir} has no step-0 checkpoint (a converted CLIP) and no config.init_from: the run started from "
                "random weights or its start was removed, so there is no zero-shot model to interpolate toward; "
                "train a wise_ft run from a CLIP (configs/wise_ft/shapes.py)"
            )
    init_fn, shardings, _ = loop.create_state(config, method, trained.model, trained.mesh)
    abstract = loop.abstract_train_state(init_fn, shardings)
    # The run started from init_from's latest checkpoint of then: that run may have trained on since, so its other
    # steps are looked at too, newest first, for the one whose frozen parts are the run's.
    steps = [step] if not config.init_from else sorted(loop.checkpoint_steps(source.directory.parent), reverse=True)
    differs = ""
    for candidate in steps:
        try:
            base = source.restore_params(candidate, method.base_params(abstract.params))
        except ConfigError:  # parameters of another model (train's advice on it names flags wise-ft has not)
            differs = "model"
            continue
        theta0 = method.warm_start(base, trained.params)
        check_same_tree(theta0, trained.params)
        differs = next((key for key in ("text", "logit_scale", "logit_bias") if key in theta0 and not all(
            np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(theta0[key])),
                                                 jax.tree.leaves(jax.device_get(trained.params[key])), strict=True))),
            "")
        if not differs:
            if candidate != step:
                log.warning("the zero-shot model is %s's step %d, the one this run started from (its latest, %d, "
                            "is of training since)", where, candidate, step)
            return jax.tree.map(lambda a, b: jax.device_put(a, b.sharding), theta0, trained.params)
    tried = f"step {step}" if len(steps) == 1 else f"steps {', '.join(map(str, steps))}"
    what = ("a model of another size" if differs == "model" else
            f"a CLIP whose {differs} differs from the run's frozen one")
    raise ConfigError(f"{where} no longer holds the CLIP this run started from ({tried}: {what}), and wise-ft "
                      "interpolates toward it: put back the workdir, or the checkpoint (its latest step when this run "
                      "began), that the run started from")


def run_sweep(workdir, alphas: Sequence[float] = DEFAULT_ALPHAS, out=None, split: str = "test",
              save_workdir=None) -> dict[str, dict[str, float]]:
    """`clip-jax wise-ft`: the run's evaluations (`config.evals`) of theta_alpha for each alpha, {alpha: {metric:
    value}}, also written as JSON to `out` (default `<workdir>/wise_ft.json`, or `wise_ft_val.json` for `split`
    "val": its few-shot entries then score few_shot.val, `<name>_val_*`, where alpha is chosen).

    With `save_workdir` (one alpha only), theta_alpha is also saved there as a new workdir (`save_interpolated`),
    and the sweep is written only where `out` says (the run's own sweep file would be replaced by one alpha)."""
    workdir = epath.Path(workdir)
    if save_workdir is not None:
        _check_save(save_workdir, alphas)
    if not (workdir / "config.json").exists():
        raise ConfigError(f"{workdir} is not a clip_jax workdir (no config.json): give the workdir of a wise_ft run")
    name = read_config(workdir / "config.json").method.name
    if name != "wise_ft":
        raise ConfigError(
            f"{workdir} holds a {name} run: clip-jax wise-ft interpolates a fine-tuned wise_ft run (method.name="
            "wise_ft, e.g. configs/wise_ft/shapes.py) with its zero-shot start"
        )
    saved = workdir / "wise_ft_alpha.json"
    if saved.exists() and loop.checkpoint_steps(workdir) == [0]:  # its step 0 is the model: nothing fine-tuned since
        source = json.loads(saved.read_text())
        log.warning("%s is the interpolation at alpha %s of %s (wise-ft --save-workdir), not trained since: every "
                    "alpha is that one model; sweep that run for the curve", workdir, source.get("alpha"),
                    source.get("fine_tuned"))
    out = sweep_out(workdir, out, split, save_workdir)
    primary = jax.process_index() == 0
    if out is not None:
        _check_out(out, workdir, split)
        if primary and not is_remote(out) and not os.access(out.parent if out.parent.exists() else ".", os.W_OK):
            raise ConfigError(f"cannot write {out}: its folder is not writable; give --out FILE elsewhere")
    trained = loop.load_trained(workdir)
    few_shot = [entry for entry in trained.config.evals.values() if entry.type == "few_shot"]
    if split != "test" and not few_shot:
        raise ConfigError(f"--split {split} chooses the set of the run's few_shot evaluations, and "
                          f"{workdir}/config.json has none (evals: {', '.join(trained.config.evals) or 'none'})")
    for entry in few_shot:
        entry.split = split
    theta0 = zero_shot_params(trained, workdir)
    results = {}
    for alpha in alphas:
        params = interpolate(theta0, trained.params, alpha)
        results[str(float(alpha))] = evaluate(
            trained.config, trained.model, params, trained.mesh, trained.tokenizer, method=trained.method
        )
    if primary and out is not None:
        write_atomic(out, results_json(results))
    if save_workdir is not None:
        save_interpolated(trained, workdir, alphas[0], params, save_workdir)
    return results


def _check_save(save_workdir, alphas: Sequence[float]) -> None:
    """Before anything is read: one alpha to save, and a new local folder to save it in."""
    if len(alphas) != 1:
        raise ConfigError(f"--save-workdir saves one model: give one alpha (e.g. --alphas 0.5), not {len(alphas)}; "
                          "choose it from a sweep on the val split (--split val)")
    if is_remote(str(save_workdir)):
        raise ConfigError(f"--save-workdir {save_workdir}: the model is saved to a local folder; save it locally and "
                          "copy the folder to the bucket (gcloud storage cp -r)")
    if jax.process_count() > 1:  # a local folder per host would each hold a part of the checkpoint
        raise ConfigError("--save-workdir runs on one process: run clip-jax wise-ft on one host (it reads a run of "
                          "any mesh) to save the model")
    check_new_workdir(save_workdir, "--save-workdir")


def save_interpolated(trained, workdir: epath.Path, alpha: float, params: Any, save_workdir) -> None:
    """theta_alpha (`params`, on the run's mesh) as a new workdir: the run's config and tokenizer, a step-0
    checkpoint of the interpolated parameters (`interop.workdir.write_workdir`, as `convert` writes one), the run's
    record of its classes (`few_shot_classes.npz`, so the saved model names the classes it was trained on) and
    `wise_ft_alpha.json` (where it came from: the run, its step, alpha)."""
    save_workdir = pathlib.Path(save_workdir)
    # Its step 0 is the model: `train` on it warm-starts from theta_alpha, and a sweep on it interpolates toward it.
    # init_from, the CLIP the run started from, would make the sweep interpolate toward that instead.
    config = trained.config.copy_and_resolve_references()
    config.init_from = ""
    write_workdir(config, params, trained.tokenizer, save_workdir, trained.method)
    if jax.process_index() == 0:
        classes = workdir / "few_shot_classes.npz"
        if classes.exists():
            write_atomic(save_workdir / classes.name, classes.read_bytes())
        run = absolute_path(str(workdir))  # the record names the run from any folder
        source = {"alpha": float(alpha), "fine_tuned": run, "step": trained.step,
                  "zero_shot": trained.config.init_from or f"{run}/checkpoints/0"}
        write_atomic(save_workdir / "wise_ft_alpha.json", json.dumps(source, indent=2) + "\n")


def sweep_out(workdir, out=None, split: str = "test", save_workdir=None) -> epath.Path | None:
    """Where a sweep is written: `out`, else the run's own sweep file (`sweep_name`), but nowhere by default when it
    saves a model (`save_workdir`: one alpha would replace the run's sweep)."""
    if out is None and save_workdir is None:
        out = epath.Path(workdir) / sweep_name(split)
    if out is not None:
        refuse_folder_name(out)
    return epath.Path(out) if out is not None else None


def sweep_name(split: str) -> str:
    """The file of a sweep in the run's workdir: wise_ft.json (test), wise_ft_val.json (val)."""
    return "wise_ft.json" if split == "test" else f"wise_ft_{split}.json"


def _check_out(out: epath.Path, workdir: epath.Path, split: str) -> None:
    """Before any evaluation: `out` replaces nothing but an earlier sweep ({alpha: {metric: value}}), and lies in no
    workdir but as the run's own sweep of this split (`sweep_name`: a workdir's config.json written over broke the
    run; a test sweep written over the val one mixed them)."""
    if canonical_path(out) != canonical_path(workdir / sweep_name(split)):  # the run's own, however spelt
        refuse_inside_workdir(out, "--out")
    refuse_replacing(out, _earlier_sweep)


def _earlier_sweep(path: epath.Path) -> bool:
    sweep = json.loads(path.read_text())
    return isinstance(sweep, dict) and all(isinstance(v, dict) and float(k) >= 0 for k, v in sweep.items())


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """The sweep as a text table: a row per alpha, a column per metric."""
    metrics = list(dict.fromkeys(k for row in results.values() for k in row))
    width = max(len(m) for m in metrics) if metrics else 0
    lines = ["alpha  " + "  ".join(m.rjust(width) for m in metrics)]
    for alpha, row in results.items():
        cells = [f"{row[m]:.4f}" if isinstance(row.get(m), float) else str(row.get(m, "-")) for m in metrics]
        lines.append(f"{float(alpha):5.2f}  " + "  ".join(c.rjust(width) for c in cells))
    return "\n".join(lines)
