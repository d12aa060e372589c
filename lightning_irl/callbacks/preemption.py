"""Preemption: on SIGTERM or SIGUSR1, finish the optimizer step, write ``last.ckpt``, exit non-zero."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Dict, Optional

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_irl.callbacks.checkpoint import RunCheckpoint

log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Raised (on every rank) after the preemption checkpoint is written; its ``code`` is the
    process's exit status."""

    def __init__(self, code: int, signum: int, path: Optional[str]) -> None:
        super().__init__(code)
        self.signum = signum
        self.path = path


class Preemption(Callback):
    """Stop a run cleanly when the scheduler asks: on SIGTERM or SIGUSR1 the optimizer step in
    progress finishes, ``last.ckpt`` is written (atomically, by the run's ``RunCheckpoint``) and
    the process exits with ``sigterm_exit_code`` (143 = 128 + 15, what a shell reports for a
    process ended by SIGTERM) or ``sigusr1_exit_code`` (138 = 128 + 10). A run that exits with one
    of them is meant to be resumed: ``--ckpt_path last`` (exactly, with ``ExactResume``).

    How it builds on Lightning: on one process, Lightning's own SIGTERM handler (registered for
    every ``fit``) sets ``trainer.received_sigterm``; this callback reads it (and its own SIGUSR1
    flag) after every training batch and at the end of every validation, saves and raises
    ``Preempted`` (a ``SystemExit``). A SIGTERM that arrives during validation stops the
    validation at Lightning's next check (``SIGTERMException``); the checkpoint is then written
    from ``on_exception`` and the exit code set to 143. With several processes, Lightning 2.6's
    handler runs a ``broadcast`` inside the signal handler, which deadlocks when the other rank is
    inside a collective (observed: DDP on gloo hangs); there this callback replaces it for the
    training loop with one that only sets a flag, and the ranks agree on the flags after every
    step (one ``max`` all-reduce), so they all save after the same step and exit together.
    The validation due at the step a run resumes from is not repeated.

    SIGUSR1: installed at ``on_train_start`` only if nothing handles it already. Under SLURM with
    ``auto_requeue`` Lightning's requeue handler owns the requeue signal (it saves
    ``hpc_ckpt_*.ckpt`` and requeues the job); it is left in charge, and SIGTERM still stops the
    run with 143 and a ``last.ckpt``.

    A signal during the last step stops the run the same way (resuming it then only writes the
    final checkpoint and the export). During the sanity check nothing new would be saved: the
    process exits with the code and no checkpoint; before Lightning's handler is registered
    (model building) SIGTERM ends the process outright.

    Args:
        sigterm_exit_code: Exit status after a SIGTERM.
        sigusr1_exit_code: Exit status after a SIGUSR1.
        handle_sigusr1: Install the SIGUSR1 handler (when no other handler owns the signal).
    """

    def __init__(self, sigterm_exit_code: int = 143, sigusr1_exit_code: int = 138, handle_sigusr1: bool = True) -> None:
        self.sigterm_exit_code = sigterm_exit_code
        self.sigusr1_exit_code = sigusr1_exit_code
        self.handle_sigusr1 = handle_sigusr1
        self.received_sigusr1 = False
        self.received_sigterm = False
        self._previous: Dict[int, Any] = {}

    # ---- signals ---------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        # async-signal safe: only a flag; acted on after the step
        if signum == signal.SIGTERM:
            self.received_sigterm = True
        else:
            self.received_sigusr1 = True

    def _install(self, signum: int) -> None:
        self._previous[signum] = signal.getsignal(signum)
        signal.signal(signum, self._on_signal)

    def on_train_start(self, trainer, pl_module) -> None:
        self.received_sigusr1 = self.received_sigterm = False
        if threading.current_thread() is not threading.main_thread():
            return
        if trainer.world_size > 1:
            self._install(signal.SIGTERM)
        if self.handle_sigusr1 and hasattr(signal, "SIGUSR1"):
            current = signal.getsignal(signal.SIGUSR1)
            if current in (None, signal.SIG_DFL):
                self._install(signal.SIGUSR1)
            else:
                log.info("Preemption: SIGUSR1 already has a handler (%r); leaving it in charge", current)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # Lightning restores the handlers it found when fit ends; put back only what is still ours
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def requested_signal(self, trainer) -> int:
        """The signal to act on, agreed by every rank (0: none). SIGTERM wins over SIGUSR1."""
        sigterm = trainer.received_sigterm or self.received_sigterm
        local = signal.SIGTERM if sigterm else (signal.SIGUSR1 if self.received_sigusr1 else 0)
        value = int(local)
        if trainer.world_size > 1:
            value = int(trainer.strategy.reduce(torch.tensor(value, device=trainer.strategy.root_device),
                                                reduce_op="max").item())
        return value

    def exit_code(self, signum: int) -> int:
        return self.sigterm_exit_code if signum == signal.SIGTERM else self.sigusr1_exit_code

    # ---- acting on it --------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._check(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._check(trainer)

    def _check(self, trainer) -> None:
        signum = self.requested_signal(trainer)
        if not signum:
            return
        path = save_preemption_checkpoint(trainer)
        code = self.exit_code(signum)
        log.warning("Preemption: %s received; saved %s at step %d, exiting with %d", signal.Signals(signum).name,
                    path, trainer.global_step, code)
        raise Preempted(code, signum, path)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or isinstance(exception, Preempted):
            return
        code = self.sigterm_exit_code
        if trainer.state.fn == "fit" and not trainer.sanity_checking and trainer.global_step > 0:
            path = save_preemption_checkpoint(trainer)
            log.warning("Preemption: SIGTERM received; saved %s at step %d, exiting with %d", path,
                        trainer.global_step, code)
        exception.code = code


def save_preemption_checkpoint(trainer) -> str:
    """Write ``last.ckpt`` now, collectively: through the run's ``RunCheckpoint`` (its folder,
    atomic), else into the first ``ModelCheckpoint``'s folder or the trainer's root folder."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, RunCheckpoint):
        return callback.save_last_checkpoint(trainer)
    folder = getattr(callback, "dirpath", None) if isinstance(callback, ModelCheckpoint) else None
    path = os.path.join(folder or trainer.default_root_dir, "last.ckpt")
    trainer.save_checkpoint(path)
    return path


__all__ = ["Preempted", "Preemption", "save_preemption_checkpoint"]
