"""The training loop. It reads top to bottom: workdir and config, mesh, data, model and state, restore, compile,
steps (metrics, checkpoints, evaluations), final evaluation and results."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from clip_jax.config import (
    ConfigError,
    absolute_paths,
    check_devices,
    check_input_paths,
    model_config,
    read_config,
    save_config,
)
from clip_jax.data.pipeline import (
    DataCounts,
    check_tokenizer_file,
    check_train_source,
    make_tokenizer,
    train_data_identity,
)
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.distributed import barrier, batch_rows, refuse_different_launches
from clip_jax.errors import sigterm_raises
from clip_jax.evaluate.encoder import Encoder
from clip_jax.evaluate.suite import check_prompts, evaluate, evaluation_settings, print_results
from clip_jax.evaluate.suite import due as evals_due
from clip_jax.files import absolute_path, diff_settings, is_remote, is_workdir, results_json, same_setting, write_atomic
from clip_jax.hlo import collective_traffic, describe_traffic
from clip_jax.methods import get_method
from clip_jax.methods.base import Method, Preparation, abstract_batch
from clip_jax.models import flops as flops_lib
from clip_jax.models.towers import IMAGE_DROPOUT_FIELDS
from clip_jax.sharding import (
    LOGICAL_RULES,
    batch_divisor,
    batch_sharding,
    global_batch,
    make_mesh,
    match_any,
    reader_mesh,
    tensor_across_processes,
)
from clip_jax.train import memory as memory_lib
from clip_jax.train import state as state_lib
from clip_jax.train import step as step_lib
from clip_jax.train.checkpoint import Checkpointer
from clip_jax.train.metrics import MetricsWriter, read_metrics
from clip_jax.train.run_lock import LOCK_NAME, Holding, hold_workdir

log = logging.getLogger(__name__)


# Model fields that leave the parameters' meaning as it is: any resume may change them (a run started before
# `model.attention` became "auto", a remat policy for other devices' memory, patch dropout turned off for FLIP's
# unmasked tuning at the end of a run, stochastic depth likewise; a run started before the field existed had none;
# the blocks scanned or not, e.g. a run moved from TPUs to GPUs: `Checkpointer.restore` stacks or unrolls the
# parameters and the optimizer state alike).
_RESUME_FIELDS = ("model.attention", "model.layer_norm", "model.remat_policy", "model.scan_layers",
                  *(f"model.vision.{field}" for field in IMAGE_DROPOUT_FIELDS))
# Model fields that say how the parameters are used, not what they are: a warm start may set them anew (e.g. bf16
# compute, Long-CLIP's unclamped temperature, the patch tokens' mean as the image's feature, on a converted or
# stretched model).
_WARM_START_FIELDS = (*_RESUME_FIELDS, "model.dtype", "model.logit_scale_init", "model.max_logit_scale",
                      "model.vision.pool")


def prepare_workdir(config: ml_collections.ConfigDict, workdir: epath.Path, checkpoint_step: int | None = None,
                    fixed: tuple[str, ...] = ("model",)) -> None:
    """Writes config.json. On a workdir with a checkpoint (its latest step `checkpoint_step`), refuses a different
    model, or other `fixed` groups (the method's `fixed_groups`, e.g. the data its cached embeddings came from):
    resuming it would mix runs. Any resume may change the fields in `_RESUME_FIELDS`; a warm start (the only
    checkpoint is step 0: converted or stretched) those in `_WARM_START_FIELDS`. Without a checkpoint, config.json
    is a failed launch's and is replaced."""
    check_workdir_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.json"
    if checkpoint_step and config.total_steps < checkpoint_step:  # it would save step 60's state as "step 50"
        raise ConfigError(f"total_steps {config.total_steps} is below the step this run has reached "
                          f"({checkpoint_step}): give --config.total_steps={checkpoint_step} or more (a run does not "
                          "go back; its earlier checkpoints are under checkpoints/)")
    if checkpoint_step is not None and path.exists():
        previous = read_config(path)
        groups = [g for g in fixed if g != "model"]
        changed = sorted(d for g in groups for d in diff_settings(
            previous[g].to_dict(), json.loads(json.dumps(config[g].to_dict(), default=list)), g))
        if changed:
            raise ConfigError(f"workdir {workdir} holds a run with other {' / '.join(groups)} settings "
                              f"({', '.join(changed)}): resume it with its own (drop those overrides), or use a new "
                              "--workdir")
        _refuse_tokenizer_change(previous.data, config.data, workdir)
        old, new = previous.model.to_dict(), json.loads(json.dumps(config.model.to_dict(), default=list))
        free = _WARM_START_FIELDS if checkpoint_step == 0 else _RESUME_FIELDS
        diff = [d for d in sorted(diff_settings(old, new)) if d.partition(":")[0] not in free]
        if diff:
            old_context, new_context = old["text"]["context_length"], new["text"]["context_length"]
            # The positional embedding's length is fixed by the checkpoint: the one change with a tool of its own.
            stretch = (
                f"; to lengthen the text context, `clip-jax stretch --workdir {workdir} --out-workdir NEW"
                f"{_stretch_flags(old_context, new_context, new['text'].get('keep_positions', 0))}` and train in NEW"
                if new_context > old_context else ""
            )
            fields = [d.partition(":")[0] for d in diff]  # model.text.context_length, ...
            own = " ".join(shlex.quote(f"--config.{f}={_flag_value(_field(old, f.removeprefix('model.')))}")
                           for f in fields)
            # init_from takes the parameters as they are: a route only where the changed fields keep their shapes
            reuse = (f" (--config.init_from={workdir} starts one from this run's parameters)"
                     if all(f in _WARM_START_FIELDS for f in fields) else "")
            # keep_positions 0 (an interpolated stretch) trains its one table: a keep recipe's rule would freeze it
            unfreeze = (" " + _without_position_rules(config)
                        if old["text"].get("keep_positions", 0) == 0 != new["text"].get("keep_positions", 0)
                        and _freezes_positions(config) else "")
            raise ConfigError(
                f"workdir {workdir} holds a run with a different model ({', '.join(diff)}): train it with its own "
                f"model ({own}{unfreeze}), or use a new --workdir{reuse}{stretch}"
            )
        if checkpoint_step == 0 and jax.process_index() == 0:  # a warm start's parameters, trained with `old`'s
            _tell_meaning_changes(old, config.model, f"the model of {workdir}'s step-0 checkpoint")
        if checkpoint_step:
            _refuse_a_new_start(previous, config, workdir, checkpoint_step)
        if checkpoint_step == config.total_steps:  # complete: this launch evaluates, and trains nothing
            _tell_untrained_changes(previous, config, checkpoint_step, workdir)
            barrier("config.json checked")
            return  # config.json keeps the settings that trained
        _refuse_losing_kept_checkpoints(previous.checkpoint, config.checkpoint, checkpoint_steps(workdir))
        _tell_resume_changes(previous, config, checkpoint_step, path)
        _tell_evaluation_changes(previous, config, checkpoint_step)
    barrier("config.json checked")  # process 0 rewrites it only once every process has read the old one
    if jax.process_index() == 0:
        save_config(config, path)


def _refuse_a_new_start(previous: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                        workdir: epath.Path, step: int) -> None:
    """A resume of a trained run (`step` > 0) with another method, or another init_from: the method's loss and
    parameters would change mid-run (a later launch then failed on its records), and an init_from is read by a new
    run only, so the resume went on without it, silently. Both start a new run: in a new workdir."""
    route = f"name a new --workdir (--config.init_from={workdir} starts it from this run's parameters)"
    if previous.method.name != config.method.name:
        raise ConfigError(f"workdir {workdir} holds a run of method {previous.method.name!r} (step {step}), and a "
                          f"resume keeps its method: drop --config.method.name={config.method.name} (or use that "
                          f"run's recipe) to resume it; to train method {config.method.name!r} from it, {route}")
    if config.init_from and not same_setting(previous.get("init_from", ""), config.init_from):
        raise ConfigError(f"workdir {workdir} holds a run at step {step}, which a launch resumes: init_from "
                          f"{config.init_from} starts a new run only, and would not be read; drop "
                          "--config.init_from to resume it, or name a new --workdir to start from "
                          f"{config.init_from}")


def _refuse_losing_kept_checkpoints(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict,
                                    steps: list[int]) -> None:
    """The checkpoints the run's keep_period keeps forever, which this launch's would let the rotation delete (a
    relaunch that left the override out deleted them as its first new checkpoints were saved)."""
    old_period, new_period = old.get("keep_period", 0), new.get("keep_period", 0)
    lost = [s for s in steps if s and old_period and s % old_period == 0 and not (new_period and s % new_period == 0)]
    if lost:
        raise ConfigError(f"checkpoints {', '.join(map(str, lost))} are kept by the run's checkpoint.keep_period "
                          f"{old_period}, and this launch's keep_period {new_period} would let the rotation "
                          f"(max_to_keep {new.max_to_keep}) delete them: relaunch with "
                          f"--config.checkpoint.keep_period={old_period}, or move them out of checkpoints/ first if "
                          "they may go")


def _tell_untrained_changes(previous: ml_collections.ConfigDict, config: ml_collections.ConfigDict, step: int,
                            workdir: epath.Path) -> None:
    """A complete run relaunched evaluates its final checkpoint: other settings of training train nothing, and
    config.json keeps the ones that trained (it was written over with settings no step had)."""
    changed = _training_changes(previous, config)
    if changed and jax.process_index() == 0:
        log.warning("%s is complete (step %d): this launch's other settings (%s) train nothing, and its config.json "
                    "keeps the run's; raise --config.total_steps to train on with them", workdir, step,
                    ", ".join(changed))


def _refuse_tokenizer_change(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict, workdir: epath.Path
                             ) -> None:
    """A resume reads the workdir's tokenizer.json, whose ids the model was trained on: another `data.tokenizer` (or
    vocabulary size of a trained one) was written to config.json and never applied."""
    keys = ["tokenizer"] + ["tokenizer_vocab_size"] * (old.get("tokenizer") == new.get("tokenizer") == "train")
    if changed := [k for k in keys if not same_setting(old.get(k), new.get(k))]:
        raise ConfigError(f"workdir {workdir} holds a run whose tokenizer.json was made with "
                          f"{', '.join(f'data.{k} {old.get(k)!r}' for k in changed)}, which its model's token ids "
                          f"come from: a resume keeps it (drop {', '.join(f'--config.data.{k}' for k in changed)}), "
                          "or train a new run in a new --workdir")


def _stretch_flags(current: int, wanted: int, keep: int) -> str:
    """The `clip-jax stretch` flags that turn `current` text positions into `wanted` with `keep` kept (its method
    "keep" makes keep + ratio x (current - keep); none kept is plain interpolation), or "" where no ratio does."""
    if keep == 0:
        return f" --method interpolate --length {wanted}"
    ratio, rest = divmod(wanted - keep, current - keep) if current > keep else (0, 1)
    if rest or ratio < 2:
        return ""
    return "".join((f" --keep {keep}" if keep != 20 else "", f" --ratio {ratio}" if ratio != 4 else ""))


def _field(tree: dict, dotted: str) -> Any:
    """The value at a dotted path of a nested dict; None where the path is missing (a field only the new config has)."""
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _flag_value(value: Any) -> str:
    """A config value as a --config.key=VALUE override gives it: strings bare, the rest as Python literals."""
    return value if isinstance(value, str) else repr(tuple(value) if isinstance(value, list) else value)


def _move_kept_settings(workdir: epath.Path, latest: int, restored: int) -> None:
    """After a resume fell back from an unreadable latest checkpoint to `restored`: the settings kept apart by the
    resume's warning are those until `restored`, not until `latest` (the warning named that step)."""
    kept, until = settings_until(workdir, latest), settings_until(workdir, restored)
    if kept.exists() and not until.exists():
        kept.rename(until)
        log.warning("the settings until step %d are kept in %s (the resume fell back from step %d)", restored,
                    until.name, latest)


def settings_until(workdir: epath.Path, step: int | None) -> epath.Path:
    """Where a resume with changed settings keeps the ones the run trained with until `step`."""
    return workdir / f"config_until_step_{step}.json"


def _training_changes(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> list[str]:
    """The settings that differ ("optimizer.lr 0.001 -> 0.0005"), but for those a relaunch may change without
    changing what trains (another machine's mesh, logging, evaluations, checkpoint cadence)."""
    untold = ("mesh", "log", "eval", "evals", "checkpoint")
    a, b = ({k: v for k, v in json.loads(json.dumps(c.to_dict(), default=list)).items() if k not in untold}
            for c in (old, new))
    return _changes(a, b)


def _changes(a: dict, b: dict) -> list[str]:
    """The settings that differ between two config dicts, as messages list them ("optimizer.lr 0.001 -> 0.0005")."""
    return [d.removeprefix("config.").replace(": ", " ", 1) for d in diff_settings(a, b, "config")]


def _tell_resume_changes(previous: ml_collections.ConfigDict, config: ml_collections.ConfigDict, step: int,
                         path: epath.Path) -> None:
    """A resume may change settings (train longer, lower the rate, another batch size, seed or data; of the model,
    those `_RESUME_FIELDS` allows): said in one line, since it may be a mistake, and the settings the run had until
    now are kept beside config.json (`config_until_step_<step>.json`), which then holds the new ones. The schedule is
    a function of the step: the learning rate jumps to the new one's at the resumed step."""
    if step == 0:  # a warm start (converted or stretched) starts its own run: its config.json holds the defaults
        return
    kept = settings_until(path.parent, step)
    # A launch that changed config.json and died before its first step left its settings there, not the trained
    # ones: the record kept at this step is what trained until it.
    trained = read_config(kept) if kept.exists() else previous
    changed = _training_changes(trained, config)
    if not changed or jax.process_index() != 0:
        return
    if not kept.exists():
        save_config(previous, kept)
    schedule = any(c.startswith(_SCHEDULE_SETTINGS) for c in changed)
    log.warning("resuming at step %d with changed settings (%s)%s; the settings until now are kept in %s (a change "
                "the command does not name comes from its --config file, or from this version's defaults: without "
                "--config a relaunch goes on with config.json's)", step, ", ".join(map(_short, changed)),
                ": the learning rate follows the new schedule from this step on" if schedule else "", kept.name)


def _short(change: str, limit: int = 100) -> str:
    """A setting's change as a message lists it, cut where its values are long (a list of prompts)."""
    return change if len(change) <= limit else change[:limit - 3] + "..."


# The settings the learning rate schedule is a function of (`state.learning_rate_schedule`), as changes name them.
_SCHEDULE_SETTINGS = ("total_steps ", "optimizer.lr ", "optimizer.warmup_steps ", "optimizer.min_lr_ratio ")


def _tell_evaluation_changes(previous: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                             step: int) -> None:
    """A resume's evaluation settings that change its figures (another entry, other prompts or examples): not a
    change of training, but metrics.jsonl's figures before and after `step` are then of two kinds, said in one line
    (an entry's default that changed between versions came in unsaid)."""
    before, after = (_figures_of(evaluation_settings(c)) for c in (previous, config))
    if step and jax.process_index() == 0 and not same_setting(before, after):
        changed = _changes(before, after)
        log.warning("resuming at step %d with other evaluation settings (%s): its figures from here on are not "
                    "comparable with the earlier ones in metrics.jsonl", step, ", ".join(map(_short, changed)))


def _figures_of(settings: dict) -> dict:
    """The evaluation settings that change the figures (not when, nor in what batches, it evaluates)."""
    return {"eval": {k: v for k, v in settings["eval"].items() if k not in ("every_steps", "batch_size")},
            "evals": {name: {k: v for k, v in entry.items() if k != "every_steps"}
                      for name, entry in settings["evals"].items()}}


TRAIN_DATA_RECORD = "train_data.json"


def tell_data_changes(workdir: epath.Path, config: ml_collections.ConfigDict, resume_step: int | None) -> None:
    """A resume reads on from its checkpoint's data position: in a caption table that changed since the run's last
    launch (rows added, removed or edited, under the same data.path) that position indexes other rows, and the
    examples from there on are not the ones the run would have read. Said in one line (it may be meant: more data);
    each launch records the training data it read in `train_data.json` (process 0). A changed data.path is told with
    the other settings (`_tell_resume_changes`)."""
    if jax.process_index() != 0 or (identity := train_data_identity(config)) is None:
        return
    record = {"source": config.data.source, "path": config.data.path, **identity}
    path = workdir / TRAIN_DATA_RECORD
    try:
        before = json.loads(path.read_text()) if resume_step and path.exists() else None
    except (OSError, ValueError):  # torn or unreadable: nothing to compare with, and it is written again below
        before = None
    # (compared on what both recorded: a record of an earlier version lacks the shards' versions)
    if (isinstance(before, dict) and (before.get("source"), before.get("path")) == (record["source"], record["path"])
            and any(before[key] != value for key, value in record.items() if key in before)):
        unit = "rows" if "rows" in record else "shards"
        counts = (f"{before.get(unit)} {unit} then, {record[unit]} now" if before.get(unit) != record[unit] else
                  f"{record[unit]} {unit} then and now, not all the same")
        log.warning("data.path %s changed since the run's last launch (%s): training goes on from the checkpoint's "
                    "data position (global batch %d) in the data as it is now, so the examples from here on are not "
                    "the ones the run would have read; if the change was not meant, put the data back as it was and "
                    "relaunch", config.data.path, counts, resume_step)
    if before != record:
        write_atomic(path, json.dumps(record, indent=2) + "\n")


def check_workdir_path(workdir: epath.Path) -> None:
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file, not a folder; give a folder (new or a run's)")


def check_run_folder(workdir: epath.Path) -> None:
    """A run is trained in a new or empty folder, or in a run's (`files.is_workdir`): not among other files, which a
    run's files would mix with or overwrite (a folder of images named by mistake, another tool's config.json). A
    failed first launch may have left `checkpoints/` empty; hidden files (a file manager's .DS_Store) do not count."""
    if workdir.is_dir() and not is_workdir(workdir):
        other = sorted(p.name for p in workdir.iterdir()
                       if p.name not in ("checkpoints", LOCK_NAME) and not p.name.startswith("."))
        if other:
            shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
            raise ConfigError(f"--workdir {workdir} holds files that are not a clip_jax run's ({shown}); give a new "
                              "or empty folder")


def check_writable(workdir: epath.Path) -> None:
    """A local workdir (or its checkpoints/) that cannot be written: a training writes its lock, config.json and
    checkpoints there. Found at launch: a save into a read-only checkpoints/ hung in Orbax's barrier for 5 minutes
    and ended in a timeout that named no cause, and a read-only workdir's error named a temporary file."""
    for folder in (workdir, workdir / "checkpoints"):
        if not is_remote(folder) and folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{folder} is not writable (a read-only file system, or another user's): a training "
                              "writes its lock, config.json and checkpoints in the workdir; make it writable, or copy "
                              "the run to a writable folder and train the copy")


def checkpoint_steps(workdir: epath.Path) -> list[int]:
    """The steps of the checkpoints in `workdir`, read without creating anything (a Checkpointer makes its folder)."""
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit()) if folder.exists() else []


def check_init_from(config: ml_collections.ConfigDict) -> None:
    """A ConfigError if the workdir `config.init_from` names holds no checkpoint."""
    source = epath.Path(config.init_from)
    if source.suffix.lower() in (".safetensors", ".pt", ".pth", ".bin") and not source.is_dir():  # open_clip's habit
        raise ConfigError(f"config.init_from: {config.init_from} is a PyTorch weights file; init_from takes a workdir: "
                          f"clip-jax convert {config.init_from} --to-workdir DIR, then --config.init_from=DIR")
    if not checkpoint_steps(source):
        relative = not (is_remote(config.init_from) or os.path.isabs(config.init_from))
        where = f" (a path relative to the current folder, {os.getcwd()})" if relative else ""
        raise ConfigError(f"config.init_from: {config.init_from}{where} holds no checkpoint (expected "
                          f"{config.init_from}/checkpoints/<step>): train or convert the model to start from into it "
                          "first (the shapes recipes start from the demo's: clip-jax train --config configs/demo.py "
                          "--workdir workdirs/demo), or point --config.init_from at a workdir that has one")


def create_state(config: ml_collections.ConfigDict, method: Method, model: nn.Module, mesh):
    """(init function, shardings, optimizer): the state is initialised directly in its shardings, so no host
    ever holds the full unsharded parameters."""
    inputs = method.init_inputs()
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"]
    tx = state_lib.make_optimizer(config.optimizer, config.total_steps, nn.unbox(boxed))
    shardings = step_lib.state_shardings(boxed, tx, mesh)

    def init(rng):
        init_rng, state_rng = jax.random.split(rng)
        params = nn.unbox(model.init(init_rng, *inputs)["params"])
        return state_lib.init_state(params, tx, state_rng)

    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        init_fn = jax.jit(init, out_shardings=shardings)
    return init_fn, shardings, tx


def preparation(config, method: Method, mesh, workdir, tokenizer, start: tuple[Checkpointer, int | None],
                rng, training: bool, resumed: bool = False) -> Preparation:
    """`Method.prepare`'s view of the run: embedding functions of the model the run starts from (a checkpoint:
    the warm start's or the latest; else the initial parameters), loaded on first use."""

    @functools.cache
    def encoder() -> Encoder:
        model = method.model()
        init_fn, shardings, _ = create_state(config, method, model, mesh)
        source, step = start
        if step is None:
            params = method.base_params(init_fn(rng).params)
        else:
            _, params = restore_start_params(source, step,
                                             method.base_params(abstract_train_state(init_fn, shardings).params))
        return Encoder(model, params, mesh, config.eval.batch_size)

    return Preparation(workdir, tokenizer, jax.process_index() == 0, lambda images: encoder().images(images),
                       lambda tokens: encoder().texts(tokens), training, resumed)


def restore_start_params(source: Checkpointer, step: int, abstract_params: Any) -> tuple[int, Any]:
    """(step, parameters) of checkpoint `step` of `source`, the run a launch starts from; where `step` is its latest,
    of its newest readable one: a damaged latest is named and an older step read, as a resume does (an init_from of a
    run whose latest checkpoint was cut short failed with an unexpected error)."""
    if step == source.latest_step():
        return source.restore_newest_params(abstract_params)
    return step, source.restore_params(step, abstract_params)


def abstract_train_state(init_fn, shardings):
    """The state `init_fn` (of `create_state`) makes, as shapes and dtypes in its shardings: what a restore and the
    compilation need, with nothing computed."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        jax.eval_shape(init_fn, jax.random.PRNGKey(0)), shardings)


class Terminated(BaseException):  # noqa: N818 - a stop like KeyboardInterrupt, not an error
    """SIGTERM outside the steps (compiling, evaluating at the end) of a one-process run. Within them the loop's own
    handler (`PreemptionFlag`) saves and stops; here nothing new is left to save, and the launch stops as a preempted
    one does: with status 0, which the SLURM script requeues on, where the signal's default action ended it with 143
    and no word."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict[str, Any]:
    """Trains (or resumes) the run `config` describes in `workdir`, then evaluates it; returns the results."""
    # One process: SIGTERM outside the steps stops the launch (the steps' own handler saves first). On several, JAX's
    # preemption service handles it, and a Python handler would replace its own.
    stop = functools.partial(Terminated, "stopped by SIGTERM outside the steps, with nothing new to save: the same "
                             "command resumes from the latest checkpoint (a finished run evaluates it again)")
    with sigterm_raises(stop) if jax.process_count() == 1 else contextlib.nullcontext():
        return _launch(config, workdir)


def _launch(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict[str, Any]:
    workdir = epath.Path(workdir)  # pathlib would turn gs://bucket/run into gs:/bucket/run
    created = not workdir.exists()  # a launch that fails early removes a workdir it made (`_remove_failed_launch`)

    # --- Mesh (checked before anything is written: a launch on the wrong machine leaves the workdir alone) -------
    absolute_paths(config)  # config.json then reads the same files from any folder
    refuse_different_launches("training", {"config": config.to_dict(), "workdir": absolute_path(str(workdir))})
    check_input_paths(config, workdir=workdir)
    check_train_source(config)
    checked_tokenizer = check_tokenizer_file(config, new_run=not checkpoint_steps(workdir))
    # the devices the run sees: on a GPU machine CUDA_VISIBLE_DEVICES gives fewer (a TPU slice or a CPU has its own)
    fewer = "a recipe of batch 1 runs on one: CUDA_VISIBLE_DEVICES=0" if jax.default_backend() == "gpu" else ""
    mesh = make_mesh(check_devices(config, jax.device_count(), fewer))
    check_gpu_implementations(config, jax.devices()[0].platform)
    if config.model.dtype == "float16":  # (open_clip's --precision amp scales the loss; this trainer does not)
        log.warning("model.dtype 'float16' trains without loss scaling: gradients below float16's range (~6e-8) "
                    "become 0, overflows skip the step; 'bfloat16' has float32's range and needs none")
    method = get_method(config)
    method.check(mesh)
    too_big = memory_lib.check_fits(config, model_config(config), batch_divisor(mesh),
                                    mesh.shape["fsdp"] * mesh.shape["tensor"])
    if too_big:
        raise ConfigError(too_big)
    log.info("mesh %s over %d device%s (%s)", dict(mesh.shape), mesh.size, "s" if mesh.size > 1 else "",
             jax.devices()[0].device_kind)
    if unsplit := unsplit_by_tensor(config, mesh.shape["tensor"]):
        log.warning(unsplit)
    if (across := tensor_across_processes(mesh.devices, mesh.axis_names)) and jax.process_index() == 0:
        log.warning(across)

    # --- Workdir and config -------------------------------------------------------------------------------------
    check_workdir_path(workdir)  # before the checkpointer makes a folder inside it
    check_run_folder(workdir)
    check_writable(workdir)
    new_run = not checkpoint_steps(workdir)
    if config.init_from and new_run:  # a new run from another's parameters: are they there?
        check_init_from(config)
    frozen = [f for f in config.optimizer.frozen if "logit_" not in f]  # a fixed temperature trains from scratch
    pretrained_use = (f"method {config.method.name} fine-tunes" if method.fine_tunes else
                      "optimizer.frozen keeps parameters of" if frozen else
                      "model.text.keep_positions keeps the positions of" if config.model.text.keep_positions else
                      # only a warm start reads it: a run from random weights has no temperature to restart
                      "method.reset_logit_scale restarts the temperature of" if config.method.get("reset_logit_scale")
                      else None)
    if method.needs_pretrained and not config.init_from and new_run:
        raise ConfigError(f"method {config.method.name} learns on a pretrained CLIP, and {workdir} holds none: "
                          "give --config.init_from=A_WORKDIR (a CLIP trained or converted here: clip-jax convert SRC "
                          "--to-workdir NEW)")
    if pretrained_use and not config.init_from and new_run:
        log.warning("%s a pretrained CLIP, and %s holds none: this new run starts from random weights. To start from "
                    "one, stop it, convert or stretch a model into a new folder (clip-jax convert SRC --to-workdir "
                    "NEW; for Long-CLIP, clip-jax stretch --workdir BASE --out-workdir NEW) and train in NEW, or give "
                    "--config.init_from=A_WORKDIR", pretrained_use, workdir)
    held: Holding | None = None
    start: LaunchStart | None = None
    try:
        with hold_workdir(workdir) as holding:  # one training at a time: a second would write over its checkpoints
            held = holding
            start = LaunchStart.of(workdir)
            return _train(config, workdir, mesh, method, holding, checked_tokenizer)
    except BaseException as error:
        if held is not None and held.lost is None:  # (not a workdir another launch has taken over)
            if created:
                _remove_failed_launch(workdir, interrupted=isinstance(error, KeyboardInterrupt | Terminated))
            elif start is not None:
                start.put_back_if_nothing_saved(workdir)
        raise


@dataclasses.dataclass(frozen=True)
class LaunchStart:
    """A workdir's run files as a launch found them: its latest checkpoint and its config.json (None: none)."""

    latest: int | None
    config: bytes | None

    @classmethod
    def of(cls, workdir: epath.Path) -> LaunchStart:
        config = workdir / "config.json"
        return cls(max(checkpoint_steps(workdir), default=None), config.read_bytes() if config.exists() else None)

    def put_back_if_nothing_saved(self, workdir: epath.Path) -> None:
        """After a launch that failed (or was interrupted) without saving a checkpoint: the config.json it wrote
        (`prepare_workdir`) holds settings that never trained. Left there, a crash of those settings in preparation
        (a value a method cannot take) failed every later resume, eval and classify. It holds the settings that
        trained until the latest step again: the record of them (`settings_until`), which a launch with changed
        settings made (this one, or an earlier one that saved nothing either and was killed before it could put
        config.json back), else config.json as this launch found it; the record is then removed."""
        if self.latest is None or jax.process_index() != 0 or any(s > self.latest for s in checkpoint_steps(workdir)):
            return
        config, kept = workdir / "config.json", settings_until(workdir, self.latest)
        trained = kept.read_bytes() if kept.exists() else self.config
        changed = config.exists() if trained is None else not config.exists() or config.read_bytes() != trained
        if trained is None:
            config.unlink(missing_ok=True)
        elif changed:
            write_atomic(config, trained)
        removed = kept.exists()
        kept.unlink(missing_ok=True)
        if changed or removed:  # (a resume's warning named the record)
            log.warning("this launch saved no checkpoint: %s's config.json holds the settings that trained until step "
                        "%d again%s", workdir, self.latest, f", and {kept.name} is removed" if removed else "")


def unsplit_by_tensor(config: ml_collections.ConfigDict, tensor: int) -> str | None:
    """What to tell a run whose mesh's tensor axis does not divide a tower's heads or MLP width: sharding drops the
    axis for such a dimension (`sharding.logical_to_spec`), so those weights and activations stay whole on every
    device of the axis, without a word."""
    if tensor == 1:
        return None
    towers = {name: config.model[name] for name in ("vision", "text", "audio") if name in config.model}
    whole = [f"the {name} tower's {n} {what}" for name, tower in towers.items()
             for what, n in (("heads", tower.get("heads")), ("MLP width", tower.get("mlp_dim"))) if n and n % tensor]
    if not whole:
        return None
    return (f"mesh.tensor {tensor} does not divide {', '.join(whole)}: those stay whole on each of its {tensor} "
            "devices (the axis is dropped for them, no memory saved); choose a tensor size that divides them")


def check_gpu_implementations(config: ml_collections.ConfigDict, platform: str) -> None:
    """The implementations a config names that run on GPUs only, refused on `platform`'s devices in one line."""
    if config.model.attention == "cudnn" and platform != "gpu":
        raise ConfigError(f"model.attention 'cudnn' needs a GPU (this run's devices are {platform}); use 'xla'")
    if config.model.layer_norm == "pallas" and platform != "gpu":
        raise ConfigError(f"model.layer_norm 'pallas' runs Triton kernels on NVIDIA GPUs (this run's devices are "
                          f"{platform}); use 'xla'")
    if config.model.dtype == "float16" and platform == "cpu":  # (XLA:CPU's dot has no F16 x F16 -> F32)
        raise ConfigError("model.dtype 'float16' has no matrix products on XLA:CPU (this run's devices are cpu); use "
                          "'float32' (or 'bfloat16')")


def _remove_failed_launch(workdir: epath.Path, interrupted: bool = False) -> None:
    """Removes the workdir a failed first launch made (config.json, tokenizer.json, an empty checkpoints/) while it
    holds nothing to keep: no checkpoint and no metrics. Left there, the folder is "already a clip_jax workdir" to
    `clip-jax stretch --out-workdir` and `convert --to-workdir`, which the failure may have told the user to run.
    After a Ctrl-C (`interrupted`: no failure, the same command will be run again) a method's cached arrays (.npz,
    e.g. a few-shot set's features, minutes to make) are kept with the folder. After an error they go with it: the
    corrected command may change the settings they were made with, which a cache left there would refuse.
    Process 0 alone writes a workdir's files, so it alone removes them."""
    if jax.process_index() != 0 or checkpoint_steps(workdir) or (workdir / "metrics.jsonl").exists():
        return
    if interrupted and any(workdir.glob("*.npz")):
        return
    with contextlib.suppress(Exception):  # the launch's own error is the one to tell
        workdir.rmtree()


def positions_warning(config: ml_collections.ConfigDict, trainable: dict) -> str | None:
    """What to tell a Long-CLIP run whose frozen rules do not fit its text positions:
    - a model that keeps positions (`keep_positions`) whose rules let the kept table train: a stretched workdir's
      own config.json freezes nothing, so `clip-jax train --workdir OUT` alone would train them;
    - Long-CLIP's loss on a model that keeps none (an interpolated stretch) with its one table frozen, as the keep
      recipes' rule freezes it after `--config.model.text.keep_positions=0`: no position, new or old, would train."""
    keep = config.model.text.get("keep_positions", 0)
    table_trains = trainable["text"]["positional_embedding"]
    if keep and table_trains:
        rules = (*config.optimizer.frozen, r"^text/positional_embedding$")
        return (f"model.text.keep_positions is {keep}, but optimizer.frozen does not freeze text/positional_embedding: "
                "the kept positions will train. A Long-CLIP fine-tune freezes them (as its recipes, "
                f"configs/longclip_*.py, do): {shlex.quote(f'--config.optimizer.frozen={rules!r}')}")
    if not keep and not table_trains and config.method.name == "longclip":
        return (f"optimizer.frozen freezes text/positional_embedding, this model's whole position table "
                f"({config.model.text.context_length} positions, none kept): none of them will train, the "
                f"stretched ones included. An interpolated stretch trains the whole table: "
                f"{_without_position_rules(config)}")
    return None


def _freezes_positions(config: ml_collections.ConfigDict) -> bool:
    return match_any(config.optimizer.frozen, "text/positional_embedding")


def _without_position_rules(config: ml_collections.ConfigDict) -> str:
    """The override that drops optimizer.frozen's rules matching text/positional_embedding, keeping the others."""
    rules = tuple(r for r in config.optimizer.frozen if not match_any((r,), "text/positional_embedding"))
    return shlex.quote(f"--config.optimizer.frozen={rules!r}")


def _train(config: ml_collections.ConfigDict, workdir: epath.Path, mesh, method: Method, holding: Holding,
           checked_tokenizer: ClipTokenizer | None = None) -> dict[str, Any]:
    """The run itself, in a workdir this process holds (train_and_evaluate has checked the config and the mesh);
    it stops if another launch takes the workdir over (`holding.lost`). `checked_tokenizer`: what
    `check_tokenizer_file` read, not read again."""
    checkpointer = Checkpointer(workdir, config.checkpoint, owner=True)
    # A step-0 checkpoint is a warm start (a converted or stretched model): its parameters only (see below).
    warm_start = checkpointer.latest_step() == 0
    _refuse_other_evaluations_of_a_finished_run(config, workdir, checkpointer.latest_step())
    prepare_workdir(config, workdir, checkpointer.latest_step(), method.fixed_groups)

    # --- The starting point -------------------------------------------------------------------------------------
    rng = jax.random.PRNGKey(config.seed)
    # A warm start: this workdir's step-0 checkpoint, or, for a new run, another run's latest (config.init_from).
    init_source = (checkpointer, 0) if warm_start else None
    if init_source is None and checkpointer.latest_step() is None and config.init_from:
        init_source = init_from_checkpoint(config)
    resume_step = checkpointer.latest_step() if init_source is None else None

    # --- Data ---------------------------------------------------------------------------------------------------
    tokenizer = make_tokenizer(config, workdir, new_run=checkpointer.latest_step() is None,
                               checked=checked_tokenizer)
    check_prompts(config, tokenizer)  # (the evaluations' class names, with the tokenizer they are read with)
    method.prepare(preparation(config, method, mesh, workdir, tokenizer, init_source or (checkpointer, resume_step),
                               rng, training=True, resumed=resume_step is not None))
    # This host's rows of every global batch: the ones its devices hold.
    data_iter = method.train_data(config, tokenizer, batch_rows(config.batch_size, batch_sharding(mesh)))
    tell_data_changes(workdir, config, resume_step)

    # --- Model and train state ----------------------------------------------------------------------------------
    model = method.model()
    init_fn, shardings, tx = create_state(config, method, model, mesh)
    abstract_state = abstract_train_state(init_fn, shardings)

    # --- Restore or initialise ----------------------------------------------------------------------------------
    evaluated_before = False  # (a relaunch's) the run's results.json holds the evaluation of its last step
    if init_source is not None:
        # Take the checkpoint's parameters and build the optimizer state of *this* config, whose frozen/decay rules
        # may differ from the ones it was written with.
        source, step = init_source
        state = init_fn(rng)
        step, restored = restore_start_params(source, step, method.base_params(abstract_state.params))
        state = state.replace(params=method.warm_start(restored, state.params))
        if jax.process_index() == 0:  # as a resume is told: the run starts from another model's parameters
            print(f"warm start: {workdir} starts from the parameters of {source.directory / str(step)}", flush=True)
    elif resume_step is not None:
        # "again" only if its evaluation finished: a Ctrl-C during it leaves no results.json of this step (process 0's)
        evaluated_before = jax.process_index() == 0 and _evaluated(workdir, config.total_steps)
        state = checkpointer.restore(abstract_state, data_iter)
        if (restored := int(state.step)) < resume_step and jax.process_index() == 0:
            _move_kept_settings(workdir, resume_step, restored)
        if jax.process_index() == 0:  # a relaunch says what it does: a finished run only evaluates
            done = int(state.step) >= config.total_steps
            evaluation = ("evaluating its final checkpoint again" if evaluated_before else
                          "evaluating its final checkpoint (not evaluated yet: no results.json of this step)")
            print(f"resuming {workdir} from step {int(state.step)} of {config.total_steps}" +
                  (f": the run is complete; {evaluation}" if done else ""), flush=True)
    else:
        state = init_fn(rng)
    start_step = int(jax.device_get(state.step))

    # --- Compile ------------------------------------------------------------------------------------------------
    trainable = state_lib.trainable_mask(abstract_state.params, config.optimizer.frozen)
    if positions_unfit := positions_warning(config, trainable):
        log.warning(positions_unfit)
    if config.optimizer.warmup_steps >= config.total_steps > 1:  # the schedule caps the warm-up at total_steps - 1
        log.warning("optimizer.warmup_steps %d is not below total_steps %d: the learning rate rises for the whole "
                    "run and never decays; lower warmup_steps", config.optimizer.warmup_steps, config.total_steps)
    train_step = step_lib.make_train_step(
        method.step_fns(model),
        tx,
        trainable,
        state_lib.learning_rate_schedule(config.optimizer, config.total_steps),
        mesh,
        config.accum_steps,
    )
    batch_spec = abstract_batch(method.fields(), config.batch_size, batch_sharding(mesh))
    t0 = time.time()
    # A finished run relaunched only evaluates again: no step to compile (minutes for a large model on a pod).
    compiled = (step_lib.compile_train_step(train_step, shardings, abstract_state, batch_spec, mesh)
                if start_step < config.total_steps else None)
    if compiled is not None and (too_big := memory_lib.check_compiled_fits(compiled, memory_lib.device_memory_bytes())):
        raise ConfigError(too_big)
    flops_per_step = method.flops_per_example(trainable) * config.batch_size
    peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind)
    # From here a Ctrl-C or SIGTERM saves at the end of a step; installed before the compile report, which is what
    # a watching user (or test) takes as "training has started".
    preempted = PreemptionFlag()
    if compiled is not None and jax.process_index() == 0:  # (every process's is the same program)
        print(_parameter_counts(abstract_state.params, trainable), flush=True)
        _report_compiled(compiled, time.time() - t0, flops_per_step, peak, mesh.size)

    # --- Steps --------------------------------------------------------------------------------------------------
    # The bar on a terminal only: in a log file (nohup, a batch job's output) its redraws made one line of thousands
    # of characters; there each record is a line of its own.
    bar = config.log.progress_bar and draws_a_bar() and start_step < config.total_steps  # (a run left)
    writer = MetricsWriter(workdir, config.total_steps, start_step, config.log.tensorboard, bar)
    if resume_step is not None and start_step < config.total_steps and (due := evals_due(config, start_step)):
        # A stop at a step whose evaluations were due (a SIGTERM saves before them, a kill may land in them) resumed
        # after it, and the run's curves missed that period: they are run first. (Process 0 reads the records.)
        missing = jax.process_index() == 0 and not any(
            r.get("split") == "eval" and r.get("step") == start_step for r in read_metrics(writer.path))
        if jax.process_count() > 1:
            missing = bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))
        if missing and (evaluated := evaluate(config, model, state.params, mesh, tokenizer, due, method)):
            writer.write(start_step, evaluated, prefix="eval")
    pending: list[dict] = []
    data_counts = DataCounts()  # dropped and converted examples, truncated captions (host-side, from the batches)
    nonfinite_run = 0
    # Throughput is of the steps alone: a window's time runs from its start (or the end of an evaluation or a save
    # within it) and stops at an evaluation or save (`pause_window`), and at its record.
    window_start, window_seconds, last_log_step = time.time(), 0.0, start_step

    def pause_window() -> None:
        """Stops the window's clock before an evaluation or a save, once the dispatched steps have run."""
        nonlocal window_seconds
        if pending:
            jax.block_until_ready(pending[-1])
        window_seconds += time.time() - window_start

    def resume_window() -> None:
        nonlocal window_start
        window_start = time.time()

    def log_pending(done: int) -> None:
        """Writes the record of the steps in `pending`, ending at step `done`."""
        nonlocal pending, nonfinite_run, window_start, window_seconds, last_log_step
        history = jax.device_get(pending)
        pending = []
        writer.synced()
        streak_end = None  # the step at which the non-finite updates reached the limit
        for i, h in enumerate(history):
            nonfinite_run = nonfinite_run + 1 if h["nonfinite"] else 0
            if nonfinite_run >= config.optimizer.max_consecutive_nonfinite and streak_end is None:
                streak_end, streak = done - len(history) + i + 1, nonfinite_run
        summary = _summarise(history) | data_counts.metrics(done)
        elapsed = window_seconds + time.time() - window_start
        steps = done - last_log_step
        summary["samples_per_s"] = steps * config.batch_size / elapsed
        summary["tflops_per_s_per_device"] = steps * flops_per_step / elapsed / mesh.size / 1e12
        if peak:
            summary["mfu"] = steps * flops_per_step / elapsed / (peak * mesh.size)
        writer.write(done, summary)  # also a window that ends the run: its record shows what went wrong
        window_start, window_seconds, last_log_step = time.time(), 0.0, done
        if streak_end is not None:
            writer.close()  # the progress bar's line ends before the error's
            checkpointer.wait()  # the latest save is complete before the message names it
            raise FloatingPointError(
                f"loss or gradients were NaN/inf for {streak} steps in a row (steps {streak_end - streak + 1}-"
                f"{streak_end}); those updates were skipped. {_restart_advice(checkpointer.latest_step())}")

    evaluating = False  # the final evaluation: a stop there is told what the relaunch does
    try:
        for step in range(start_step, config.total_steps):
            if holding.lost and jax.process_count() == 1:  # (several hosts would have to agree: there it is logged)
                raise ConfigError(holding.lost)
            batch = global_batch(data_counts.take(next(data_iter)), mesh)
            state, metrics = compiled(state, batch)
            pending.append(metrics)
            done = step + 1
            writer.dispatched(metrics)
            if preempted.is_set(done):
                log_pending(done)  # the steps since the last log: the relaunch resumes after them
                checkpointer.save(done, state, data_iter, force=True)
                checkpointer.wait()
                writer.close()
                preempted.close()
                print(f"{preempted.reason}: saved the checkpoint of step {done}; relaunch the same command to resume",
                      flush=True)
                # A Ctrl-C exits as an interrupted command does (130), so `train && eval` stops there; a SIGTERM, a
                # scheduler's stop that the SLURM script requeues on, exits 0.
                raise SystemExit(130 if preempted.interrupted else 0)
            if done % config.log.every_steps == 0 or done == config.total_steps:
                log_pending(done)
            if done % config.checkpoint.every_steps == 0 and done != config.total_steps:
                if pending:  # a record ends here too: a relaunch from this checkpoint (it drops the records after
                    log_pending(done)  # it) then loses no step's metrics, and the latest update's fate is known
                # Updates skipped in a row (non-finite loss or gradients): the parameters, those of the last update
                # applied, may have diverged (finite but huge, every forward NaN). Saving copies of them would rotate
                # the earlier checkpoints out, which a relaunch may need. (One bad batch alone saves as usual.)
                if nonfinite_run >= DIVERGING_STREAK:
                    log.warning("steps %d-%d's updates were NaN/inf and skipped: no checkpoint is saved while they "
                                "are (the latest stays step %s)", done - nonfinite_run + 1, done,
                                checkpointer.latest_step())
                else:
                    pause_window()
                    checkpointer.save(done, state, data_iter)
                    resume_window()
            if (due := evals_due(config, done)) and done != config.total_steps:
                pause_window()
                if evaluated := evaluate(config, model, state.params, mesh, tokenizer, due, method):
                    writer.write(done, evaluated, prefix="eval")
                resume_window()
        writer.close_bar()  # the steps are done: the bar's rate would fall through the final save and evaluation

        # --- Final checkpoint and evaluation ----------------------------------------------------------------------
        if nonfinite_run >= DIVERGING_STREAK:  # the final checkpoint would hold diverged parameters
            raise FloatingPointError(
                f"the run's last {nonfinite_run} updates (steps {config.total_steps - nonfinite_run + 1}-"
                f"{config.total_steps}) were NaN/inf and skipped, so its final checkpoint is not saved (the latest is "
                f"step {checkpointer.latest_step()}): lower optimizer.lr, raise warm-up or check the data, and "
                "relaunch (docs/your_data.md: when a run diverges)")
        if checkpointer.latest_step() != config.total_steps:
            checkpointer.save(config.total_steps, state, data_iter, force=True)
        checkpointer.wait()
        # A SIGTERM or first Ctrl-C during the final save (minutes on a pod) waits for it, as during the steps: one
        # process stops here with it saved (with the handlers gone before the save, it was cut short and lost). On
        # several, JAX's preemption service holds the signal: the save finishes, and the run goes on to its final
        # evaluation (docs/launch.md: a SIGTERM outside the steps is JAX's)
        preempted.close()
        if preempted.requested:
            writer.close()
            print(f"{preempted.reason}: saved the final checkpoint, step {config.total_steps}; the same command "
                  "evaluates it and writes results.json", flush=True)
            raise SystemExit(130 if preempted.interrupted else 0)
        # grain's shared memory behind the last batch is freed before its workers stop (else: a leak warning)
        batch = None
        close_iterator(data_iter)
        evaluating = True
        results = evaluate(config, model, state.params, mesh, tokenizer, method=method)
    except BaseException as error:
        # An error mid-run (NaN updates, a data error): the save in flight is finished before the process ends, else
        # the interpreter's shutdown leaves it a temporary folder and the message's "latest checkpoint" is not there.
        with contextlib.suppress(Exception):
            checkpointer.wait()
        preempted.close()
        batch = None
        close_iterator(data_iter)
        writer.close_bar()
        if not isinstance(error, KeyboardInterrupt) or evaluating:  # (a second Ctrl-C stops at once)
            with contextlib.suppress(Exception):  # the curves so far, to see what went wrong (a NaN loss: a gap)
                draw_curves(workdir)
        if evaluating and isinstance(error, KeyboardInterrupt | Terminated) and jax.process_index() == 0:
            print(f"stopped during the final evaluation: checkpoint {config.total_steps} is saved, and the same "
                  "command evaluates it and writes results.json", file=sys.stderr, flush=True)
        raise

    # --- Results ----------------------------------------------------------------------------------------------
    if results:  # (every entry skipped, or none: no record of a step alone)
        # A finished run relaunched evaluates its final checkpoint again: TensorBoard, which keeps what it was given,
        # has that evaluation already (metrics.jsonl's record is replaced)
        again = start_step == config.total_steps and evaluated_before
        writer.write(config.total_steps, results, prefix="eval", tensorboard=not again)
    writer.close()
    checkpointer.close()
    if jax.process_index() == 0:
        results = {"step": config.total_steps, **results}
        write_atomic(workdir / "results.json", results_json(results))
        print_results(results)
        draw_curves(workdir)
        beside = "metrics.jsonl, tensorboard/ and checkpoints/" if config.log.tensorboard else \
            "metrics.jsonl and checkpoints/"
        print(f"wrote {workdir / 'results.json'} and {workdir / 'curves.png'} ({beside} beside them)", flush=True)
    return results


def _evaluated(workdir: epath.Path, step: int) -> bool:
    """Whether the workdir's results.json holds the evaluation of `step` (a run trained on since has an older one)."""
    try:
        return json.loads((workdir / "results.json").read_text()).get("step") == step
    except (OSError, ValueError, AttributeError):  # none, or a damaged one: not evaluated
        return False


def _refuse_other_evaluations_of_a_finished_run(config: ml_collections.ConfigDict, workdir: epath.Path,
                                               latest: int | None) -> None:
    """A finished run relaunched evaluates its final checkpoint again and writes results.json: with the run's own
    evaluation settings, the same figures. With others (more examples, other entries), its results.json would be
    replaced by figures of another kind, unsaid: refused before anything is written, pointing to `clip-jax eval`,
    which keeps each kind in a file of its own."""
    if latest is None or latest < config.total_steps or not (workdir / "results.json").exists():
        return

    before = _figures_of(evaluation_settings(read_config(workdir / "config.json")))
    after = _figures_of(evaluation_settings(config))
    if not same_setting(before, after):
        changed = _changes(before, after)
        raise ConfigError(f"{workdir} is complete (step {latest}), and its results.json holds the figures of its own "
                          f"evaluation settings, which these differ from ({', '.join(map(_short, changed[:3]))}"
                          f"{', ...' if len(changed) > 3 else ''}): relaunch with its own (without the overrides, or "
                          "the --config, that change them), or evaluate it with other settings through "
                          f"clip-jax eval --workdir {workdir} --config.eval.*=... --config.evals.*=... (into a file of "
                          f"its own, eval_{latest}.json or eval_{latest}_<n>.json), or raise --config.total_steps to "
                          "train on")


# Skipped updates in a row from which a run is taken to be diverging: its parameters (the last applied update's) may
# be finite but huge, every forward NaN; no checkpoint of them is saved. One bad batch alone is not.
DIVERGING_STREAK = 2


def _restart_advice(latest: int | None) -> str:
    """What to do after a run stopped on skipped updates, whose `latest` checkpoint may hold diverged parameters."""
    if latest is None:
        where = "There is no checkpoint yet (the relaunch starts over)"
    elif latest == 0:  # a warm start's model: the run diverged from it, and needs it to start again
        where = "The latest checkpoint is step 0, the model the run started from"
    else:  # its parameters are those of the last update applied: perhaps the one that diverged
        where = (f"The latest checkpoint is step {latest}, whose parameters may be the diverged ones: check it with "
                 f"clip-jax eval --step {latest}, set it aside if it gives NaN (docs/your_data.md: when a run "
                 "diverges)")
    return f"{where}. Then lower optimizer.lr, raise warm-up or check the data, and relaunch"


def draw_curves(workdir: epath.Path) -> None:
    """curves.png of the run's metrics.jsonl (process 0): at the end of a run, and where it stops early."""
    if jax.process_index() == 0 and (workdir / "metrics.jsonl").exists():
        from clip_jax.plots import plot_training_curves

        plot_training_curves(workdir / "metrics.jsonl", workdir / "curves.png")


def close_iterator(data_iter: Any) -> None:
    """Stops a data iterator's threads and worker processes (grain's `close`; a generator's too): grain's workers
    left to the interpreter's exit leak their batches' shared memory, which Python then warns of."""
    with contextlib.suppress(Exception):
        if callable(getattr(data_iter, "close", None)):
            data_iter.close()


class PreemptionFlag:
    """Set after SIGTERM (cloud preemption, SLURM time limit, `launch/tpu.py stop`) or a first Ctrl-C (SIGINT): the
    loop then saves a checkpoint and exits cleanly, and the relaunch resumes from it. A second Ctrl-C stops the
    process at once, without saving (the relaunch resumes from the latest checkpoint).

    One process: Python signal handlers set it. Several: the signal may reach the hosts at different steps, or
    only some of them, and a host that saved alone would wait forever in the checkpoint's collectives. There the
    preemption service that `jax.distributed.initialize` starts catches SIGTERM itself and makes every host agree
    on one step (`reached_preemption_sync_point`, true at the same step everywhere); it talks through the
    coordination service, so the steps are not held up by a collective of ours. No Python SIGTERM handler is
    installed then (it would replace JAX's), and a Ctrl-C is turned into a SIGTERM to this process."""

    def __init__(self):
        self._set = False
        self._interrupted = False
        self._multihost = jax.process_count() > 1
        self._service = True
        self._previous: dict[int, Any] = {}
        handlers = {signal.SIGINT: self._interrupt}
        if not self._multihost:
            handlers[signal.SIGTERM] = self._terminate
        for signum, handler in handlers.items():
            try:
                self._previous[signum] = signal.signal(signum, handler)
            except ValueError:  # not in the main thread (e.g. a library call from a worker): no handler
                pass

    def close(self) -> None:
        """Puts back the handlers that were there before: after the steps, Ctrl-C interrupts as usual."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _terminate(self, signum, frame):
        if not self._set:  # said at once, as a Ctrl-C is: the step (or the batch it waits for) may take a while
            print("\nSIGTERM: saving a checkpoint after this step, then stopping", file=sys.stderr, flush=True)
        self._set = True

    def _interrupt(self, signum, frame):
        if self._interrupted:
            print("\ninterrupted again: stopping without saving; the same command resumes from the latest checkpoint",
                  file=sys.stderr, flush=True)
            os._exit(130)
        self._interrupted = True
        when = "at a step every process agrees on (a few steps on)" if self._multihost else "after this step"
        print(f"\ninterrupted: saving a checkpoint {when}, then stopping (Ctrl-C again: stop at once)",
              file=sys.stderr, flush=True)
        if self._multihost:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self._set = True

    @property
    def interrupted(self) -> bool:
        return self._interrupted

    @property
    def requested(self) -> bool:
        """A stop asked on one process, whatever the step (several processes agree on theirs through `is_set`)."""
        return self._set

    @property
    def reason(self) -> str:
        return "interrupted" if self._interrupted else "preempted"

    def is_set(self, step: int) -> bool:
        if not self._multihost:
            return self._set
        if not self._service:
            return False
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError as e:  # started with jax_enable_preemption_service=False
            self._service = False
            log.warning("no JAX preemption service (%s): SIGTERM will end the run without a checkpoint", e)
            return False


def init_from_checkpoint(config: ml_collections.ConfigDict) -> tuple[Checkpointer, int]:
    """The checkpointer and latest step of the workdir `config.init_from` names (read only: it is another run's)."""
    check_init_from(config)  # a missing folder is one line naming the flag
    reader = Checkpointer(epath.Path(config.init_from), config.checkpoint, reader=True)
    _tell_init_from_changes(config)
    return reader, reader.latest_step()


def _tell_init_from_changes(config: ml_collections.ConfigDict) -> None:
    """`_tell_meaning_changes` of the run `config.init_from` names, where its config.json is a clip_jax one (the
    restore checks every shape either way)."""
    source = epath.Path(config.init_from) / "config.json"
    if not source.exists():
        return
    try:
        old = read_config(source).model.to_dict()
    except (ConfigError, KeyError, TypeError, ValueError, AttributeError):
        return  # damaged, or not a clip_jax config
    # Another kind of image tower: its parameters would be named as missing one by one (the ViT's class_embedding).
    theirs, ours = old.get("vision", {}).get("type", "vit"), config.model.vision.get("type", "vit")
    if theirs != ours:
        raise ConfigError(f"config.init_from {config.init_from} holds a CLIP with a {theirs} image tower, and this "
                          f"config's is a {ours}: give the recipe that tower in a config file of your own "
                          f"(docs/resnet.md, \"A recipe on the other tower\"), or start from a CLIP with a {ours} "
                          "tower")
    # A ResNet's norm: BatchNorm folded into scales (a converted checkpoint's) read as GroupNorm's computes another
    # function with the same parameters (configs/pretrain.py's ResNets train from scratch with GroupNorm).
    theirs, ours = old.get("vision", {}).get("norm", "frozen_bn"), config.model.vision.get("norm", "frozen_bn")
    if config.model.vision.get("type") == "resnet" and theirs != ours:
        raise ConfigError(f"config.init_from {config.init_from} holds a ResNet with norm {theirs!r}, and this "
                          f"config's is {ours!r}: its parameters would compute another function; set "
                          f"--config.model.vision.norm={theirs} to start from it (docs/resnet.md)")
    if jax.process_index() == 0:
        _tell_meaning_changes(old, config.model, f"config.init_from {config.init_from}")


def _tell_meaning_changes(old: dict, model: ml_collections.ConfigDict, source: str) -> None:
    """Settings that change what a model's parameters compute without changing their shapes: a tower's pooling or
    activation, a ResNet's attention-pool heads. A warm start restores parameters into other such settings without an
    error, so a difference from those `source` was trained with is said in one line (a change of shapes fails the
    restore with its own message). A tower only one side has (a method's own) is not compared, nor the temperature's
    clamp, which Long-CLIP's recipes lift on purpose."""
    new = model.to_dict()

    def fields(tower: dict) -> tuple[str, ...]:  # a transformer's heads shape its parameters: the restore says it
        return ("pool", "activation", "heads") if tower.get("type") == "resnet" else ("pool", "activation")

    changed = [f"model.{tower}.{field} {old[tower][field]!r} -> {new[tower][field]!r}"
               for tower in sorted(set(old) & set(new)) if isinstance(old[tower], dict) and isinstance(new[tower], dict)
               for field in fields(new[tower])
               if field in old[tower] and field in new[tower] and old[tower][field] != new[tower][field]]
    if changed:
        log.warning("%s was trained with other model settings (%s): its parameters are read into this model as "
                    "they are", source, ", ".join(changed))


def _summarise(history: list[dict]) -> dict[str, float]:
    """Means over the logging window of the steps whose update was applied (a skipped step's NaN loss would make the
    window's mean NaN, and one bad batch look like a divergence; a window of skipped steps only is NaN), but the
    learning rate's over every step (the schedule, which a skipped update does not change); counters (non-finite
    updates) summed."""
    applied = np.asarray([not h["nonfinite"] for h in history])
    out = {}
    for key in history[0]:
        values = np.asarray([h[key] for h in history], dtype=np.float64)
        if key == "nonfinite":
            out[key] = float(values.sum())
        elif key == "lr":
            out[key] = float(values.mean())
        else:
            out[key] = float(values[applied].mean()) if applied.any() else float("nan")
    return out


def draws_a_bar() -> bool:
    """Whether stderr is a terminal a progress bar shows on: one of 0 columns (a pseudo-terminal nobody sized, as
    `script` gives from a pipe) draws nothing, and the records' lines would be missing too."""
    try:
        return sys.stderr.isatty() and os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except (OSError, ValueError):  # (a stderr without a file descriptor: a test's capture)
        return False


def _parameter_counts(params: Any, trainable: Any) -> str:
    """The model's parameter count, by top-level module, and how many of them the optimizer updates."""
    sizes = jax.tree.map(lambda p: int(np.prod(p.shape)), params)
    total = sum(jax.tree.leaves(sizes))
    trained = sum(n for n, t in zip(jax.tree.leaves(sizes), jax.tree.leaves(trainable), strict=True) if t)
    parts = ", ".join(f"{name} {sum(jax.tree.leaves(part)):,}" for name, part in sizes.items())
    return f"parameters {total:,} ({parts}); {'all' if trained == total else f'{trained:,}'} trained"


def _report_compiled(compiled, seconds: float, flops_per_step: float, peak: float | None, n_devices: int) -> None:
    """Prints the compiled step's per-device memory, the collectives' traffic per device on a mesh of several and the
    analytic FLOPs before step 0 (MaxText habit): an OOM or a badly sharded model shows here, not an hour into the
    run."""
    # (a tiny model's step, a few GFLOP, printed "0.000 TFLOP")
    flops = f"{flops_per_step / 1e12:.3f} TFLOP" if flops_per_step >= 1e11 else f"{flops_per_step / 1e9:.3g} GFLOP"
    lines = [f"compiled train step in {seconds:.1f}s; model FLOPs per step {flops}"]
    try:
        mem = compiled.memory_analysis()
        if mem is not None:
            gib = 1024**3
            lines.append(
                f"per-device memory: arguments {mem.argument_size_in_bytes / gib:.3f} GiB, outputs "
                f"{mem.output_size_in_bytes / gib:.3f} GiB, temporaries {mem.temp_size_in_bytes / gib:.3f} GiB, "
                f"aliased {mem.alias_size_in_bytes / gib:.3f} GiB"
            )
    except (NotImplementedError, AttributeError):  # not every backend reports it
        pass
    if n_devices > 1:
        try:
            traffic = collective_traffic(compiled.as_text())
        except (NotImplementedError, AttributeError):  # (a step wrapped by a test has no HLO to show)
            traffic = {}
        if traffic:
            lines.append(f"per-device collectives per step: {describe_traffic(traffic)}")
    if peak:
        lines.append(f"peak {peak / 1e12:.0f} TFLOP/s per device x {n_devices}: MFU is logged every log step")
    for line in lines:
        print(line, flush=True)


@dataclasses.dataclass(frozen=True)
class Trained:
    """A workdir's trained model, read back (`load_trained`)."""

    config: ml_collections.ConfigDict
    method: Method
    model: nn.Module
    params: Any  # on `mesh`
    tokenizer: ClipTokenizer
    mesh: jax.sharding.Mesh
    step: int


def load_trained(workdir: epath.PathLike, step: int | None = None,
                 adjust: Callable[[ml_collections.ConfigDict], None] | None = None) -> Trained:
    """A workdir's latest (or given) checkpoint, for eval, encode, export and stretch. `adjust`: called on the run's
    config before anything is read from its checkpoints (eval's overrides, checked there: a mistake in them is one
    line before a restore that takes minutes for a large model, not after it)."""
    workdir = epath.Path(workdir)
    has_config = (workdir / "config.json").exists()
    if not has_config or not is_workdir(workdir):  # e.g. a Hugging Face export, or another tool's folder
        why = "its config.json is not a clip_jax run's" if has_config else "no config.json"
        raise FileNotFoundError(f"{workdir} is not a clip_jax workdir ({why}); train or convert into it first")
    config = read_config(workdir / "config.json")
    if adjust is not None:
        adjust(config)
    checkpointer = Checkpointer(workdir, config.checkpoint, reader=True)
    if checkpointer.latest_step() is None:
        raise FileNotFoundError(f"{workdir} has no checkpoint yet (no {checkpointer.directory}/<step>)")
    if step is not None and step not in checkpoint_steps(workdir):
        raise FileNotFoundError(f"{workdir} has no checkpoint of step {step}; its steps: "
                                f"{', '.join(map(str, checkpoint_steps(workdir)))}")
    mesh = reader_mesh(config.mesh.to_dict())
    method = get_method(config)
    tokenizer = make_tokenizer(config, workdir, reader=True)
    # The embeddings a method caches come from frozen towers: any readable checkpoint of the run gives them.
    start = (checkpointer, checkpointer.latest_step() if step is None else step)
    method.prepare(preparation(config, method, mesh, workdir, tokenizer, start, jax.random.PRNGKey(config.seed),
                                training=False))  # a reader: it writes nothing into the workdir
    model = method.model()
    init_fn, shardings, _ = create_state(config, method, model, mesh)
    step, params = checkpointer.restore_newest_params(abstract_train_state(init_fn, shardings).params, step)
    checkpointer.close()
    return Trained(config, method, model, params, tokenizer, mesh, step)
