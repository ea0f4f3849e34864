"""The LightningModule: build the net, compute the loss, log, configure the optimiser."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.family import ModelSpec
from lightning_modules.net import build

# How often (in steps) the training loss is checked for NaN/inf. Checking is a host sync;
# on a GPU every sync stalls the queue, so we look every few steps and at epoch end.
FINITE_CHECK_EVERY = {"cpu": 1, "cuda": 16}


def milestones(steps: int) -> list[int]:
    """The paper's 200/250/300 of 350 epochs, as optimizer steps of a run of `steps` steps.

    In steps rather than epochs so a short run keeps the paper's proportions: a 2-epoch run
    decays after 57% of its steps, not after its first epoch (which left the second at a tenth
    of the rate). At 350 epochs the milestones fall exactly on epochs 200, 250 and 300.
    """
    return sorted({max(1, round(steps * m / 350)) for m in (200, 250, 300)})


class AllConvModule(L.LightningModule):
    def __init__(self, model: dict[str, Any], train: dict[str, Any]) -> None:
        super().__init__()
        # logger=False: W&B gets the flat run settings instead (ablations/wandb_log.py)
        self.save_hyperparameters(logger=False)
        self.spec = ModelSpec(**model)
        # channels-last: the layout oneDNN and cuDNN run convolutions fastest in (benchmarks/)
        self.net = build(self.spec).to(memory_format=torch.channels_last)
        if train.get("compile"):
            # Dynamo caches per code object: a worker's trials all share the network's
            # `forward`, and each network adds entries (batch, last batch, evaluation, the
            # dropout-on pass) against a recompile limit, past which it runs eagerly with one
            # warning. A process trains one network at a time, so each starts afresh.
            torch._dynamo.reset()
            self.net = torch.compile(self.net)
        n = self.spec.num_classes
        # validate_args=False: the check calls torch.unique on the labels, a host sync per
        # batch on a GPU; the labels come from our own loaders
        self.val_acc = MulticlassAccuracy(n, average="micro", validate_args=False)
        self.test_acc = MulticlassAccuracy(n, average="micro", validate_args=False)
        # the same test images with dropout left on (one stochastic pass): a network whose
        # eval-mode error is above this one has a dropout train/eval gap (docs/recipe.md)
        self.test_acc_dropout = MulticlassAccuracy(n, average="micro", validate_args=False)
        self.diverged: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_train_epoch_start(self) -> None:
        # (loss x images, correct predictions) summed on the device; images counted here
        self._train_sums = torch.zeros(2, device=self.device)
        self._train_images = 0
        self._train_logged = False

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y)
        every = FINITE_CHECK_EVERY.get(loss.device.type, 16)
        if idx % every == 0 and not self._finite_everywhere(loss):
            return self._diverge(
                f"non-finite training loss ({loss.item()} here, rank "
                f"{self.trainer.global_rank} of {self.trainer.world_size}) at epoch "
                f"{self.current_epoch}, step {idx}"
            )
        # No self.log or torchmetrics update per step: each costs about a millisecond of
        # Python (Lightning copies its result state on every log call), as much as a whole
        # GPU step at batch 128. Two in-place adds on the device instead, logged once per epoch
        # (benchmarks/throughput.py, benchmarks/gpu_check.py).
        correct = (logits.detach().argmax(dim=1) == y).sum()
        self._train_sums += torch.stack((loss.detach() * len(y), correct.float()))
        self._train_images += len(y)
        if idx == self.trainer.num_training_batches - 1:
            self._log_train_epoch()
        return loss

    def _log_train_epoch(self) -> None:
        """The epoch's mean loss and error, logged from its last step, so that callbacks reading
        metrics at the epoch's end (EpochRecorder) see this epoch's values."""
        if self._train_logged or not self._train_images:
            return
        loss, error = self._train_sums[0] / self._train_images, self._train_sums[1]
        error = 100 * (1 - error / self._train_images)
        # equal shards on every rank: the mean over ranks is the mean over all images
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train/error", error, on_step=False, on_epoch=True, sync_dist=True)
        self._train_logged = True

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank. One rank that stopped alone would leave
        the others waiting in the gradients' all-reduce until its timeout; the decision is
        collective, at the same step on every rank."""
        finite = bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        return finite

    def _diverge(self, reason: str) -> torch.Tensor | None:
        self.diverged = reason
        self.trainer.should_stop = True
        if self.trainer.world_size == 1:
            return None  # Lightning skips the backward and the optimiser step
        # under DDP every rank must take part in the step's all-reduce (Lightning refuses a
        # None there): a loss whose gradients are zero, whatever the weights hold
        return sum(p.sum() for p in self.parameters()) * 0.0

    def on_train_epoch_end(self) -> None:
        self._log_train_epoch()  # an epoch cut short (a stop) never reached its last step
        loss = self.trainer.callback_metrics.get("train/loss")
        if self.diverged is None and loss is not None and not torch.isfinite(loss):
            self._diverge(f"non-finite training loss at epoch {self.current_epoch}")

    def _eval_step(self, batch, prefix: str, acc: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x).float()
        acc.update(logits, y)
        self.log(
            f"{prefix}/loss",
            F.cross_entropy(logits, y),
            on_step=False,
            on_epoch=True,
            sync_dist=True,
        )

    def validation_step(self, batch, idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def on_validation_epoch_end(self) -> None:
        self.log("val/error", 100 * (1 - self.val_acc.compute()))
        self.val_acc.reset()

    def test_step(self, batch, idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)
        dropouts = [m for m in self.net.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        if dropouts:
            # the dropout layers alone: in training mode a batch norm would normalise with the
            # test batch's statistics and fold them into its running ones, which the next
            # batch's eval-mode test/error would then use
            x, y = batch
            for m in dropouts:
                m.train()
            try:
                self.test_acc_dropout.update(self(x).float(), y)
            finally:
                for m in dropouts:
                    m.eval()

    def on_test_epoch_end(self) -> None:
        self.log("test/error", 100 * (1 - self.test_acc.compute()))
        self.test_acc.reset()
        if self.test_acc_dropout.update_count:
            self.log("test/error_dropout", 100 * (1 - self.test_acc_dropout.compute()))
            self.test_acc_dropout.reset()

    def configure_optimizers(self):
        t = self.hparams.train
        opt = torch.optim.SGD(
            self.parameters(), lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"]
        )
        steps = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones(steps), gamma=t["lr_gamma"])
        warmup = round(steps * t.get("warmup_epochs", 0.0) / t["epochs"])
        if warmup:  # not in the paper: a linear ramp from 1/warmup of the rate, times the steps
            ramp = torch.optim.lr_scheduler.LinearLR(opt, 1 / warmup, total_iters=warmup)
            sched = torch.optim.lr_scheduler.ChainedScheduler([ramp, sched], optimizer=opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
