import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from ablations import run
from ablations.settings import resolve
from lightning_modules.module import AllConvModule, milestones

# batch norm: without it the synthetic set puts this net past SGD's stability edge at lr 0.01,
# and whether it learns depends on the seed and the CPU (docs/recipe.md)
TINY = {
    "data.dataset": "synthetic",
    "model.width": 0.25,
    "model.variant": "all-cnn",
    "model.norm": "batch",
    "train.epochs": 2,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    settings = resolve(TINY)
    return run.train(settings, path / "run", progress=False), path / "run"


def test_short_synthetic_run_learns(trained):
    result, _ = trained
    assert result.outcome == "complete"
    assert result.metrics.test_error < 60, result  # chance is 90%
    assert result.metrics.epochs_run == 2 and result.timings.images_per_second > 0
    assert result.metrics.params > 0 and result.timings.fit_seconds > 0


def test_checkpoint_reloads_alone_with_identical_predictions(trained):
    result, path = trained
    ckpt = path / "checkpoints" / "last.ckpt"
    a = AllConvModule.load_from_checkpoint(ckpt).eval()
    b = AllConvModule.load_from_checkpoint(ckpt).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in a.state_dict().items())
    assert (path / "settings.yaml").exists()


@pytest.mark.parametrize(
    "steps,expected",
    [(350 * 391, [200 * 391, 250 * 391, 300 * 391]), (140, [80, 100, 120]), (1, [1])],
)
def test_milestones_scale_with_the_run(steps, expected):
    # 350 epochs of 391 steps (CIFAR-10 at batch 128): epochs 200, 250 and 300 exactly
    assert milestones(steps) == expected


TRAIN = {"lr": 0.1, "lr_gamma": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "epochs": 35}


def test_optimizer_follows_the_settings():
    module = AllConvModule(model={"width": 0.125}, train={**TRAIN, "compile": False})
    module._trainer = SimpleNamespace(estimated_stepping_batches=35 * 10)  # 10 steps an epoch
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 1e-3
    assert sorted(sched.milestones) == [200, 250, 300]
    assert cfg["lr_scheduler"]["interval"] == "step"


def test_warmup_ramps_then_the_milestones_decay():
    train = {**TRAIN, "compile": False, "warmup_epochs": 1.0}
    module = AllConvModule(model={"width": 0.125}, train=train)
    module._trainer = SimpleNamespace(estimated_stepping_batches=35 * 10)
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(350):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] == pytest.approx(0.01) and rates[5] == pytest.approx(0.055)
    assert rates[10] == pytest.approx(0.1) and rates[199] == pytest.approx(0.1)
    assert rates[200] == pytest.approx(0.01) and rates[300] == pytest.approx(1e-4)


def test_non_finite_loss_ends_the_run_as_diverged(tmp_path):
    settings = resolve({**TINY, "model.norm": "none", "train.lr": 1e12, "model.dropout": "none"})
    result = run.train(settings, tmp_path / "run", progress=False)
    assert result.outcome == "diverged"
    assert "non-finite" in result.error_message
    assert math.isnan(result.metrics.test_error)


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    """Four `ablate train` runs started in one second once shared one folder (and one
    crashed in CSVLogger); the folder is now made atomically, with -2, -3, ... after it."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(run.time, "strftime", lambda fmt: "20261128-120000")
    flat = {"model.name": "All-CNN-C"}
    with ThreadPoolExecutor(4) as pool:
        dirs = list(pool.map(lambda _: run.new_run_dir(flat, tmp_path), range(4)))
    assert sorted(d.name for d in dirs) == [
        "20261128-120000-All-CNN-C",
        "20261128-120000-All-CNN-C-2",
        "20261128-120000-All-CNN-C-3",
        "20261128-120000-All-CNN-C-4",
    ]
    assert all(d.is_dir() and not any(d.iterdir()) for d in dirs)


class BatchNormBuffers(Callback):
    """The batch-norm running statistics as the test pass starts and as it ends."""

    def on_test_start(self, trainer, pl_module):
        self.before = self._buffers(pl_module)

    def on_test_end(self, trainer, pl_module):
        self.after = self._buffers(pl_module)

    @staticmethod
    def _buffers(pl_module):
        return {k: v.clone() for k, v in pl_module.net.state_dict().items() if "running_" in k}


def test_the_dropout_on_test_pass_leaves_batch_norm_alone(tmp_path):
    """test/error of a batch-norm run with dropout is its checkpoint's eval-mode error: the
    second, dropout-on pass of each test batch neither normalises with that batch nor moves
    the running statistics the next batch is scored with (ten test batches of 100)."""
    settings = resolve({**TINY, "train.epochs": 1, "train.eval_batch_size": 100})
    buffers = BatchNormBuffers()
    result = run.train(settings, tmp_path / "run", progress=False, callbacks=[buffers])
    assert result.outcome == "complete" and not math.isnan(result.metrics.test_error_dropout)
    assert buffers.before and all(
        torch.equal(buffers.before[k], buffers.after[k]) for k in buffers.before
    )

    module = AllConvModule.load_from_checkpoint(tmp_path / "run/checkpoints/last.ckpt").eval()
    dm, _, _ = run.prepare(settings)
    x, y = dm.splits["test"]
    with torch.no_grad():
        wrong = sum(
            int((module(x[i : i + 100]).argmax(1) != y[i : i + 100]).sum())
            for i in range(0, len(y), 100)
        )
    assert result.metrics.test_error == pytest.approx(100 * wrong / len(y), abs=1e-3)
