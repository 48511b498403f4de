"""Failure handling: non-finite updates are skipped and, when they persist, stop the run with a message; an
unreadable newest checkpoint falls back to the previous one; SIGTERM saves a checkpoint and exits cleanly."""

import json
import logging
import os
import pathlib
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from clip_jax import cli
from clip_jax.sharding import batch_sharding, make_mesh, replicated
from clip_jax.train import loop
from clip_jax.train.checkpoint import MIN_REPLICA_SLICE_BYTES, read_state
from clip_jax.train.loop import PreemptionFlag, load_trained
from clip_jax.train.metrics import read_metrics

from .test_end_to_end import (  # noqa: F401
    HALF,
    STEPS,
    assert_same_state,
    checkpoint_steps,
    exit_message,
    saved_state,
    train_args,
    trained,
)
from .test_train_step import run_steps


def test_nonfinite_loss_skips_the_update(monkeypatch):
    """A loss made NaN on the second step leaves parameters and optimizer state exactly as after the first."""
    import clip_jax.losses as losses_lib

    real = losses_lib.shard_loss

    def poisoned_shard_loss(loss_fn, mesh):
        run = real(loss_fn, mesh)

        def wrapped(per_example, shared):
            loss, metrics = run(per_example, shared)
            # caption_key of row 0 identifies the batch: poison batch 1 only (make_batch(1) in run_steps)
            poison = per_example["caption_key"][0] == jnp.uint32(poisoned_key)
            return jnp.where(poison, jnp.nan, loss), metrics

        return wrapped

    from clip_jax.losses import caption_key

    from .test_train_step import make_batch

    poisoned_key = int(caption_key(jnp.asarray(make_batch(1)["text"]))[0])
    # Both runs compile the poisoned step (batch 0 is not poisoned), so the first steps are one program's, bit for bit.
    monkeypatch.setattr(losses_lib, "shard_loss", poisoned_shard_loss)
    one_step, _, _ = run_steps({"data": 8}, n_steps=1)
    two_steps, metrics, _ = run_steps({"data": 8}, n_steps=2)
    assert [int(m["nonfinite"]) for m in metrics] == [0, 1]
    assert int(two_steps.step) == 2  # the step counter moves on; the update does not
    for a, b in zip(jax.tree.leaves((one_step.params, one_step.opt_state)),
                    jax.tree.leaves((two_steps.params, two_steps.opt_state)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("every_steps, said", [
    (2, "The latest checkpoint is step 2"),
    (1000, "There is no checkpoint yet (the relaunch starts over)"),  # not "the latest checkpoint is step None"
])
def test_persistent_nonfinite_updates_stop_the_run_with_a_message(tmp_path, capsys, every_steps, said):
    # An absurd learning rate makes the parameters overflow after the first real update; every later step is
    # non-finite and skipped, and the second in a row stops the run.
    message = exit_message(
        train_args(tmp_path / "run", "--config.optimizer.lr=1e30", "--config.optimizer.max_consecutive_nonfinite=2",
                   "--config.log.every_steps=1", "--config.optimizer.warmup_steps=1",
                   f"--config.checkpoint.every_steps={every_steps}"),
        capsys,
    )
    assert "NaN/inf for 2 steps in a row" in message and "lower optimizer.lr" in message and said in message
    # The checkpoint it names is whole: its asynchronous save was left a temporary folder by the exit before.
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == (["2"] if every_steps == 2 else [])


def diverging_run(tmp_path, capsys, *overrides: str) -> str:
    """The one-line error of a run in tmp_path/run whose step 2 overflows its parameters (lr 1e30 after a 1-step
    warm-up): every later step is non-finite."""
    return exit_message(train_args(tmp_path / "run", "--config.optimizer.lr=1e30", "--config.optimizer.warmup_steps=1",
                                   "--config.eval.every_steps=0", *overrides), capsys)


def test_a_diverged_run_saves_no_checkpoint_of_a_skipped_update_and_logs_the_window_that_stopped_it(tmp_path, capsys):
    # As above: step 2's update overflows the parameters, and every later step is non-finite. Checkpoints are due at
    # every step (so is a record, then): from the second skipped update in a row on, they would hold copies of the
    # diverged parameters and rotate the earlier ones out (3 kept).
    message = diverging_run(tmp_path, capsys, "--config.optimizer.max_consecutive_nonfinite=3",
                            "--config.log.every_steps=4", "--config.checkpoint.every_steps=1",
                            "--config.checkpoint.max_to_keep=3", "--config.total_steps=8")
    assert "NaN/inf for 3 steps in a row (steps 3-5)" in message
    assert "The latest checkpoint is step 3, whose parameters may be the diverged ones" in message
    assert "clip-jax eval --step 3" in message
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["1", "2", "3"]
    # step 3's update was skipped: its checkpoint holds step 2's parameters
    assert_same_state(read_state(tmp_path / "run", 2)["params"], read_state(tmp_path / "run", 3)["params"])
    train = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m["split"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3, 4, 5]  # the window that stopped the run is logged too
    assert [m["nonfinite"] for m in train] == [0, 0, 1, 1, 1] and np.isnan(train[-1]["loss"])
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"  # drawn where the run stopped
    # Those parameters are finite but overflow every forward: an evaluation says so in one line (exit 2).
    message = exit_message(["eval", "--workdir", str(tmp_path / "run")], capsys)
    assert "the model gives NaN/inf" in message and "its parameters have diverged" in message
    # An earlier checkpoint is evaluated by its step; a step without one is named with the steps there are.
    assert "has no checkpoint of step 4; its steps: 1, 2, 3" in exit_message(
        ["eval", "--workdir", str(tmp_path / "run"), "--step", "4"], capsys)
    cli.main(["eval", "--workdir", str(tmp_path / "run"), "--step", "1"])
    assert json.loads((tmp_path / "run" / "eval_1.json").read_text())["step"] == 1


def test_a_run_that_ends_in_skipped_updates_saves_no_final_checkpoint_of_them(tmp_path, capsys):
    # The streak (steps 3-6) is below the limit when the run ends: its final checkpoint would hold the diverged
    # parameters, count the run as complete and rotate an earlier checkpoint out.
    message = diverging_run(tmp_path, capsys, "--config.optimizer.max_consecutive_nonfinite=10",
                            "--config.log.every_steps=3", "--config.checkpoint.every_steps=2",
                            "--config.checkpoint.max_to_keep=2", "--config.total_steps=6")
    assert "the run's last 4 updates (steps 3-6) were NaN/inf and skipped, so its final checkpoint is not saved " \
           "(the latest is step 2)" in message
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2"]
    assert (tmp_path / "run" / "curves.png").is_file() and not (tmp_path / "run" / "results.json").exists()


def test_a_window_averages_its_applied_updates_and_counts_the_skipped_ones():
    # One bad batch in a window no longer makes its loss NaN; the learning rate is the schedule's, every step's.
    history = [{"loss": 2.0, "lr": 1.0, "nonfinite": 0}, {"loss": np.nan, "lr": 3.0, "nonfinite": 1},
               {"loss": 4.0, "lr": 5.0, "nonfinite": 0}]
    assert loop._summarise(history) == {"loss": 3.0, "lr": 3.0, "nonfinite": 1.0}
    skipped = loop._summarise(history[1:2])
    assert np.isnan(skipped["loss"]) and skipped["lr"] == 3.0 and skipped["nonfinite"] == 1.0


def test_a_checkpoint_step_ends_a_record_so_a_relaunch_from_it_loses_no_steps_metrics(tmp_path):
    # Records every 3 steps, checkpoints every 2: a relaunch from checkpoint 4 drops the record of step 6, which also
    # held step 5; the record ending at 4 keeps steps 3-4.
    args = train_args(tmp_path / "run", "--config.total_steps=6", "--config.log.every_steps=3",
                      "--config.checkpoint.every_steps=2", "--config.evals.shapes=None")
    cli.main(args)
    whole = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m["split"] == "train"]
    assert [m["step"] for m in whole] == [2, 3, 4, 6]
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "6")  # as if killed after step 6's record, before its save
    cli.main(args)
    again = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m["split"] == "train"]
    assert [m["step"] for m in again] == [2, 3, 4, 6]
    for a, b in zip(whole, again, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["lr"] == b["lr"]


def corrupt(checkpoint_dir: pathlib.Path) -> None:
    """Overwrite every array data file of a checkpoint with garbage of the same size (a torn write)."""
    files = [p for p in checkpoint_dir.rglob("*") if p.is_file() and "state" in p.parts and p.stat().st_size > 0]
    assert files
    for p in files:
        p.write_bytes(b"\xff" * p.stat().st_size)


def test_unreadable_newest_checkpoint_falls_back_to_the_previous_one(trained, tmp_path, caplog):  # noqa: F811
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    newest, previous = checkpoint_steps(workdir)[-1], checkpoint_steps(workdir)[-2]
    corrupt(workdir / "checkpoints" / str(newest))
    with caplog.at_level(logging.WARNING):
        step = load_trained(workdir).step
    assert step == previous
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert f"checkpoints/{newest}" in warnings and f"step {previous}" in warnings


def test_orbax_takes_the_checkpoints_replica_slice_threshold():
    # clip_jax.train.checkpoint sets the threshold on a private attribute of orbax's array handler (a save of a tiny
    # model on 8 devices spent 1.4 s cutting slices); an orbax that renamed it would keep its default unsaid.
    assert ocp.type_handlers.get_type_handler(jax.Array)._min_slice_bytes_for_replica_parallel == (
        MIN_REPLICA_SLICE_BYTES)


def test_sigterm_sets_the_preemption_flag_without_killing_the_process(capsys):
    """And says so at once: nothing was said until the step (or the batch it waited for) ended, a minute for a slow
    input pipeline, which a scheduler's grace period may not leave."""
    flag = PreemptionFlag()
    try:
        assert not flag.is_set(1)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # said once
        assert capsys.readouterr().err == "\nSIGTERM: saving a checkpoint after this step, then stopping\n"
        assert flag.is_set(2)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_the_evaluation_due_at_the_step_a_run_stopped_runs_when_it_resumes(tmp_path, monkeypatch, capsys):
    """A SIGTERM at a step whose evaluation was due saved before it, and the relaunch started at the next step: the
    run's curves missed that evaluation for good."""
    workdir = tmp_path / "run"
    periodic = ["--config.eval.every_steps=1", "--config.eval.num_examples=16", "--config.eval.batch_size=16"]
    monkeypatch.setattr(loop.PreemptionFlag, "is_set", lambda self, step: step == 3)
    with pytest.raises(SystemExit):
        cli.main(train_args(workdir, *periodic))
    assert [r["step"] for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "eval"] == [1, 2]
    monkeypatch.setattr(loop.PreemptionFlag, "is_set", lambda self, step: False)
    cli.main(["train", "--workdir", str(workdir)])
    assert [r["step"] for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "eval"] == [1, 2, 3, STEPS]
    cli.main(["train", "--workdir", str(workdir), f"--config.total_steps={STEPS + 1}"])  # evaluated: not again
    assert [r["step"] for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "eval"] == [
        1, 2, 3, STEPS, STEPS + 1]


def test_preempted_run_saves_a_checkpoint_and_resumes(tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "run"
    monkeypatch.setattr(loop.PreemptionFlag, "is_set", lambda self, step: step == 3)
    with pytest.raises(SystemExit) as info:
        cli.main(train_args(workdir))
    assert info.value.code == 0
    assert checkpoint_steps(workdir) == [2, 3] and "preempted" in capsys.readouterr().out
    monkeypatch.setattr(loop.PreemptionFlag, "is_set", lambda self, step: False)
    cli.main(["train", "--workdir", str(workdir)])
    assert checkpoint_steps(workdir)[-1] == STEPS and (workdir / "results.json").exists()
    # Logged every 2 steps: step 3's record is written at the preemption, else the relaunch (resuming after it)
    # would leave it out of metrics.jsonl.
    logged = [r["step"] for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"]
    assert logged == [2, 3, 4]


def rolled_back_to_half(source: pathlib.Path, workdir: pathlib.Path, processes: int, position: dict) -> None:
    """The run `source` as it stood after its step-HALF checkpoint, with that checkpoint's data position rewritten as if
    `processes` processes had written it (`position` in each file)."""
    shutil.copytree(source, workdir)
    for step in checkpoint_steps(workdir):
        if step > HALF:
            shutil.rmtree(workdir / "checkpoints" / str(step))
    (workdir / "results.json").unlink()
    data = workdir / "checkpoints" / str(HALF) / "data"
    for f in data.glob("process_*.json"):
        f.unlink()
    for i in range(processes):
        (data / f"process_{i}-of-{processes}.json").write_text(json.dumps(position))


def test_resume_with_another_process_count_continues_at_the_same_global_batch(trained, tmp_path, caplog):  # noqa: F811
    """`shapes` keeps its data position as a count of global batches, which means the same on any number of hosts:
    a checkpoint written by 2 processes resumes in this 1-process run and ends bit-identical to the uninterrupted
    run."""
    workdir = tmp_path / "run"
    rolled_back_to_half(trained, workdir, 2, {"next_index": HALF})
    with caplog.at_level(logging.WARNING):
        cli.main(["train", "--workdir", str(workdir)])
    assert any("another number of processes" in r.getMessage() for r in caplog.records)
    assert_same_state(saved_state(trained, STEPS), saved_state(workdir, STEPS))


def test_resume_of_a_per_process_data_position_with_another_process_count_is_refused(trained, tmp_path, capsys):  # noqa: F811
    # A position that is not a count of global batches (here: examples of one host's stream) has no meaning for
    # another host layout.
    workdir = tmp_path / "run"
    rolled_back_to_half(trained, workdir, 2, {"next_index": 3 * HALF})
    message = exit_message(["train", "--workdir", str(workdir)], capsys)
    assert f"checkpoints/{HALF}" in message and "2 processes" in message and "this run has 1" in message
    assert checkpoint_steps(workdir) == [HALF]


def test_log_lines_go_above_the_bar_with_the_console_handlers_filters_and_come_back_as_they_were(capsys):
    import logging
    import sys

    from clip_jax.train.metrics import _LogLinesAboveBar

    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(lambda record: "secret" not in record.getMessage())  # as the CLI's traceback filter
    console.setFormatter(logging.Formatter("LOG %(message)s"))
    saved = root.handlers[:]
    root.handlers = [*saved, console]
    try:
        outer = _LogLinesAboveBar()
        inner = _LogLinesAboveBar()  # a second bar in the same process (a relaunch in one Python session)
        assert console not in root.handlers
        logging.getLogger("clip_jax.test").warning("shown above the bar")
        logging.getLogger("clip_jax.test").warning("a secret")
        outer.restore()
        inner.restore()
        assert root.handlers == [*saved, console]  # whatever order they end in
    finally:
        root.handlers = saved
    err = capsys.readouterr().err
    assert "LOG shown above the bar" in err and "secret" not in err


def test_the_compile_report_gives_a_small_steps_flops_in_gflop(capsys):
    """A tiny model's step (a few GFLOP) printed "0.000 TFLOP"; B/32's 1.42 TFLOP reads as before."""
    loop._report_compiled(None, 1.0, 2.5e9, None, 1)  # (no compiled step: no memory line)
    loop._report_compiled(None, 1.0, 1.42e12, None, 1)
    out = capsys.readouterr().out
    assert "model FLOPs per step 2.5 GFLOP\n" in out and "model FLOPs per step 1.420 TFLOP\n" in out


def test_the_compile_report_gives_the_collectives_of_a_step_on_several_devices(capsys):
    # a sum over a batch split across the 8 devices: one all-reduce of each device's 65,536 float32 partial sums
    mesh = make_mesh({"data": 8})
    x = jax.ShapeDtypeStruct((16, 65536), jnp.float32, sharding=batch_sharding(mesh))
    compiled = jax.jit(lambda a: a.sum(axis=0), out_shardings=replicated(mesh)).lower(x).compile()
    loop._report_compiled(compiled, 1.0, 2.5e9, None, 8)
    assert "per-device collectives per step: all-reduce 1 ops, 0.25 MiB (largest 0.25)\n" in capsys.readouterr().out
    # a step wrapped in a function (as tests/crash_worker.py wraps it to kill a run inside a step) has no HLO to read
    loop._report_compiled(lambda state, batch: (state, {}), 1.0, 2.5e9, None, 8)
    assert "collectives" not in capsys.readouterr().out


def test_init_from_a_run_whose_newest_checkpoint_is_damaged_starts_from_an_older_one(trained, tmp_path,  # noqa: F811
                                                                                    capsys, caplog):
    """It ended in an unexpected error with a TensorStore dump, where a resume and eval read the older step."""
    source = tmp_path / "source"
    shutil.copytree(trained, source)
    previous, newest = checkpoint_steps(source)[-2:]
    corrupt(source / "checkpoints" / str(newest))
    cli.main(train_args(tmp_path / "new", f"--config.init_from={source}", "--config.total_steps=1",
                        "--config.evals.shapes=None"))
    out, err = capsys.readouterr()
    assert f"starts from the parameters of {source / 'checkpoints' / str(previous)}" in out
    assert f"checkpoints/{newest} is unreadable" in err + caplog.text
    assert checkpoint_steps(source) == [*checkpoint_steps(trained)]  # another run's: nothing set aside


def test_a_workdir_of_no_readable_checkpoint_says_what_is_left(trained, tmp_path, capsys):  # noqa: F811
    """"unexpected error: RuntimeError ... please report it", where eval could still read the parameters."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    for step in checkpoint_steps(workdir):
        corrupt(workdir / "checkpoints" / str(step))
    message = exit_message(train_args(workdir, f"--config.total_steps={STEPS + 2}"), capsys)
    assert f"no readable checkpoint in {workdir / 'checkpoints'}" in message and "--config.init_from=" in message


def test_a_resume_that_fails_before_saving_leaves_config_json_as_it_was(trained, tmp_path, monkeypatch,  # noqa: F811
                                                                         caplog):
    """A launch with new settings that crashed in its preparation (a method's value it could not take) left them in
    config.json: every later resume, eval and classify read them and crashed again. Its warning had named the record
    of the settings until then, which is removed again: said."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    before = (workdir / "config.json").read_bytes()

    def crash(*args, **kwargs):
        raise ZeroDivisionError("a method's preparation failed")

    monkeypatch.setattr(loop, "make_tokenizer", crash)  # called after prepare_workdir has written config.json
    with pytest.raises(SystemExit):
        cli.main(train_args(workdir, f"--config.total_steps={STEPS + 2}", "--config.optimizer.lr=5e-4"))
    assert (workdir / "config.json").read_bytes() == before
    assert not list(workdir.glob("config_until_step_*.json"))
    assert f"kept in config_until_step_{STEPS}.json" in caplog.text
    assert (f"this launch saved no checkpoint: {workdir}'s config.json holds the settings that trained until step "
            f"{STEPS} again, and config_until_step_{STEPS}.json is removed") in caplog.text


def test_config_json_is_put_back_to_the_settings_that_trained_after_a_killed_launch(trained, tmp_path,  # noqa: F811
                                                                                      monkeypatch):
    """A launch with lr 0.02 killed before its first save (nothing put back: config.json then says 0.02, and the
    record of the trained settings is kept apart), then a launch with the trained settings that failed before its
    first save too: it put back the bytes it found, 0.02, which no step trained with, and said they were the run's."""
    from clip_jax.config import read_config, save_config

    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    trained_lr = read_config(workdir / "config.json").optimizer.lr
    # what the killed launch left: the trained settings kept apart, its own in config.json
    shutil.copy(workdir / "config.json", workdir / f"config_until_step_{STEPS}.json")
    killed = read_config(workdir / "config.json")
    killed.optimizer.lr = 0.02
    save_config(killed, workdir / "config.json")

    def crash(*args, **kwargs):
        raise ZeroDivisionError("a failure before the first save")

    monkeypatch.setattr(loop, "make_tokenizer", crash)
    with pytest.raises(SystemExit):
        cli.main(train_args(workdir, f"--config.total_steps={STEPS + 2}", f"--config.optimizer.lr={trained_lr}"))
    assert read_config(workdir / "config.json").optimizer.lr == trained_lr
    assert not list(workdir.glob("config_until_step_*.json"))


def test_sigterm_outside_the_steps_stops_the_launch_with_status_0(monkeypatch, capsys):
    """While compiling or evaluating at the end, SIGTERM's default action ended a one-process run with 143 and no
    word, which the SLURM script does not requeue on."""
    def launch(config, workdir):  # the launch, as SIGTERM reaches it outside the steps
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop, "_launch", launch)
    with pytest.raises(loop.Terminated, match="stopped by SIGTERM outside the steps"):
        loop.train_and_evaluate(None, "/tmp/never-written")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back after the launch

    def terminated(config, workdir):
        raise loop.Terminated("stopped by SIGTERM outside the steps")

    def exit_now(code):
        raise SystemExit(code)

    monkeypatch.setattr(loop, "train_and_evaluate", terminated)
    monkeypatch.setattr(cli, "_exit_at_once", exit_now)
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--config", "configs/demo.py", "--workdir", "/tmp/never-written"])
    assert info.value.code == 0 and "clip-jax train: stopped by SIGTERM" in capsys.readouterr().err


def test_a_stop_during_the_final_evaluation_says_what_the_relaunch_does(tmp_path, monkeypatch, capsys):
    """It said "interrupted" alone, and drew no curves."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def exit_now(code):
        raise SystemExit(code)

    monkeypatch.setattr(loop, "evaluate", interrupted)
    monkeypatch.setattr(cli, "_exit_at_once", exit_now)
    with pytest.raises(SystemExit) as info:
        cli.main(train_args(tmp_path / "run", "--config.total_steps=2"))
    assert info.value.code == 130
    assert ("stopped during the final evaluation: checkpoint 2 is saved, and the same command evaluates it"
            in capsys.readouterr().err)
    assert (tmp_path / "run" / "curves.png").exists() and checkpoint_steps(tmp_path / "run")[-1] == 2


def test_a_resume_that_falls_back_keeps_the_settings_until_the_step_it_resumed(trained, tmp_path,  # noqa: F811
                                                                              caplog):
    """The changed-settings warning kept the run's settings "until step N", N the unreadable latest: the resume fell
    back to an older step, and the record named the wrong one."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    previous, newest = checkpoint_steps(workdir)[-2:]
    corrupt(workdir / "checkpoints" / str(newest))
    with caplog.at_level(logging.WARNING, logger="clip_jax.train.loop"):
        cli.main(train_args(workdir, f"--config.total_steps={STEPS + 2}", "--config.optimizer.lr=5e-4",
                            "--config.evals.shapes=None"))
    assert (workdir / f"config_until_step_{previous}.json").exists()
    assert not (workdir / f"config_until_step_{newest}.json").exists()
    assert f"the settings until step {previous} are kept in config_until_step_{previous}.json" in caplog.text


def test_a_data_position_of_another_process_count_names_a_way_on(tmp_path):
    """"holds the data positions of 1 processes": and a run whose old process count is gone had no way on."""
    from clip_jax.config import default_config
    from clip_jax.train.checkpoint import Checkpointer

    checkpointer = Checkpointer(tmp_path / "run", default_config().checkpoint)
    try:
        message = str(checkpointer._foreign_layout(6, {1}))
    finally:
        checkpointer.close()
    assert f"{tmp_path / 'run' / 'checkpoints' / '6'} holds the data positions of 1 process, and this run has 1" in (
        message)
    assert f"start a new run from its parameters in a new --workdir (--config.init_from={tmp_path / 'run'};" in message


def test_the_progress_bar_ends_with_the_steps(tmp_path, monkeypatch):
    """It stayed open through the final save and evaluation, and its last line showed a rate of a tenth of the
    steps' (3.5 step/s for a run of 30)."""
    from clip_jax.train.metrics import MetricsWriter

    events = []
    close_bar, evaluate = MetricsWriter.close_bar, loop.evaluate
    monkeypatch.setattr(MetricsWriter, "close_bar", lambda self: events.append("bar closed") or close_bar(self))
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: events.append("evaluate") or evaluate(*a, **k))
    cli.main(train_args(tmp_path / "run"))
    assert events[:2] == ["bar closed", "evaluate"], events
