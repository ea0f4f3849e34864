"""The trial's W&B logger: Lightning's, made unable to fail a trial.

A module of its own so that `ablations.wandb_log` (imported by the CLI) does not load
Lightning, while the class stays importable by name (DDP pickles the loggers it spawns with).
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger("ablations.wandb")


class SafeWandbLogger(WandbLogger):
    """A WandbLogger whose failures are logged and then ignored: W&B never fails a trial."""

    broken = False

    def _guard(self, what: str, fn, *args, **kwargs) -> Any:
        if self.broken:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            self.broken = True
            log.warning("W&B %s failed, the trial goes on without it: %s", what, err)
            return None

    def log_metrics(self, metrics, step=None) -> None:
        self._guard("log_metrics", super().log_metrics, metrics, step)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self._guard("log_hyperparams", super().log_hyperparams, params, *args, **kwargs)

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self._guard("after_save_checkpoint", super().after_save_checkpoint, checkpoint_callback)

    def finalize(self, status: str) -> None:
        self._guard("finalize", super().finalize, status)
