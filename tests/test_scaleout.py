"""Several machines on one PostgreSQL study, stale-trial recovery, and DDP inside a trial.

Worker processes stand in for machines (each its own ALLCONV_HOST, so none can check the
others' pids and only the heartbeat tells a dead one); gloo stands in for NCCL.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from ablations import sweep_file
from ablations.cli import main
from ablations.process import CPU_FOR_GPU_ENV, STORAGE_ENV
from ablations.settings import resolve
from ablations.storage import default_url, open_storage
from ablations.study import open_study, trial_state
from tests.helpers import FAST, dashboard_detail, run_worker, sweep_cli, wait_until, write_sweep

pytestmark = pytest.mark.slow


def sweep_cmd(file, url, workers=1):
    return [*sweep_cli(file, workers), "--storage", url]


def env_for(host, **extra):
    return dict(
        os.environ, ALLCONV_HOST=host, ALLCONV_HEARTBEAT_S="1", ALLCONV_GRACE_S="5", **extra
    )


def trials_of(url, name="t"):
    return optuna.load_study(study_name=name, storage=url).get_trials()


def wait_for_running(url, timeout=120):
    """The first running trial a worker has stamped with its pid, once there is one."""

    def running():
        try:
            return [
                t
                for t in trials_of(url)
                if t.state == optuna.trial.TrialState.RUNNING and "worker.pid" in t.user_attrs
            ]
        except KeyError:
            return []

    return wait_until(running, timeout, interval=0.5, what="a trial to start")[0]


def test_unreachable_postgres_names_host_port_database(tmp_path, in_tmp, capsys, postgres):
    file = write_sweep(tmp_path / "s.yaml")
    url = f"postgresql://postgres@127.0.0.1:{postgres.port}/no_such_db"
    assert main(["sweep", str(file), "--storage", url, "--wandb", "disabled"]) == 2
    err = capsys.readouterr().err
    assert f"host 127.0.0.1, port {postgres.port}, database no_such_db" in err
    assert 'database "no_such_db" does not exist' in err


def test_machines_starting_together_on_an_empty_database(postgres):
    """Optuna creates its tables on first use; six machines doing so at one instant must not
    collide on CREATE TABLE (without the schema lock, most rounds fail; two are run)."""
    code = (
        "import sys, time; from ablations.storage import open_storage; "
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); open_storage(sys.argv[1])"
    )
    for round in range(2):
        url = postgres.create_db(f"empty{round}")
        start = time.time() + 8
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, url, str(start)], stderr=subprocess.PIPE, text=True
            )
            for _ in range(6)
        ]
        errors = [p.stderr.read() for p in procs if p.wait(timeout=120) != 0]
        assert not errors, errors[0]
        assert optuna.get_all_study_names(url) == []


def test_three_machines_race_on_one_grid(tmp_path, in_tmp, postgres):
    url = postgres.create_db("race")
    file = write_sweep(
        tmp_path / "s.yaml",
        parameters={
            "model.variant": {"values": ["base", "all-cnn"]},
            "seed": {"values": [0, 1, 2]},
        },
    )
    procs = [
        subprocess.Popen(
            sweep_cmd(file, url),
            env=env_for(f"machine{i}"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    trials = trials_of(url)
    cells = [t.user_attrs["cell"] for t in trials if trial_state(t) == "complete"]
    assert len(cells) == 6 and len(set(cells)) == 6
    assert len(trials) == 6
    assert len({t.user_attrs["worker.host"] for t in trials}) >= 2


def test_sigkilled_machine_is_noticed_by_heartbeat_and_its_cell_rerun(tmp_path, in_tmp, postgres):
    url = postgres.create_db("kill")
    file = write_sweep(
        tmp_path / "s.yaml",
        parameters={
            **FAST,
            "data.subset": {"value": 2000},
            "train.epochs": {"value": 3},
            "model.variant": {"values": ["all-cnn"]},
            "seed": {"values": [0, 1]},
        },
    )
    first = subprocess.Popen(
        sweep_cmd(file, url),
        env=env_for("doomed"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    victim = wait_for_running(url)
    os.kill(victim.user_attrs["worker.pid"], signal.SIGKILL)
    first.wait(timeout=60)
    out = subprocess.run(
        sweep_cmd(file, url), env=env_for("survivor"), capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    trials = trials_of(url)
    by_state = {}
    for t in trials:
        by_state.setdefault(trial_state(t), []).append(t)
    assert len(by_state["complete"]) == 2
    assert len({t.user_attrs["cell"] for t in by_state["complete"]}) == 2
    dead = by_state["interrupted"]  # not a failed attempt of its cell
    assert len(dead) == 1 and dead[0].user_attrs["worker.host"] == "doomed"
    assert "no heartbeat from doomed" in dead[0].user_attrs["error_message"]
    assert dead[0].user_attrs["cell"] in {t.user_attrs["cell"] for t in by_state["complete"]}


def test_database_going_away_mid_sweep_then_coming_back(tmp_path, in_tmp, postgres):
    url = postgres.create_db("outage")
    file = write_sweep(
        tmp_path / "s.yaml",
        parameters={
            **FAST,
            "data.subset": {"value": 1000},
            "train.epochs": {"value": 3},
            "model.variant": {"values": ["base", "all-cnn"]},
            "seed": {"values": [0, 1]},
        },
    )
    sweep = subprocess.Popen(
        sweep_cmd(file, url), env=env_for("m"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def complete():
        try:
            return [t for t in trials_of(url) if trial_state(t) == "complete"]
        except KeyError:  # the study is not created yet
            return []

    done = wait_until(complete, 300, interval=0.5)
    assert done, "no trial finished"
    kept = {t.number: t.user_attrs["test/error"] for t in done}
    postgres.stop()
    try:
        assert sweep.wait(timeout=300) != 0
        log = Path("runs/t/logs/worker-0.log").read_text()
        assert "failed" in log and "Run the same command again" in log
    finally:
        postgres.start()
    out = subprocess.run(
        sweep_cmd(file, url), env=env_for("m"), capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    trials = trials_of(url)
    complete = [t for t in trials if trial_state(t) == "complete"]
    assert len({t.user_attrs["cell"] for t in complete}) == 4 and len(complete) == 4
    for number, err in kept.items():
        assert trials[number].user_attrs["test/error"] == err


class RankReport(Callback):
    """Each rank writes what it trains with (module level: spawned ranks unpickle it)."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx:
            return
        loader = trainer.train_dataloader
        (self.folder / f"rank{trainer.global_rank}.json").write_text(
            json.dumps(
                {
                    "hparams": dict(pl_module.hparams),
                    "world": trainer.world_size,
                    "shard": loader.indices(0).tolist(),
                    "batch": loader.batch_size,
                    "draw": torch.rand(4).tolist(),  # the dropout masks' random stream
                }
            )
        )


def test_ddp_trial_on_two_cpu_ranks(tmp_path, in_tmp):
    from ablations import run

    settings = resolve(
        {k: v["value"] for k, v in FAST.items()} | {"model.variant": "all-cnn", "train.epochs": 1}
    )
    result = run.train(
        settings, tmp_path / "run", devices=2, progress=False, callbacks=[RankReport(tmp_path)]
    )
    assert result.outcome == "complete" and result.metrics.epochs_run == 1
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["hparams"] == ranks[1]["hparams"]
    assert ranks[0]["world"] == 2
    # the global batch is train.batch_size at any K: each rank takes half of a step's images
    assert ranks[0]["batch"] == ranks[1]["batch"] == 64
    assert (result.provenance.world_size, result.provenance.rank_batch_size) == (2, 64)
    assert ranks[0]["draw"] != ranks[1]["draw"]  # each rank its own dropout masks
    a, b = set(ranks[0]["shard"]), set(ranks[1]["shard"])
    assert not a & b and len(a) == len(b) == 256 // 2
    assert 0 <= result.metrics.test_error <= 100


def test_devices_naming_a_missing_gpu(tmp_path, in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    file = write_sweep(tmp_path / "s.yaml")
    assert main(["sweep", str(file), "--devices", "0,3", "--wandb", "disabled"]) == 2
    assert "no GPU 3; visible GPUs: 0, 1" in capsys.readouterr().err
    assert not Path("runs").exists()


def test_worker_plan_shares_each_gpu_and_splits_the_cpu_threads():
    from ablations.launcher import worker_plan

    # 2 GPUs, 3 trials each, 48 cores: six workers, spread over the GPUs in turn, 8 threads
    assert worker_plan(["0", "1"], 1, 3, 1, 48) == [("0", 8), ("1", 8)] * 3
    # GPU pairs for DDP trials, 2 workers per pair
    assert worker_plan(["0,1", "2,3"], 1, 2, 2, 16) == [("0,1", 4), ("2,3", 4)] * 2
    # CPU workers, DDP trials of 2 processes each: 2 x 2 processes on 8 cores
    assert worker_plan([], 2, 1, 2, 8) == [(None, 2), (None, 2)]
    assert worker_plan([], 4, 1, 1, 2) == [(None, 1)] * 4  # never fewer than one thread


def test_trials_per_device_without_a_gpu_is_refused(tmp_path, in_tmp, capsys):
    file = write_sweep(tmp_path / "s.yaml")
    assert main(["sweep", str(file), "--trials-per-device", "2", "--wandb", "disabled"]) == 2
    err = capsys.readouterr().err
    assert "--trials-per-device 2 shares GPUs between workers" in err and "--workers N" in err
    assert not Path("runs").exists()


def test_trials_per_device_starts_that_many_workers_per_gpu(tmp_path, in_tmp):
    """A GPU named in CUDA_VISIBLE_DEVICES (this machine has none, so the trials train on
    the CPU, as CPU_FOR_GPU_ENV asks by name): two workers on it, each pinned to it with half
    the threads, and the grid done once. (How workers spread over several GPUs: the
    worker_plan test above.)"""
    file = write_sweep(tmp_path / "s.yaml")
    cmd = [*sweep_cli(file, workers=1), "--devices", "auto", "--trials-per-device", "2"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0", CPU_FOR_GPU_ENV: "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(p.read_text()) for p in sorted(Path("runs/t/workers").glob("*.json"))]
    assert [w["devices"] for w in lines] == ["0", "0"]
    cpus = len(os.sched_getaffinity(0))
    assert {w["threads"] for w in lines} == {max(1, cpus // 2)}
    study = optuna.load_study(study_name="t", storage=open_storage(default_url("t")))
    done = [t.user_attrs["cell"] for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert len(done) == 2 and len(set(done)) == 2


def test_dashboard_on_a_postgresql_study(tmp_path, in_tmp, postgres):
    url = postgres.create_db("dash")
    file = write_sweep(tmp_path / "s.yaml", parameters={"model.variant": {"value": "all-cnn"}})
    run_worker_at(file, url)
    detail = dashboard_detail(["t", "--storage", url], in_tmp)
    assert detail["study_name"] == "t" and len(detail["trials"]) == 1
    assert detail["objective_names"] == ["val/error"]
    (trial,) = detail["trials"]
    assert trial["intermediate_values"]  # the learning curve the dashboard draws


def run_worker_at(file, url):
    run_worker(file, storage=url)


def test_the_database_password_is_in_no_file_output_or_worker_argv(tmp_path, in_tmp, postgres):
    """A sweep on PostgreSQL with W&B offline: the password is in no file the sweep writes
    (W&B run files included: W&B records the program's arguments), not in its output, and
    not in any worker's command line while it runs. (This test server trusts every login,
    so any password connects.)"""
    secret = "Pw-Secret-4711"
    postgres.create_db("pw")
    url = f"postgresql://postgres:{secret}@127.0.0.1:{postgres.port}/pw"
    file = write_sweep(tmp_path / "s.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    cmd = sweep_cmd(file, url, workers=2)
    cmd[cmd.index("disabled")] = "offline"
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**env, "WANDB_SILENT": "true"}
    )
    seen_workers = 0
    while proc.poll() is None:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv = cmdline.read_bytes()
            except OSError:
                continue
            if b"ablations.worker" in argv:
                seen_workers += 1
                assert secret.encode() not in argv
        time.sleep(0.2)
    out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert seen_workers
    assert secret.encode() not in out + err
    written = [p for p in in_tmp.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in written), "W&B wrote no run files"
    leaks = [str(p) for p in written if secret.encode() in p.read_bytes()]
    assert not leaks, leaks


def test_the_storage_url_can_come_from_the_environment(tmp_path, in_tmp, postgres, capsys):
    """ALLCONV_STORAGE_URL stands in for --storage, so the password stays out of the
    launcher's command line too; what it shows is masked. (The sweep itself, workers and
    W&B files, is the test above: from here on the URL travels the same way.)"""
    secret = "Pw-Secret-4712"
    postgres.create_db("pwenv")
    url = f"postgresql://postgres:{secret}@127.0.0.1:{postgres.port}/pwenv"
    file = write_sweep(tmp_path / "s.yaml")
    os.environ[STORAGE_ENV] = url
    try:
        assert main(["sweep", str(file), "--dry-run", "--wandb", "disabled"]) == 0
        assert optuna.get_all_study_names(url) == []  # a dry run writes nothing
        open_study(sweep_file.load(file), url, "t", create=True)
        assert main(["status", "t"]) == 0  # found on that server, named by the environment
    finally:
        del os.environ[STORAGE_ENV]
    out = capsys.readouterr()
    assert "postgres:***@127.0.0.1" in out.out and secret not in out.out + out.err
    assert not Path("runs").exists()
