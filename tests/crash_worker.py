"""Subprocess entry point of the crash tests: a `clip-jax` command that dies at a chosen moment, as a machine that
loses power, an OOM killer or a cluster scheduler would end it, with no chance to clean up.

    python tests/crash_worker.py [HOOK ...] -- CLIP_JAX_ARGV...

Hooks (the library has none: they patch it from here before `clip_jax.cli.main` runs):
  --kill-after-step K   process 0 SIGKILLs itself right after train step K has been dispatched (while it runs), and
                        with --hold-commit once every file of the held save is written; the other processes of a
                        cluster are left to the launcher, which kills them when one dies, as a scheduler would
  --hold-commit S       the asynchronous save of step S never commits: its files are written, its folder is never
                        renamed, so the save stays in flight until the process dies
  --kill-in-commit S    SIGKILL when the save of step S is about to commit: every array file written, the folder
                        not yet renamed from `S.orbax-checkpoint-tmp`
  --cut-write NAME      the first write of a file whose name contains NAME dies after CUT_BYTES bytes: a file-size
                        limit (RLIMIT_FSIZE) and SIGXFSZ stop the process inside the write, leaving the file cut
  --fill-disk-at-save S before the save of step S: wait for the previous save, then fill the file system of the
                        checkpoints folder (the test mounts a small tmpfs there), so that the save finds no space
"""

import argparse
import asyncio
import os
import resource
import signal
import sys
import threading

CUT_BYTES = 20
held = threading.Event()  # set when the held save has reached its commit: every file of it written


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_step(step: int, wait_for_held: bool) -> None:
    import jax

    from clip_jax.train import step as step_lib

    real = step_lib.compile_train_step

    def compile_train_step(*args, **kwargs):
        compiled = real(*args, **kwargs)
        done = None

        def run(state, batch):
            nonlocal done
            if done is None:
                done = int(state.step)  # where this launch starts (read before the state is donated)
            out = compiled(state, batch)
            done += 1
            if done == step and jax.process_index() == 0:
                if wait_for_held:
                    held.wait(timeout=120)
                kill()
            return out

        return run

    step_lib.compile_train_step = compile_train_step


def patch_commit(step: int, hold: bool) -> None:
    """Orbax calls `atomicity.on_commit_callback` (in its background save thread) once every file of a save is
    written: it writes commit_success.txt and renames the folder."""
    from orbax.checkpoint._src.path import atomicity

    real = atomicity.on_commit_callback

    async def on_commit_callback(tmp_dir, **kwargs):
        if tmp_dir.get_final().name == str(step):
            if hold:
                held.set()
                await asyncio.Event().wait()  # never set
            kill()
        return await real(tmp_dir, **kwargs)

    atomicity.on_commit_callback = on_commit_callback


def cut_write(name: str) -> None:
    def audit(event: str, args: tuple) -> None:
        if event != "open" or not isinstance(args[0], str | bytes | os.PathLike):
            return
        path, mode, flags = os.fsdecode(args[0]), args[1] or "", args[2]
        writing = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR)
        if writing and name in os.path.basename(path):
            start = os.path.getsize(path) if "a" in mode and os.path.exists(path) else 0
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it: the write would only raise
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGXFSZ dumps core: no core file in the checkout
            resource.setrlimit(resource.RLIMIT_FSIZE, (start + CUT_BYTES, resource.RLIM_INFINITY))

    sys.addaudithook(audit)


def fill_disk_at_save(step: int) -> None:
    from clip_jax.train import checkpoint

    real = checkpoint.Checkpointer.save

    def save(self, at: int, *args, **kwargs):
        if at == step:
            self.wait()
            # Unbuffered: a buffered file would hold the bytes that did not fit and raise ENOSPC again at close.
            with open(self.directory / "filler", "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 16))
                except OSError:  # ENOSPC: the file system is full
                    pass
        return real(self, at, *args, **kwargs)

    checkpoint.Checkpointer.save = save


def main() -> None:
    split = sys.argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-after-step", type=int)
    parser.add_argument("--hold-commit", type=int)
    parser.add_argument("--kill-in-commit", type=int)
    parser.add_argument("--cut-write")
    parser.add_argument("--fill-disk-at-save", type=int)
    hooks = parser.parse_args(sys.argv[1:split])
    if hooks.kill_after_step is not None:
        kill_after_step(hooks.kill_after_step, wait_for_held=hooks.hold_commit is not None)
    if hooks.hold_commit is not None:
        patch_commit(hooks.hold_commit, hold=True)
    if hooks.kill_in_commit is not None:
        patch_commit(hooks.kill_in_commit, hold=False)
    if hooks.cut_write:
        cut_write(hooks.cut_write)
    if hooks.fill_disk_at_save is not None:
        fill_disk_at_save(hooks.fill_disk_at_save)

    from clip_jax import cli

    cli.main(sys.argv[split + 1:])


if __name__ == "__main__":
    main()
