"""One training run from flat settings: the path `ablate train` and every sweep trial take."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
import yaml
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy

from ablations.checkpoints import EpochCheckpoints, Resume
from ablations.checkpoints import finish as finish_checkpoints
from ablations.files import atomic_write
from ablations.process import free_ports, stops_wait
from ablations.provenance import git_commit
from ablations.record import Metrics, Outcome, Provenance, Timings, TrialRecord
from ablations.resume import EVERY_EPOCH, CheckpointPolicy, Lease, TakenOver
from ablations.settings import Settings, SettingsError, model_spec, recorded
from datamodules import AllConvDataModule
from lightning_modules.module import AllConvModule
from lightning_modules.net import count_macs, count_params
from lightning_modules.precision import lightning_precision, resolve_precision

TRAIN_KEYS = ("lr", "lr_gamma", "warmup_epochs", "momentum", "weight_decay", "epochs", "compile")


class EpochRecorder(Callback):
    """Times the training batches of each epoch (not validation) and keeps the curves.

    It reads metrics once per epoch, so it adds one host sync per epoch, none per step. Rank 0
    also writes what it saw to `epochs.json`, which is how the launching process learns it
    when DDP ran the fit in spawned processes.
    """

    def __init__(self, path: Path | None = None, lease: Lease | None = None) -> None:
        self.path = path
        self.lease = lease  # a run folder taken over by another trial is not written to
        self.train_seconds = 0.0
        self.train_images = 0
        self.history: list[dict[str, float]] = []
        self.diverged: str | None = None
        self.first_step_at: float | None = None  # Unix time of the first training batch
        # a resumed fit: the fit time of the segments before it (to its checkpoint), how
        # many there were, and the epochs complete in the checkpoint it continued from
        self.fit_seconds_before = 0.0
        self.segments = 1
        self.resumed_from_epoch: int | None = None
        self._fit_t0 = time.perf_counter()
        self._t0: float | None = None
        self._epoch: dict[str, float] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_t0 = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        """In every checkpoint (Lightning saves a callback's state): the curves and the fit
        time up to it, which a resumed fit carries on from."""
        return {
            **self.state(),
            "fit_seconds": self.fit_seconds_before + time.perf_counter() - self._fit_t0,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_seconds, self.train_images = state["train_seconds"], state["train_images"]
        self.history, self.first_step_at = list(state["history"]), state.get("first_step_at")
        self.fit_seconds_before = state["fit_seconds"]
        self.segments = state.get("segments", 1) + 1
        self.resumed_from_epoch = len(self.history)

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_step_at is None:
            self.first_step_at = time.time()

    def _stop_clock(self, trainer, pl_module) -> None:
        if self._t0 is None:
            return
        self._sync(pl_module)
        seconds, images = time.perf_counter() - self._t0, 0
        self._t0 = None
        loader = trainer.train_dataloader
        if hasattr(loader, "x"):  # every rank's images: the throughput of the whole trial
            images = len(loader.indices(0)) * loader.world_size
        self.train_seconds += seconds
        self.train_images += images
        self._epoch = {"train_seconds": round(seconds, 4), "train_images": images}

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._stop_clock(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop_clock(trainer, pl_module)
        row = {"epoch": trainer.current_epoch, **self._epoch}
        for k, v in trainer.callback_metrics.items():
            if k.startswith(("train/", "val/")):
                row[k] = float(v)
        self.history.append(row)
        self.diverged = getattr(pl_module, "diverged", None)
        held = self.lease is None or self.lease.held()
        if self.path is not None and trainer.is_global_zero and held:
            atomic_write(self.path, json.dumps(self.state()))

    def state(self) -> dict:
        return {
            "train_seconds": self.train_seconds,
            "train_images": self.train_images,
            "history": self.history,
            "diverged": self.diverged,
            "first_step_at": self.first_step_at,
            "fit_seconds_before": self.fit_seconds_before,
            "segments": self.segments,
            "resumed_from_epoch": self.resumed_from_epoch,
        }

    def load(self) -> None:
        """Take rank 0's record when the fit ran in other processes."""
        if not self.history and self.path is not None and self.path.exists():
            saved = json.loads(self.path.read_text())
            self.train_seconds, self.train_images = saved["train_seconds"], saved["train_images"]
            self.history, self.diverged = saved["history"], saved["diverged"]
            self.first_step_at = saved.get("first_step_at")
            self.fit_seconds_before = saved.get("fit_seconds_before", 0.0)
            self.segments = saved.get("segments", 1)
            self.resumed_from_epoch = saved.get("resumed_from_epoch")


def device_name(accelerator: str) -> str:
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"cpu: {line.split(':', 1)[1].strip()} x{torch.get_num_threads()}"
    except OSError:
        pass
    return "cpu"


class Prepared(NamedTuple):
    """A run's data, module and flat settings (with `model.name`), checked and ready."""

    dm: AllConvDataModule
    module: AllConvModule
    flat: dict[str, Any]  # settings.recorded: what the run records of its settings


class Stopper(Callback):
    """A callback that may end a fit early with a state other than `complete` (e.g. the
    sweep's pruner): it sets `stop_state` and `stop_message`, and the run reports them."""

    stop_state: str | None = None
    stop_message: str | None = None


def prepare(settings: Settings, download: bool = True) -> Prepared:
    """Load the data and build the module; every check that can fail happens here."""
    if settings["train.accelerator"] == "gpu" and not torch.cuda.is_available():
        raise SettingsError("train.accelerator=gpu: no CUDA GPU is visible here; use auto or cpu")
    # seeded here, before the weights are drawn, not only in train()
    L.seed_everything(settings["seed"], workers=False, verbose=False)
    data = {k.removeprefix("data."): v for k, v in settings.items() if k.startswith("data.")}
    dm = AllConvDataModule(
        data,
        seed=settings["seed"],
        batch_size=settings["train.batch_size"],
        eval_batch_size=settings["train.eval_batch_size"],
        download=download,
    )
    dm.load()
    spec = model_spec(settings, dm.in_channels, dm.in_size, dm.num_classes)
    train = {k: settings[f"train.{k}"] for k in TRAIN_KEYS}
    module = AllConvModule(model=asdict(spec), train=train)
    return Prepared(dm, module, recorded(settings, spec))


def run_name(settings: dict[str, Any]) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", settings["model.name"])


def new_run_dir(flat: dict[str, Any], root: Path = Path("runs") / "train") -> Path:
    """`runs/train/<time>-<name>`, made atomically: runs started in the same second get
    `-2`, `-3`, ... instead of sharing (and overwriting) one folder."""
    return free_dir(root, f"{time.strftime('%Y%m%d-%H%M%S')}-{run_name(flat)}")


def free_dir(root: Path, stem: str) -> Path:
    """`root/stem`, or `stem-2`, `stem-3`, ... if taken, made atomically and returned."""
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = root / (stem if n == 1 else f"{stem}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free run folder for {stem} under {root}")


class TrialEnvironment(LightningEnvironment):
    """Where a trial's DDP ranks meet: this machine (127.0.0.1) at the port its worker was
    given, whatever the job's environment says. Lightning would otherwise take SLURM's
    (every spawned rank rank 0 of a world of `SLURM_NTASKS`, on a port fixed per job) or a
    `MASTER_PORT` that every concurrent trial on the node shares (Kubernetes sets one)."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self._main_port = port

    @property
    def creates_processes_externally(self) -> bool:
        return False  # a LOCAL_RANK from torchrun or a scheduler is not ours: we spawn

    @property
    def main_address(self) -> str:
        return "127.0.0.1"

    @property
    def main_port(self) -> int:
        return self._main_port

    def node_rank(self) -> int:
        return 0


class RankSeeds(Callback):
    """Under DDP every spawned rank starts from rank 0's random state (the same dropout masks
    and flips on every shard): ranks after the first draw from their own seed."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank > 0 and trainer.ckpt_path is None:  # resumed: restored
            torch.manual_seed(zlib.crc32(f"{self.seed}/rank{trainer.global_rank}".encode()))


class SpawnedDDP(DDPStrategy):
    """`ddp_spawn` whose ranks leave their process group before they exit.

    Lightning leaves the group to an atexit hook, which runs after a rank's work has returned
    and, in a spawned rank, while its peer may already be gone. With that hook a CPU rank
    sometimes died of SIGABRT ("terminate called without an active exception", gloo threads
    still running at exit, we believe) after a complete fit or test, failing the trial. Here
    both ranks meet at a barrier and destroy the group while each can still reach the other.
    """

    def __init__(self, port: int | None = None) -> None:
        port = port or free_ports(1)[0]
        super().__init__(start_method="spawn", cluster_environment=TrialEnvironment(port))

    def teardown(self) -> None:
        super().teardown()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def make_trainer(
    settings: Settings,
    run_dir: Path,
    recorder: EpochRecorder,
    *,
    has_val: bool,
    loggers: list,
    callbacks: list,
    progress: bool,
    devices: int | str,
    strategy: str,
    ddp_port: int | None = None,
    checkpoints: EpochCheckpoints | None = None,
    resume: Resume | None = None,
) -> tuple[L.Trainer, str, bool]:
    """The Trainer for a run; also returns its precision and whether it trains on CUDA."""
    accelerator = settings["train.accelerator"]
    use_cuda = accelerator in ("gpu", "auto") and torch.cuda.is_available()
    precision = resolve_precision(settings["train.precision"], "cuda" if use_cuda else "cpu")
    trainer = L.Trainer(
        max_epochs=settings["train.epochs"],
        accelerator="gpu" if use_cuda else "cpu",
        devices=devices,
        # ddp_spawn, not ddp: ddp re-runs the command line in every rank, and a sweep worker
        # re-run would claim trials of its own. Spawned ranks get rank 0's pickled module, so
        # all ranks train the same settings; only this process talks to Optuna and W&B.
        strategy=strategy if devices == 1 or strategy != "auto" else SpawnedDDP(ddp_port),
        # one experiment at any K: the ranks' batch norm sees the global batch, as one device;
        # torch's SyncBatchNorm is CUDA only, so CPU ranks (tests, stand-ins) normalise their
        # own share
        sync_batchnorm=devices != 1 and use_cuda,
        precision=lightning_precision(precision),
        # Lightning's own CSV log, one folder per segment of a resumed trial (a resumed
        # CSVLogger would delete the log it finds)
        logger=[CSVLogger(run_dir, name="", version=_csv_version(run_dir, resume)), *loggers],
        callbacks=[
            recorder,
            *callbacks,
            # last: it saves what the callbacks before it recorded of the epoch
            *([checkpoints] if checkpoints is not None else []),
        ],
        default_root_dir=run_dir,
        enable_progress_bar=progress,
        enable_model_summary=False,
        enable_checkpointing=False,  # EpochCheckpoints writes them (ablations/resume.py)
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the device loader shards by rank itself
        log_every_n_steps=50,
        limit_val_batches=1.0 if has_val else 0,
        # cuDNN autotuning picks the fastest algorithm per shape, which differs run to run
        benchmark=use_cuda and not settings["train.deterministic"],
        deterministic=settings["train.deterministic"],
    )
    return trainer, precision, use_cuda


def _csv_version(run_dir: Path, resume: Resume | None) -> str:
    if resume is None:
        return "lightning"
    return f"lightning-{len(list(run_dir.glob('lightning*'))) + 1}"


def outcome(
    module: AllConvModule, recorder: EpochRecorder, callbacks: list
) -> tuple[Outcome, str | None]:
    """How the fit ended: complete, diverged (the module or, under DDP, rank 0's record
    says so) or what a Stopper set (e.g. pruned); with the reason."""
    diverged = module.diverged or recorder.diverged
    if diverged:
        return Outcome.DIVERGED, diverged
    for cb in callbacks:
        if isinstance(cb, Stopper) and cb.stop_state:
            return Outcome(cb.stop_state), cb.stop_message
    return Outcome.COMPLETE, None


def train(
    settings: Settings,
    run_dir: Path | None = None,
    *,
    loggers: list | None = None,
    callbacks: list | None = None,
    progress: bool = True,
    devices: int | str = 1,
    strategy: str = "auto",
    prepared: Prepared | None = None,
    ddp_port: int | None = None,
    after_fit: Callable[[], None] | None = None,
    resume: Resume | None = None,
    policy: CheckpointPolicy = EVERY_EPOCH,
    lease: Lease | None = None,
) -> TrialRecord:
    """Prepare, make the trainer, fit (from `resume`'s checkpoint if given), test if it
    completed, and return the run's record (also written to `result.yaml`). `settings` are
    resolved (settings.resolve). Raises TakenOver if `lease` passed to another trial."""
    L.seed_everything(settings["seed"], workers=False, verbose=False)
    dm, module, flat = prepared or prepare(settings)
    callbacks = list(callbacks or [])
    if run_dir is None:
        run_dir = new_run_dir(flat)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "settings.yaml").write_text(
        yaml.safe_dump({**flat, "data.files": dm.files}, sort_keys=False)
    )
    recorder = EpochRecorder(run_dir / "epochs.json", lease)
    checkpoints = EpochCheckpoints(run_dir, flat, policy, lease)
    trainer, precision, use_cuda = make_trainer(
        settings,
        run_dir,
        recorder,
        has_val=bool(len(dm.splits["val"][1])),
        loggers=list(loggers or []),
        callbacks=[*callbacks, RankSeeds(settings["seed"])],
        progress=progress,
        devices=devices,
        strategy=strategy,
        ddp_port=ddp_port,
        checkpoints=checkpoints,
        resume=resume,
    )

    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=resume.path if resume else None, weights_only=True)
    fit_seconds = time.perf_counter() - t0
    if after_fit is not None:  # in this process, whatever ran the fit (DDP: spawned ranks)
        after_fit()
    if lease is not None and not lease.held():
        raise TakenOver(f"{run_dir} now belongs to trial {lease.owner()}")
    recorder.load()  # rank 0's record, when DDP ran the fit in spawned processes
    state, message = outcome(module, recorder, callbacks)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    tested = {}
    if state == Outcome.COMPLETE:
        # spawned DDP ranks start with SIGINT and SIGTERM blocked (a thread's mask passes
        # to the processes it starts) and keep them so: a scheduler's stop, which reaches
        # every process of the job, cannot end a rank, even before its handlers exist, and
        # leave the other waiting; this process still takes it (another thread does) and
        # holds it until the trial is recorded
        with stops_wait() if trainer.world_size > 1 else contextlib.nullcontext():
            tested = (trainer.test(module, datamodule=dm, verbose=False) or [{}])[0]

    val_curve = [(h["epoch"], h["val/error"]) for h in recorder.history if "val/error" in h]
    best = min(val_curve, key=lambda t: t[1]) if val_curve else (None, math.nan)
    last = recorder.history[-1] if recorder.history else {}
    record = TrialRecord(
        outcome=state,
        settings=flat,
        metrics=Metrics(
            val_error=val_curve[-1][1] if val_curve else math.nan,
            test_error=float(tested.get("test/error", math.nan)),
            test_error_dropout=float(tested.get("test/error_dropout", math.nan)),
            # a resumed fit with no epoch left (stopped in its test pass) logged nothing new
            train_loss=metrics.get("train/loss", last.get("train/loss", math.nan)),
            val_loss=metrics.get("val/loss", last.get("val/loss", math.nan)),
            best_val_error=best[1],
            best_epoch=best[0],
            epochs_run=len(recorder.history),
            params=count_params(module.net),
            macs=count_macs(_eager(module).eval()),
        ),
        timings=Timings(
            fit_seconds=round(recorder.fit_seconds_before + fit_seconds, 3),
            segments=recorder.segments,
            resumed_from_epoch=recorder.resumed_from_epoch,
            images_per_second=throughput(recorder.history, compiled=settings["train.compile"]),
            first_epoch_seconds=recorder.history[0].get("train_seconds")
            if recorder.history
            else None,
        ),
        provenance=Provenance(
            device=device_name("gpu" if use_cuda else "cpu"),
            precision=precision,
            git_commit=git_commit(),
            run_dir=str(run_dir),
            data_files=dm.files,
            world_size=trainer.world_size,
            rank_batch_size=settings["train.batch_size"] // trainer.world_size,
        ),
        error_message=message,
        history=recorder.history,
    )
    if lease is not None and not lease.held():
        raise TakenOver(f"{run_dir} now belongs to trial {lease.owner()}")
    if state == Outcome.COMPLETE:
        finish_checkpoints(run_dir, policy)
    result = {**record.fields(), "history": record.history}
    atomic_write(run_dir / "result.yaml", yaml.safe_dump(result, sort_keys=False))
    return record


def throughput(history: list[dict[str, float]], *, compiled: bool) -> float:
    """Training images a second. A compiled network compiles in its first epoch, so that
    epoch is left out when there are others (its time is `first_epoch_seconds`)."""
    epochs = history[1:] if compiled and len(history) > 1 else history
    seconds = sum(e.get("train_seconds", 0.0) for e in epochs)
    images = sum(e.get("train_images", 0) for e in epochs)
    return round(images / seconds, 1) if seconds else math.nan


def _eager(module: AllConvModule) -> torch.nn.Module:
    return getattr(module.net, "_orig_mod", module.net)


def gpu_problem(needed: int) -> str | None:
    """Why this process cannot train on `needed` GPUs, or None: CUDA must start and see them
    (torch built for a newer CUDA than the driver has only warns, and trains on the CPU)."""
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if seen >= needed:
        return None
    return (
        f"given GPU(s) {os.environ.get('CUDA_VISIBLE_DEVICES') or '(none)'} but CUDA sees "
        f"{seen} here (torch {torch.__version__} built for CUDA {torch.version.cuda}; "
        f"driver: {driver_version()})"
    )


def driver_version() -> str:
    """The NVIDIA driver as nvidia-smi reports it, or why it cannot say."""
    cmd = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as err:
        return f"unknown, nvidia-smi: {err}"
    said = (out.stdout.strip() or out.stderr.strip() or "no output").splitlines()[0]
    return said if out.returncode == 0 else f"unknown, nvidia-smi exited {out.returncode}: {said}"


def set_threads(n: int | None) -> None:
    """Pin torch (and BLAS) to n threads so parallel workers do not oversubscribe cores."""
    if n:
        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)
