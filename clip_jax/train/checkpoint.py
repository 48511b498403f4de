"""Orbax checkpointing of the train state together with the grain iterator state.

Layout: `<workdir>/checkpoints/<step>/{state,data}`. Saves are asynchronous (the step loop goes on while the
arrays are written); the manager keeps the last `max_to_keep` plus every `keep_period`-th step.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, workdir: pathlib.Path, config: ml_collections.ConfigDict):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.max_to_keep,
            keep_period=config.keep_period or None,
            enable_async_checkpointing=config.async_save,
            create=True,
        )
        self.directory = (pathlib.Path(workdir) / "checkpoints").absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any | None = None, *, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: Any, data_iterator: Any | None = None, step: int | None = None) -> Any:
        """Restores the state (into the shardings of `abstract_state`) and, in place, the data iterator."""
        step = self.latest_step() if step is None else step
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        log.info("restored checkpoint of step %d from %s", step, self.directory)
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: what restore needs to place arrays on the mesh."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
