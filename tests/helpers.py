"""What more than one test module needs: waiting for something, the files under a folder,
sweep files and an in-process worker, a finished study, dataset archives in the official
formats, and the Optuna dashboard's answer. Fixtures live in conftest.py."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import optuna
import yaml
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from ablations import sweep_file
from ablations.settings import model_spec, recorded, resolve
from ablations.storage import default_url, open_storage
from ablations.study import open_study
from datamodules import sources

T = TypeVar("T")


# --- waiting ---------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], T], timeout: float, *, interval: float = 0.1, what: str | None = None
) -> T:
    """Call `predicate` every `interval` seconds until it returns something truthy; return
    that value. After `timeout` seconds: with `what`, raise AssertionError("timed out after
    TIMEOUT s waiting for WHAT"); without, return the last (falsy) value, for the caller to
    assert on in its own words."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            break
        time.sleep(interval)
    if value or what is None:
        return value
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# --- files -----------------------------------------------------------------------------------


def tree(path):
    """Every file under path, relative; for 'nothing was written' checks."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def popen_that_records(seen: list) -> type:
    """A stand-in for subprocess.Popen that starts nothing: each (argv, env) goes to `seen`,
    and the "process" has exited 0 (what the launcher passes its workers, without them)."""

    class RecordedProc:
        returncode = 0

        def __init__(self, cmd, env, **kw):
            seen.append((cmd, env))

        def poll(self):
            return 0

        def wait(self, timeout=None):
            return 0

    return RecordedProc


# --- sweeps ----------------------------------------------------------------------------------

FAST = {
    "data.dataset": {"value": "synthetic"},
    "data.subset": {"value": 256},
    "data.val_size": {"value": 64},
    "data.preprocess": {"value": "standardize"},
    "model.width": {"value": 0.125},
    "train.epochs": {"value": 1},
}


def write_sweep(path: Path, **overrides) -> Path:
    raw = {
        "name": "t",
        "method": "grid",
        "metric": {"name": "val/error", "goal": "minimize"},
        "parameters": {**FAST, "model.variant": {"values": ["base", "all-cnn"]}},
    }
    params = overrides.pop("parameters", {})
    raw.update(overrides)
    raw["parameters"] = {**raw["parameters"], **params}
    path.write_text(yaml.safe_dump(raw))
    return path


def sweep_cli(file: Path, workers: int) -> list[str]:
    """`ablate sweep FILE --workers N --wandb disabled`, as a subprocess argv."""
    return [
        sys.executable,
        "-m",
        "ablations.cli",
        "sweep",
        str(file),
        "--workers",
        str(workers),
        "--wandb",
        "disabled",
    ]


def run_worker(file: Path, study: str = "t", runs: Path = Path("runs"), **kw) -> None:
    """One in-process worker, as `ablate sweep` starts them, after creating the study."""
    from ablations import worker  # torch and Lightning: not for every test session's start

    sweep = sweep_file.load(file)
    url = kw.pop("storage", default_url(study, runs))
    open_study(sweep, url, study, create=True)
    argv = [
        str(file),
        "--study",
        study,
        "--storage",
        url,
        "--runs-dir",
        str(runs / study),
        "--wandb",
        kw.pop("wandb", "disabled"),
    ]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    assert worker.main(argv) == 0


def load(study="t", runs=Path("runs")):
    return optuna.load_study(study_name=study, storage=open_storage(default_url(study, runs)))


# --- a finished study ------------------------------------------------------------------------

VARIANTS = ["base", "all-cnn"]
LRS = [0.1, 0.01]
SEEDS = [0, 1, 2]


def make_study(
    root: Path,
    name: str = "paper",
    raw: dict | None = None,
    value=None,
    broken: dict | None = None,
    curves: bool = False,
) -> optuna.Study:
    """A realistic finished study: by default 2 variants x 2 lrs x 3 seeds with one diverged
    and one failed trial and known metrics (`value(cell)` gives the validation error).
    `curves`: each trial keeps 3 epochs (`trial_curves`), as `run.train` stores them."""
    raw = raw or {
        "name": name,
        "method": "grid",
        "metric": {"name": "val/error", "goal": "minimize"},
        "parameters": {
            "data.dataset": {"value": "cifar10"},
            "data.preprocess": {"value": "standardize"},  # off the protocol, on purpose
            "train.epochs": {"value": 350},
            "model.variant": {"values": VARIANTS},
            "train.lr": {"values": LRS},
            "seed": {"values": SEEDS},
        },
    }
    value = value or (
        lambda c: (
            10 + 3 * VARIANTS.index(c["model.variant"]) + 100 * c["train.lr"] + c["seed"] * 0.5
        )
    )
    broken = (
        broken
        if broken is not None
        else {
            (("model.variant", "base"), ("seed", 2), ("train.lr", 0.1)): "diverged",
            (("model.variant", "all-cnn"), ("seed", 1), ("train.lr", 0.01)): "failed",
        }
    )
    (root / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    sweep = sweep_file.load(root / f"{name}.yaml")
    study = open_study(sweep, default_url(name, root / "runs"), name, create=True)
    cells, _ = sweep.cells()
    for i, cell in enumerate(reversed(cells)):  # stored out of order on purpose
        settings = resolve({**sweep.base, **cell})
        flat = recorded(settings, model_spec(settings))
        val = value(cell)
        attrs = {
            "cell": sweep_file.cell_id(cell),
            "settings": flat,
            "params": 954_730,
            "macs": 1,
            "val/error": val,
            "test/error": val - 1,
            "best_epoch": 300,
            "epochs_run": 350,
            "fit_seconds": 100.0 + i,
            "images_per_second": 500.0,
            "precision": "32-true",
            "device": "test",
            "wandb_run_id": f"w{i}",
            "git_commit": "abc",
            "state": "complete",
        }
        state, objective = TrialState.COMPLETE, val
        what = broken.get(tuple(sorted(cell.items())))
        if what:
            attrs.update(
                state=what,
                error_message="non-finite training loss"
                if what == "diverged"
                else "RuntimeError: boom",
            )
            attrs.pop("val/error"), attrs.pop("test/error")
            state, objective = TrialState.FAIL, None
        if curves and what != "failed":
            attrs["curves"] = trial_curves(val, cell["seed"], diverged=what == "diverged")
        dists = {k: CategoricalDistribution(sweep.params[k].values) for k in cell}
        study.add_trial(
            create_trial(
                state=state, value=objective, params=cell, distributions=dists, user_attrs=attrs
            )
        )
    return study


def trial_curves(val: float, seed: int, diverged: bool = False) -> dict[str, list]:
    """Three epochs ending at the trial's validation error (a diverged one's loss non-finite
    in its last epoch, stored as null)."""
    loss = [1.0 + 0.1 * seed, 0.6 + 0.1 * seed, None if diverged else 0.4 + 0.1 * seed]
    return {"epoch": [0, 1, 2], "train/loss": loss, "val/error": [val + 4, val + 2, val]}


# --- dataset archives in the official formats ------------------------------------------------

CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def cifar_rows(x: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> the archive's (N, 3072) rows: 1024 red, 1024 green, 1024 blue."""
    n = len(x)
    return np.concatenate([x[..., ch].reshape(n, 1024) for ch in range(3)], axis=1)


def dump_pickle(path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the originals are Python 2 cPickle, protocol 2


def write_cifar10(root, per_batch=6, n_test=10, seed=0):
    """The cifar-10-batches-py layout under root; returns the images and labels written."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {}
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", n_test)]:
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y = np.arange(n) % 10  # every class in every batch, so stratified splits work
        rng.shuffle(y)
        dump_pickle(
            folder / name,
            {
                b"batch_label": f"{name} of 5".encode(),
                b"labels": [int(v) for v in y],  # a list, as in the originals
                b"data": cifar_rows(x),
                b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            },
        )
        out[name] = (x, y)
    dump_pickle(
        folder / "batches.meta",
        {
            b"num_cases_per_batch": per_batch,
            b"label_names": [n.encode() for n in CIFAR10_NAMES],
            b"num_vis": 3072,
        },
    )
    train = [out[f"data_batch_{i}"] for i in range(1, 6)]
    return (
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        *out["test_batch"],
    )


def write_cifar100(root, n_train=300, n_test=100, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = []
    for name, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y = np.arange(n) % 100
        rng.shuffle(y)
        dump_pickle(
            folder / name,
            {
                b"filenames": [f"img_{i}.png".encode() for i in range(n)],
                b"batch_label": name.encode(),
                b"fine_labels": [int(v) for v in y],
                b"coarse_labels": [int(v) // 5 for v in y],
                b"data": cifar_rows(x),
            },
        )
        out += [x, y]
    fine = [f"fine{i:02d}" for i in range(100)]
    dump_pickle(
        folder / "meta",
        {
            b"fine_label_names": [n.encode() for n in fine],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        },
    )
    return (*out, fine)


def idx_bytes(a: np.ndarray) -> bytes:
    """The IDX format: 0, 0, type 0x08 (unsigned byte), ndim, big-endian sizes, the bytes."""
    header = bytes([0, 0, 0x08, a.ndim]) + b"".join(d.to_bytes(4, "big") for d in a.shape)
    return header + np.ascontiguousarray(a, dtype=np.uint8).tobytes()


def write_idx(path, a: np.ndarray) -> None:
    data = idx_bytes(a)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def write_fashion(folder, n_train=100, n_test=40, size=28, gz=(True, False, True, False), seed=0):
    """The four Fashion-MNIST IDX files, each gzipped or not as `gz` says."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train_y": (np.arange(n_train) % 10).astype(np.uint8),
        "test_x": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "test_y": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for (key, stem), zipped in zip(sources.FASHION_FILES.items(), gz):
        write_idx(folder / (stem + (".gz" if zipped else "")), arrays[key])
    return arrays


# --- the Optuna dashboard --------------------------------------------------------------------


def dashboard_detail(args: list[str], cwd: Path) -> dict:
    """Start `ablate dashboard ARGS --port P` on a free port; the first study's detail as
    its HTTP API gives it."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ablations.cli", "dashboard", *args, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )

    def studies():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            return None

    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/dashboard/studies/" in line, proc.stderr.read()
        body = wait_until(studies, 60, interval=0.5)
        assert body is not None, "the dashboard never answered"
        (summary,) = body["study_summaries"]
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", timeout=10
        ) as r:
            return {**json.loads(r.read()), "study_name": summary["study_name"]}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
