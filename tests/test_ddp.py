"""DDP inside a trial, on CPU ranks with gloo: its ranks meet where the worker was told,
whatever SLURM or MASTER_PORT say, two such trials side by side; a loss that goes
non-finite on one rank stops every rank at the same step."""

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from ablations.storage import default_url, open_storage
from ablations.study import trial_state
from tests.helpers import FAST, write_sweep

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

# what SLURM sets for a job of 2 tasks (`--ntasks-per-node 2`, or srun): Lightning, left to
# choose, takes it for a world of 2 launched by srun, on a port fixed by the job id
SLURM_JOB = {
    "SLURM_NTASKS": "2",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_JOB_ID": "424242",
    "SLURM_JOB_NAME": "ablations",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NNODES": "1",
}


def test_ddp_trials_side_by_side_meet_their_ranks_under_slurm_and_a_shared_master_port(
    tmp_path, in_tmp
):
    """Two workers, each a 2-rank DDP trial at once, in a SLURM job's environment with a
    MASTER_PORT that something else holds: both cells complete at the first attempt, with
    world size 2 and half of train.batch_size per rank in their records; each trial is one
    W&B run (only rank 0 logs) and one run folder."""
    file = write_sweep(
        tmp_path / "s.yaml", parameters={**FAST, "model.variant": {"values": ["base", "all-cnn"]}}
    )
    with socket.socket() as held:  # Kubernetes' MASTER_PORT, taken by another job
        held.bind(("127.0.0.1", 0))
        held.listen()
        env = {
            **os.environ,
            **SLURM_JOB,
            "MASTER_ADDR": "10.255.255.1",
            "MASTER_PORT": str(held.getsockname()[1]),
        }
        argv = [sys.executable, "-m", "ablations.cli", "sweep", str(file), "--workers", "2"]
        argv += ["--devices-per-trial", "2", "--wandb", "offline"]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    storage = open_storage(default_url("t", Path("runs")))
    trials = storage.get_all_trials(storage.get_study_id_from_name("t"))
    assert [trial_state(t) for t in trials] == ["complete", "complete"], [
        t.user_attrs.get("error_message") for t in trials
    ]
    for t in trials:
        assert (t.user_attrs["world_size"], t.user_attrs["rank_batch_size"]) == (2, 64)
        assert t.user_attrs["wandb_run_id"]
        assert len(list(Path(t.user_attrs["run_dir"]).glob("wandb/offline-run-*"))) == 1
    assert sorted(p.name for p in Path("runs/t/trials").iterdir()) == sorted(
        Path(t.user_attrs["run_dir"]).name for t in trials
    )
    starts = sorted(t.datetime_start for t in trials)
    ends = sorted(t.datetime_complete for t in trials)
    assert starts[1] < ends[0], "the two DDP trials did not run at the same time"


class PoisonRankOne(Callback):
    """Rank 1 alone gets a NaN weight before its first step (after DDP's broadcast)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and batch_idx == 0:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


RUN_POISONED = """
import json, sys
from pathlib import Path
from ablations import run
from ablations.settings import resolve
from tests.test_ddp import PoisonRankOne
settings = resolve({
    "data.dataset": "synthetic", "data.subset": 256, "data.val_size": 64,
    "data.preprocess": "standardize", "model.width": 0.125, "train.epochs": 2,
})
record = run.train(settings, Path(sys.argv[1]), devices=2, progress=False,
                   callbacks=[PoisonRankOne()])
print(json.dumps({"state": record.outcome, "why": record.error_message,
                  "epochs": record.metrics.epochs_run}))
"""


def test_a_loss_that_goes_non_finite_on_one_rank_stops_every_rank(tmp_path):
    """Without a collective decision rank 1 would stop alone and rank 0 wait in the
    gradients' all-reduce for gloo's 30-minute timeout (this test's own timeout first)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", RUN_POISONED, str(tmp_path / "run")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["state"] == "diverged" and result["epochs"] == 1, result
    assert "non-finite training loss" in result["why"] and "step 0" in result["why"], result


def test_a_spawned_rank_gets_the_data_settings_not_the_images(tmp_path):
    """What DDP's spawn pickles of the data module holds no tensor (tensors go through
    /dev/shm), and the rank that unpickles it reads the same images with the same
    statistics."""
    from datamodules import AllConvDataModule

    settings = resolve_fast({"data.preprocess": "gcn-zca", "data.dir": str(tmp_path / "data")})
    data = {k.removeprefix("data."): v for k, v in settings.items() if k.startswith("data.")}
    dm = AllConvDataModule(data, seed=0)
    dm.load()

    def tensors(value):
        if isinstance(value, torch.Tensor):
            return 1
        if isinstance(value, dict):
            return sum(tensors(v) for v in value.values())
        if isinstance(value, list | tuple):
            return sum(tensors(v) for v in value)
        return 0

    assert tensors(dm.__dict__) > 0 and tensors(dm.__getstate__()) == 0
    rank = pickle.loads(pickle.dumps(dm))
    rank.load()
    for split in ("train", "val", "test"):
        assert torch.equal(rank.splits[split][0], dm.splits[split][0])
        assert torch.equal(rank.splits[split][1], dm.splits[split][1])
    assert rank.stats_source == dm.stats_source


def resolve_fast(overrides):
    from ablations.settings import resolve

    return resolve({k: v["value"] for k, v in FAST.items()} | overrides)
