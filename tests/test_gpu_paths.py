"""GPU paths on a machine without one: a stand-in `nvidia-smi` on PATH plays the driver. A
sweep given GPUs trains on them or stops with one line saying why; it never trains on the
CPU in their place unless told to by name; CPU workers never see a GPU."""

import os
import stat
from pathlib import Path

import pytest

from ablations import launcher, process
from ablations.cli import main
from ablations.study import find
from tests.helpers import popen_that_records, tree, write_sweep

pytestmark = pytest.mark.slow


def stand_in_nvidia_smi(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder


@pytest.fixture
def gpu_host(tmp_path, monkeypatch):
    """PATH leads to a stand-in nvidia-smi; no CUDA_VISIBLE_DEVICES from the environment."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(process.CPU_FOR_GPU_ENV, raising=False)

    def with_nvidia_smi(body: str) -> None:
        bin_dir = stand_in_nvidia_smi(tmp_path / "bin", body)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    return with_nvidia_smi


TWO_GPUS = """case "$*" in
  *driver_version*) echo 580.65.06 ;;
  *) printf '0\\n1\\n' ;;
esac"""


@pytest.mark.parametrize(
    "body,message",
    [
        (
            "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA "
            'driver." >&2; exit 9',
            "nvidia-smi exited 9: NVIDIA-SMI has failed because it couldn't communicate",
        ),
        (
            "echo 'Failed to initialize NVML: Driver/library version mismatch'",
            "nvidia-smi listed 'Failed to initialize NVML: Driver/library version mismatch', "
            "which is not a GPU index",
        ),
        ("exit 0", "--devices auto: no GPU is visible"),
    ],
)
def test_a_failing_or_empty_nvidia_smi_stops_the_sweep_before_anything_is_written(
    tmp_path, in_tmp, gpu_host, capsys, body, message
):
    gpu_host(body)
    file = write_sweep(tmp_path / "s.yaml")
    before = tree(in_tmp)
    assert main(["sweep", str(file), "--devices", "auto", "--wandb", "disabled"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert tree(in_tmp) == before


def test_no_nvidia_smi_on_path_is_an_error_not_a_cpu_worker(tmp_path, in_tmp, capsys, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no nvidia-smi anywhere
    file = write_sweep(tmp_path / "s.yaml")
    before = tree(in_tmp)
    argv = ["sweep", str(file), "--devices", "auto", "--wandb", "disabled"]
    assert main(argv) == 2
    assert "nvidia-smi is not on PATH" in capsys.readouterr().err
    assert tree(in_tmp) == before


def test_workers_given_gpus_cuda_cannot_use_stop_instead_of_training_on_the_cpu(
    tmp_path, in_tmp, gpu_host, capsys
):
    """Two GPUs listed, no CUDA here (as with a driver older than torch's CUDA build): each
    worker stops with the reason, naming torch's CUDA and the driver; no trial is run."""
    gpu_host(TWO_GPUS)
    file = write_sweep(tmp_path / "s.yaml")
    assert main(["sweep", str(file), "--devices", "auto", "--wandb", "disabled"]) == 1
    err = capsys.readouterr().err
    for i, gpu in enumerate(["0", "1"]):
        line = next(x for x in err.splitlines() if x.startswith(f"worker {i} exited 4: "))
        assert f"given GPU(s) {gpu} but CUDA sees 0 here" in line, err
        assert "built for CUDA" in line and "driver: 580.65.06" in line, line
        assert "does not train on the CPU instead" in line, line
    study, _ = find("t", None, Path("runs"))
    assert study.get_trials() == []


def test_the_cpu_stands_in_for_a_gpu_only_when_told(tmp_path, in_tmp, gpu_host, monkeypatch):
    gpu_host(TWO_GPUS)
    monkeypatch.setenv(process.CPU_FOR_GPU_ENV, "1")
    file = write_sweep(tmp_path / "s.yaml", parameters={"model.variant": {"value": "all-cnn"}})
    assert main(["sweep", str(file), "--devices", "0", "--wandb", "disabled"]) == 0
    log = (in_tmp / "runs/t/logs/worker-0.log").read_text()
    assert f"training on the CPU, as {process.CPU_FOR_GPU_ENV} asks" in log


def test_cpu_workers_see_no_gpu():
    """On a GPU host a CPU worker would otherwise train on GPU 0, in another precision."""
    env = process.worker_env("runs/t/optuna.journal", 2, None)
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert process.worker_env("u", 2, "0,1")["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_the_launcher_tells_a_gpu_worker_so(tmp_path, in_tmp, monkeypatch):
    """Workers pinned to GPUs get --gpus (they check CUDA before they claim a cell); CPU
    workers neither get it nor see a GPU."""
    seen = []
    monkeypatch.setattr(launcher.subprocess, "Popen", popen_that_records(seen))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    file = write_sweep(tmp_path / "s.yaml")
    main(["sweep", str(file), "--devices", "auto", "--wandb", "disabled"])
    assert [("--gpus" in cmd, env["CUDA_VISIBLE_DEVICES"]) for cmd, env in seen] == [
        (True, "0"),
        (True, "1"),
    ]
    seen.clear()
    main(["sweep", str(file), "--study", "cpu", "--workers", "2", "--wandb", "disabled"])
    assert [("--gpus" in cmd, env["CUDA_VISIBLE_DEVICES"]) for cmd, env in seen] == [
        (False, ""),
        (False, ""),
    ]


def test_a_batch_the_ranks_cannot_share_equally_is_refused_before_any_worker(
    tmp_path, in_tmp, capsys
):
    """--devices-per-trial K splits every step's train.batch_size images over the K ranks
    (the same experiment at any K): a batch K does not divide is refused, nothing written."""
    file = write_sweep(tmp_path / "s.yaml")
    before = tree(in_tmp)
    argv = ["sweep", str(file), "--devices-per-trial", "3", "--wandb", "disabled"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--devices-per-trial 3: train.batch_size 128 is not a multiple of 3" in err, err
    assert tree(in_tmp) == before
