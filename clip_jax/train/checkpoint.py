"""Orbax checkpointing of the train state together with the grain iterator state.

Layout: `<workdir>/checkpoints/<step>/{state,data}`. Saves are asynchronous (the step loop goes on while the
arrays are written); the manager keeps the last `max_to_keep`, every `keep_period`-th step, and step 0 (a warm
start's converted or stretched model).

On several hosts every process calls save and restore at the same step: Orbax writes each process's array shards
and commits once all are written, and grain's handler writes each process's data position as
`data/process_<i>-of-<n>.json`. A run with another number of processes (a pod slice of another size) resumes too
when that position is a count of global batches, the same on every host (`GlobalBatchRows` gives every host count
the same global batches): the in-memory pipelines, e.g. `shapes`. A position that counts this host's examples (a
source that drops undecodable samples, or grain worker processes) belongs to one process layout: resuming it with
another is refused with a message saying so. So is a position of another pipeline (data.workers changed: worker
processes keep one per worker), rather than taken for a damaged checkpoint.

A save is written to `<step>.orbax-checkpoint-tmp` and renamed to `<step>` once complete, so a process killed
meanwhile leaves the previous checkpoints as they were. A save that fails (a full disk, a workdir that cannot be
written) stops the run with CheckpointWriteError, one line that names the step, the operating system's error and
the step a relaunch resumes from; the asynchronous save's error surfaces at the next save or wait.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint import checkpoint_managers as policies

from clip_jax import errors
from clip_jax.distributed import barrier
from clip_jax.errors import BackgroundErrorsOnce, ConfigError, tensorstore_brief
from clip_jax.files import CheckpointWriteError, os_error
from clip_jax.models.layers import has_stacked_blocks, relayout_blocks, relayout_parameter_trees

log = logging.getLogger(__name__)


# Orbax saves an array that several devices hold in slices, one per replica (replica-parallel saving), each cut by
# a jax operation dispatched from the thread that saves: ~1 ms a slice, 1.4 s of each save of a tiny test model's 154
# arrays on 8 devices, before the step loop goes on. Slices below 1 MiB gain less from parallel copies than that;
# such arrays are copied whole by one replica. Orbax takes the threshold only as an argument of its array handler,
# whose other arguments (its metadata store) are its own, so it is set on the registered handler; a version of orbax
# without that attribute keeps its default.
MIN_REPLICA_SLICE_BYTES = 1 << 20
_array_handler = ocp.type_handlers.get_type_handler(jax.Array)
if getattr(_array_handler, "_min_slice_bytes_for_replica_parallel", 0) is None:  # orbax's default: every array
    _array_handler._min_slice_bytes_for_replica_parallel = MIN_REPLICA_SLICE_BYTES


class DataPositionError(ConfigError):
    """The checkpoint's data position cannot be resumed by this process layout (a launch mistake, reported as one
    line like a configuration error)."""


def _layout(state: dict) -> dict[str, int | None]:
    """What of a data iterator's state depends on the pipeline, not on its position: its keys, and the length of each
    list (one entry per worker process in grain's worker pools)."""
    return {key: len(value) if isinstance(value, list) else None for key, value in state.items()}


class Checkpointer:
    def __init__(self, workdir: epath.PathLike, config: ml_collections.ConfigDict, *, owner: bool = False,
                 reader: bool = False):
        """`owner`: this process trains the workdir, so it removes the temporary folders that a killed save left
        (a full-size copy of the state each, never read); a reader such as `clip-jax eval` leaves them alone, since
        they may be the saves in progress of a training running beside it. `reader`: it only restores, so it does
        not make the checkpoints folder either (a workdir without one is left as it was)."""
        keep = [policies.LatestN(config.max_to_keep),
                # Step 0 is a warm start's model (converted or stretched): the user's input, not a product of the
                # training, and what WiSE-FT interpolates toward; the rotation never removes it.
                policies.CustomSteps([0])]
        if config.keep_period:
            keep.append(policies.EveryNSteps(config.keep_period))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=config.async_save,
            create=not reader,
            cleanup_tmp_directories=owner,
        )
        directory = epath.Path(workdir) / "checkpoints"  # pathlib would turn gs://bucket/run into gs:/bucket/run
        # Orbax wants an absolute path; a gs:// one is absolute already (`absolute()` would prefix the cwd to it).
        self.directory = directory if directory.is_absolute() else directory.absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
        self.owner = owner
        self._in_flight: int | None = None  # the step of the asynchronous save not yet waited for

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any | None = None, *, force: bool = False) -> bool:
        # Waited for here rather than inside the manager's save, so that a failure is reported as the previous step's.
        self.wait()
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # orbax and tensorstore raise many types for a failed write
            self._write_failed(step, e)
        if saved:
            self._in_flight = step
        return saved

    def _write_failed(self, step: int, error: Exception) -> NoReturn:
        """Raises CheckpointWriteError for a failure of the file system; anything else as it is."""
        reason = os_error(error)
        if reason is None:
            raise error
        latest = self.manager.latest_step()  # the manager has dropped the failed step
        then = f"resume from step {latest}" if latest is not None else "start again (no checkpoint was written)"
        raise CheckpointWriteError(
            f"could not write checkpoint {self.directory / str(step)}: {reason}; free space or fix permissions, "
            f"then relaunch the same command to {then}"
        ) from error

    def restore(self, abstract_state: Any, data_iterator: Any | None = None, step: int | None = None) -> Any:
        """Restores the state (into the shardings of `abstract_state`) and, in place, the data iterator.

        Without an explicit `step`, a newest checkpoint that cannot be read (corrupt or truncated files) is skipped
        with a warning naming it, and the next older one is used: a crash while writing never costs the run."""

        def read(candidate: int) -> Any:
            target, relaid = abstract_state, False
            if hasattr(abstract_state, "params"):  # a train state (a bare tree restores as it is)
                saved = self._saved_params(candidate)
                target = self._in_saved_layout(candidate, abstract_state, saved)
                relaid = target is not abstract_state
                # Parameters of other shapes are another run's settings, not a damaged file: refused, never set aside.
                self._check_params(candidate, target.params, partial=False, saved=saved)
            items = {"state": ocp.args.StandardRestore(target)}
            foreign = None  # (writers, batches read) when another number of processes wrote the data position
            if data_iterator is not None:
                foreign = self._global_data_position(candidate)
                if foreign is None:
                    self._check_data_pipeline(candidate, data_iterator)
                    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self.manager.restore(candidate, args=ocp.args.Composite(**items))
            except Exception as e:  # orbax/tensorstore raise many types
                if not relaid:
                    raise
                # Not set aside as unreadable: in its own layout it may read (the optimizer state of parameters
                # that other frozen rules froze in that layout, say).
                raise ConfigError(f"checkpoint {self.directory / str(candidate)} could not be read in the other "
                                  f"layout of its blocks ({_brief(e)}); resume with "
                                  f"--config.model.scan_layers={has_stacked_blocks(target.params)}, the layout it "
                                  "was written in") from e
            if foreign is not None:
                self._resume_data_position(data_iterator, *foreign, int(restored["state"].step), candidate)
            if not relaid:
                return restored["state"]
            log.warning("checkpoint %d holds its Transformer blocks %s: the parameters and the optimizer state are "
                        "laid out as this run's model.scan_layers has them", candidate,
                        "stacked" if has_stacked_blocks(target.params) else "unrolled")
            put_in_place = lambda state: relayout_parameter_trees(state, abstract_state.params, jnp.stack,
                                                                  lambda leaf, i: leaf[i])
            shardings = jax.tree.map(lambda leaf: leaf.sharding, abstract_state)
            return jax.jit(put_in_place, out_shardings=shardings)(restored["state"])

        return self._newest_readable(step, read)[1]

    def _in_saved_layout(self, step: int, abstract_state: Any, saved: Any) -> Any:
        """`abstract_state` with its parameters' Transformer blocks, and the optimizer state's trees of them, laid
        out as checkpoint `step` (its parameters' metadata `saved`) holds them: stacked or unrolled, as the
        model.scan_layers of the run that wrote it had them. The state itself where that is its own layout."""
        try:
            stored = relayout_parameter_trees(abstract_state, saved, _stacked_shape, _block_shape)
        except ValueError as e:  # blocks of one Transformer of which the frozen rules train some and freeze others
            raise ConfigError(f"checkpoint {self.directory / str(step)} holds its Transformer blocks stacked, and "
                              f"this run's frozen rules freeze some blocks and train others ({_brief(e)}): resume "
                              "with --config.model.scan_layers=True, the layout it was written in") from None
        same = jax.tree.structure(stored.params) == jax.tree.structure(abstract_state.params)
        return abstract_state if same else stored

    def restore_newest_params(self, abstract_params: Any, step: int | None = None) -> tuple[int, Any]:
        """(step, parameters) of the newest readable checkpoint (or of `step`), without the optimizer state: what a
        reader needs, in a third of the memory. Any checkpoint of the run reads, a warm start's step 0 too (its
        optimizer state is the converter's, shaped by other frozen rules)."""
        return self._newest_readable(step, lambda candidate: self.restore_params(candidate, abstract_params))

    def _newest_readable(self, step: int | None, read: Callable[[int], Any]) -> tuple[int, Any]:
        """`read` of `step`, or of the newest checkpoint it can read: an unreadable one is named and skipped (and set
        aside, by the run that owns the workdir). A ConfigError (another model) is not a damaged file: raised."""
        candidates = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        if not candidates:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        failures = []
        with quiet_background_errors() as reads:
            for candidate in candidates:
                try:
                    value = read(candidate)
                except ConfigError:
                    raise
                except Exception as e:  # orbax/tensorstore raise many types for unreadable files
                    reads.failed = True
                    if step is not None:
                        raise RuntimeError(f"checkpoint {self.directory / str(candidate)} is unreadable: {_brief(e)}"
                                           ) from e
                    failures.append(candidate)
                    log.warning("checkpoint %s is unreadable (%s: %s)", self.directory / str(candidate),
                                type(e).__name__, _brief(e))
                    continue
                if failures:
                    log.warning("newest checkpoint(s) %s unreadable: %s the older step %d instead", failures,
                                "resumed from" if self.owner else "read", candidate)
                    if self.owner:
                        self._set_aside(failures)
                log.info("restored checkpoint of step %d from %s", candidate, self.directory)
                return candidate, value
        advice = (f"clip-jax eval --workdir {self.directory.parent} tries their parameters alone (what "
                  f"--config.init_from={self.directory.parent} starts a new run from); or move {self.directory} aside "
                  "to train this workdir from the start" if self.owner else
                  "restore them from a copy of the workdir")
        raise ConfigError(f"no readable checkpoint in {self.directory} (tried steps {failures}; the warnings above say "
                          f"why): {advice}")

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unreadable checkpoints to `<workdir>/checkpoints_unreadable/` (renamed, never deleted: they may be
        recoverable by hand). Left in place, the newest of them would still count as the latest step: the run would
        not save its own final step, and the checkpoint rotation would delete the good older ones first."""
        aside = self.directory.parent / "checkpoints_unreadable"
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target = aside / str(step)
                suffix = 1
                while target.exists():  # a step number may come back unreadable again after a later crash
                    target, suffix = aside / f"{step}.{suffix}", suffix + 1
                (self.directory / str(step)).rename(target)
                log.warning("moved the unreadable checkpoint %s to %s", self.directory / str(step), target)
        barrier("unreadable checkpoints set aside")
        self.manager.reload()

    def _check_data_pipeline(self, step: int, data_iterator: Any) -> None:
        """A DataPositionError when checkpoint `step`'s data position is of another kind than this run's iterator
        keeps: another pipeline wrote it (data.workers changed: worker processes keep a position per worker). Not a
        damaged file: it must not be skipped for an older checkpoint, nor set aside."""
        path = self.directory / str(step) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):  # missing or torn: the restore fails and falls back to an older checkpoint
            return
        current = data_iterator.get_state()
        if isinstance(saved, dict) and isinstance(current, dict) and _layout(saved) != _layout(current):
            raise DataPositionError(
                f"checkpoint {self.directory / str(step)} holds the data position of another data pipeline than this "
                "launch's (data.workers changed since, or the data source): relaunch with the data settings the run "
                "was trained with (its config.json before this launch: the warning above names the changes)")

    def _global_data_position(self, step: int) -> tuple[int, int] | None:
        """None when checkpoint `step`'s data positions were written by as many processes as this run has; else
        (the writers' process count, the position they wrote), when every process wrote the same single count, or
        DataPositionError."""
        files = list((self.directory / str(step) / "data").glob("process_*-of-*.json"))
        writers = {int(f.name.rpartition("-of-")[2].removesuffix(".json")) for f in files}
        if not files or writers == {jax.process_count()}:
            return None
        try:
            positions = [json.loads(f.read_text()) for f in files]
        except ValueError:  # a torn file: the restore below fails and falls back to an older checkpoint
            return None
        if len(writers) == 1 and all(p.keys() == {"next_index"} and p == positions[0] for p in positions):
            return writers.pop(), int(positions[0]["next_index"])
        raise self._foreign_layout(step, writers)

    def _resume_data_position(self, data_iterator: Any, writers: int, batches_read: int, step: int, where: int
                              ) -> None:
        # A position that is a count of global batches equals the step (one batch a step); anything else counts
        # something of the writer's own layout.
        if batches_read != step:
            raise self._foreign_layout(where, {writers})
        try:
            data_iterator.set_state({"next_index": batches_read})
        except (KeyError, TypeError, ValueError) as e:  # this run's pipeline keeps another kind of position
            raise self._foreign_layout(where, {writers}) from e
        log.warning("checkpoint %d was written by another number of processes: this run's %d continue at global "
                    "batch %d", where, jax.process_count(), batches_read)

    def _foreign_layout(self, step: int, writers: set[int]) -> DataPositionError:
        count = sorted(writers)[0]
        written = (f"{count} process{'es' * (count != 1)}" if len(writers) == 1 else "another number of processes")
        return DataPositionError(
            f"checkpoint {self.directory / str(step)} holds the data positions of {written}, and this run has "
            f"{jax.process_count()}: for this data pipeline (a source that drops samples, or data.workers > 0) a "
            "position is per process; relaunch with the process count that wrote it, or start a new run from its "
            f"parameters in a new --workdir (--config.init_from={self.directory.parent}; the data is read from its "
            "start)"
        )

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """The parameters `abstract_params` names, of a checkpoint (whatever optimizer state and other parameters it
        holds: a few-shot run's towers are read from its checkpoint, which also holds its learner), read straight
        into their shapes, dtypes and shardings: the checkpoint's own shardings name the devices of the run that
        wrote it (e.g. a one-device `convert`), which another process layout does not have."""
        where = self.directory / str(step)
        # Blocks stacked in the checkpoint and unrolled here (model.scan_layers differs), or the other way round:
        # read in the checkpoint's layout, then put in this run's.
        saved = self._saved_params(step)
        stored = relayout_blocks(abstract_params, saved, _stacked_shape, _block_shape)
        relayout = jax.tree.structure(stored) != jax.tree.structure(abstract_params)
        # A partial restore skips what the target lacks and does not complain about what the checkpoint lacks: the
        # parameters are compared first.
        self._check_params(step, stored, partial=True, saved=saved)
        args = ocp.args.PyTreeRestore(
            item={"params": stored},
            restore_args={"params": ocp.checkpoint_utils.construct_restore_args(stored)},
            partial_restore=True,
        )
        # A reader of its own: the manager's "state" item is bound to the StandardSave/StandardRestore handler.
        try:
            with ocp.PyTreeCheckpointer() as reader:
                params = reader.restore(where / "state", args=args)["params"]
            if relayout:
                log.info("checkpoint %d holds its Transformer blocks in the other layout (model.scan_layers): "
                         "laid out as this run's model has them", step)
                put_in_place = lambda tree: relayout_blocks(tree, abstract_params, jnp.stack, lambda leaf, i: leaf[i])
                params = jax.jit(put_in_place, out_shardings=jax.tree.map(lambda leaf: leaf.sharding,
                                                                          abstract_params))(params)
            return params
        except ValueError as e:  # e.g. a shape that differs
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"checkpoint {where} holds parameters of another model ({first}); start from a "
                              "checkpoint of the same architecture, or set the model fields to its own (its "
                              "config.json)") from None

    def _saved_params(self, step: int) -> Any:
        """The metadata (shapes, dtypes) of checkpoint `step`'s parameters, as nested dicts."""
        return ocp.PyTreeCheckpointHandler().metadata(self.directory / str(step) / "state").tree["params"]

    def _check_params(self, step: int, abstract_params: Any, *, partial: bool, saved: Any = None) -> None:
        """A ConfigError unless checkpoint `step` holds every parameter of `abstract_params` in its shape (`partial`:
        and maybe others, as a few-shot run's checkpoint holds its learner beside the CLIP a warm start reads)."""
        where = self.directory / str(step)
        shapes = lambda tree: {jax.tree_util.keystr(path): tuple(leaf.shape)
                               for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
        saved = shapes(self._saved_params(step) if saved is None else saved)  # (`saved`: that metadata, read already)
        wanted = shapes(abstract_params)
        lacks = sorted(wanted.keys() - saved.keys())
        extra = [] if partial else sorted(saved.keys() - wanted.keys())
        other = [f"{k} of shape {saved[k]} where this config has {wanted[k]}"
                 for k in sorted(wanted.keys() & saved.keys()) if saved[k] != wanted[k]]
        if lacks or extra or other:
            # every kind of difference, not the first alone: a fix of one then met the next
            differ = "; ".join([*([f"it lacks {lacks[:3]}"] if lacks else []),
                                *([f"it also holds {extra[:3]}"] if extra else []), *other[:3]])
            # A resume (not partial) of another method: the run's weights can still start a new run of it.
            start = ("" if partial else f"; to train this config from the run's weights, give a new --workdir and "
                     f"--config.init_from={self.directory.parent}")
            advice = (("give this run that run's model (its config.json's `model`: a preset's recipe of its size, e.g. "
                       "configs/pretrain.py:B/32, with --config.model.* for what differs), or start from a checkpoint "
                       "of this config's architecture") if partial else
                      (f"relaunch without the changes to its model ({self.directory.parent}'s config.json holds the "
                       f"run's own){start}"))
            # Long-CLIP's kept positions (model.text.keep_positions) are a parameter a plain CLIP lacks: the run
            # starts from a stretched copy of it, which has them, not from the CLIP itself.
            if any(k.endswith("['positional_embedding_res']") for k in lacks):
                advice = (f"a Long-CLIP model starts from a stretched workdir: clip-jax stretch --workdir "
                          f"{self.directory.parent} --out-workdir NEW, then train in NEW")
            raise ConfigError(f"checkpoint {where} holds parameters of another model ({differ}): this config's model "
                              f"or method differs from the run's that wrote it; {advice}")

    def wait(self) -> None:
        """Waits for the asynchronous save; its failure raises here."""
        step, self._in_flight = self._in_flight, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # orbax and tensorstore raise many types for a failed write
            if step is None:
                raise
            self._write_failed(step, e)

    def close(self) -> None:
        self.wait()
        self.manager.close()


@dataclasses.dataclass
class ReadScope:
    """What `quiet_background_errors` is told by the reads in it: `failed`, that one failed."""

    failed: bool = False


@contextlib.contextmanager
def quiet_background_errors() -> Iterator[ReadScope]:
    """While checkpoints are read: each kind of TensorStore's background-thread errors (a damaged checkpoint's failed
    reads) once, in one line (`errors.BackgroundErrorsOnce`), unless a hook is installed already (the CLI's, or the
    user's own); asyncio's "Task exception was never retrieved", logged for each of those reads, not at all (the
    restore names the checkpoint). A failed read's coroutines report when they are collected, so where a read
    failed (an exception out of the scope, or `failed` set by a read that went on to an older checkpoint) they are
    collected before the scope ends. Only then: a full collection took ~0.3 s of CPU in a test process, at every
    restore."""
    scope = ReadScope()
    if errors.SHOW_BACKGROUND_ERRORS:
        yield scope
        return
    unretrieved = lambda record: not record.getMessage().startswith("Task exception was never retrieved")  # noqa: E731
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addFilter(unretrieved)
    own_hook = sys.unraisablehook is sys.__unraisablehook__
    if own_hook:
        sys.unraisablehook = BackgroundErrorsOnce()
    try:
        yield scope
    except BaseException:
        scope.failed = True
        raise
    finally:
        if scope.failed:
            gc.collect()
        asyncio_log.removeFilter(unretrieved)
        if own_hook:
            sys.unraisablehook = sys.__unraisablehook__


def _brief(error: Exception) -> str:
    """The gist of a TensorStore error (`errors.tensorstore_brief`)."""
    return tensorstore_brief(str(error))


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: what restore needs to place arrays on the mesh."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def read_state(workdir: epath.PathLike, step: int) -> Any:
    """A checkpoint's whole train state as host (numpy) arrays on this process, whatever process layout wrote it:
    for inspecting and comparing runs, not for training."""
    handlers = {"state": ocp.StandardCheckpointHandler()}  # for the metadata: the shapes and dtypes to restore
    directory = epath.Path(workdir) / "checkpoints"
    with ocp.CheckpointManager(directory, item_names=("state", "data"), item_handlers=handlers) as manager:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                              manager.item_metadata(step)["state"])
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return jax.device_get(restored["state"])


def _padded_spec(leaf: jax.ShapeDtypeStruct) -> tuple:
    return tuple(leaf.sharding.spec) + (None,) * (len(leaf.shape) - len(leaf.sharding.spec))


def _stacked_shape(blocks: list[jax.ShapeDtypeStruct]) -> jax.ShapeDtypeStruct:
    """A leaf of unrolled blocks as one stacked leaf, each block's sharding kept, the layer axis whole."""
    first = blocks[0]
    sharding = NamedSharding(first.sharding.mesh, PartitionSpec(None, *_padded_spec(first)))
    return jax.ShapeDtypeStruct((len(blocks), *first.shape), first.dtype, sharding=sharding)


def _block_shape(stacked: jax.ShapeDtypeStruct, index: int) -> jax.ShapeDtypeStruct:
    """One block's leaf of a stacked leaf, in the stacked one's sharding less the layer axis."""
    sharding = NamedSharding(stacked.sharding.mesh, PartitionSpec(*_padded_spec(stacked)[1:]))
    return jax.ShapeDtypeStruct(stacked.shape[1:], stacked.dtype, sharding=sharding)
