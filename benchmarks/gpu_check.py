"""The GPU check: one command, under 8 minutes on one H200, that says whether the sweep path
trains on this GPU, whether bf16 trains as well as 32-bit here, how fast the pipeline trains
and what the paper's protocol and Table 3 sweep will cost on it.

    python -m benchmarks.gpu_check --out DIR [--data DIR_WITH_fashion-mnist]

It writes DIR/gpu_check.json after every figure (`"complete": false` until the end), so a
failure or a timeout keeps what was measured; every child process has a timeout. First, the
checks only a GPU can make:
  - the real `ablate sweep --devices auto` on a 4-cell grid: outcomes, wall time and the
    device every trial recorded (a GPU's name; a CPU there is the silent fallback), then the
    same with --trials-per-device 2, and a --devices-per-trial 2 DDP trial with 2 GPUs;
  - bf16 against 32-bit test error on a short Fashion-MNIST run, 2 seeds each (the IDX files
    under --data/fashion-mnist, or Debian's package; skipped and said so without them).
Then, for All-CNN-C at width 1.0, channels-last:
  - training images/s of the bare loop at batch 128 and 512, fp32 and bf16, with and without
    torch.compile (compile time reported apart);
  - the pipeline (ablations.run.train, as `ablate train` runs it) at batch 128 and 512 with
    train.precision=auto, and with train.compile=true, against the bare loop;
  - host syncs per training step in the pipeline (torch.cuda sync debug mode);
  - evaluation images/s (no gradients, batch 1024) and the device loader's images/s;
  - the bare loop's images/s for each of the 12 Table 3 models;
  - the summed images/s of 2 and 4 bare trainers in separate processes on the one GPU, against
    one: what `ablate sweep --trials-per-device N` can gain;
and projects the wall time of the 350-epoch protocol on CIFAR-10 (45000 training images,
5000 validation images each epoch, 10000 test images once) and of sweeps/paper_table3.yaml on
one GPU. Steps are sized for an H100-class card; anything left when --budget seconds are spent
is skipped and listed. On a CPU it runs the same code shortened (width 0.125, tiny batches,
no compile), so a test covers it; its figures then describe nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from ablations import run, settings, sweep_file
from benchmarks import common
from benchmarks.loader import device_loader_ips
from datamodules import DeviceLoader
from lightning_modules.family import paper_presets
from lightning_modules.net import build
from lightning_modules.precision import resolve_precision

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = {"epochs": 350, "train": 45000, "val": 5000, "test": 10000}

# Batch sizes (bare loop; pipeline), timed and warm-up steps, training images, model width,
# epochs of each pipeline run (the first is its warm-up), images for the eval figures.
SIZES = {
    "cuda": {
        "batches": (128, 512),
        "pipeline_batches": (128, 512),
        "steps": {128: 100, 512: 40},
        "warmup": 10,
        "subset": 7168,
        "width": 1.0,
        "epochs": 4,
        "eval_images": 7168,
        "shared": (2, 4),
        "sweep": {"subset": 8192, "width": 1.0, "epochs": 2},
        "accuracy": {"subset": None, "width": 0.5, "epochs": 5, "seeds": (0, 1)},
        "child_timeout": 300,
    },
    "cpu": {
        "batches": (16, 32),
        "pipeline_batches": (16,),
        "steps": {16: 2, 32: 2},
        "warmup": 1,
        "subset": 32,
        "width": 0.125,
        "epochs": 3,
        "eval_images": 32,
        "shared": (2,),
        "sweep": {"subset": 256, "width": 0.125, "epochs": 1},
        "accuracy": {"subset": 512, "width": 0.125, "epochs": 1, "seeds": (0,)},
        "child_timeout": 300,
    },
}


class EpochClock(Callback):
    """Per epoch after the first: training seconds and images, validation seconds, and the
    wall time from one epoch's start to the next. Syncs at those points only."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self._t: dict[str, float] = {}

    def _now(self, pl_module) -> float:
        common.sync(pl_module.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        now = self._now(pl_module)
        if "start" in self._t and trainer.current_epoch >= 2:
            self.epochs[-1]["wall"] = now - self._t["start"]
        self._t = {"start": now, "images": 0}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._t["images"] += len(batch[1])
        if batch_idx == trainer.num_training_batches - 1:
            self._t["train_end"] = self._now(pl_module)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._t["val_start"] = self._now(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or "val_start" not in self._t:
            return
        now = self._now(pl_module)
        if trainer.current_epoch >= 1:
            self.epochs.append(
                {
                    "train": self._t["train_end"] - self._t["start"],
                    "images": self._t["images"],
                    "val": now - self._t["val_start"],
                }
            )

    def summary(self) -> dict[str, float]:
        done = [e for e in self.epochs if "wall" in e]
        train = sum(e["train"] for e in self.epochs)
        out = {"images_per_second": sum(e["images"] for e in self.epochs) / train}
        if done:  # what an epoch costs beyond its training and validation batches
            fixed = [e["wall"] - e["train"] - e["val"] for e in done]
            out["epoch_fixed_seconds"] = common.median(fixed)
        return out


class SyncCounter(Callback):
    """Counts the host syncs CUDA's sync debug mode reports during the training batches of
    the second epoch, and where in the code they come from."""

    def __init__(self) -> None:
        self.count: int | None = None
        self.steps = 0
        self.where: dict[str, int] = {}
        self._cm = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1 and pl_module.device.type == "cuda":
            self._cm = warnings.catch_warnings(record=True)
            self._log = self._cm.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._cm is not None:
            self.steps += 1

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self._cm is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._cm.__exit__(None, None, None)
        self._cm = None
        syncs = [w for w in self._log if "synchroniz" in str(w.message)]
        self.count = len(syncs)
        for w in syncs:
            key = f"{Path(w.filename).name}:{w.lineno}"
            self.where[key] = self.where.get(key, 0) + 1


def paper_settings(size: dict[str, Any], root: Path, **overrides: Any) -> dict[str, Any]:
    """sweeps/paper_table3.yaml's fixed settings, on synthetic data of the same shape."""
    sweep = sweep_file.load(ROOT / "sweeps" / "paper_table3.yaml")
    return settings.resolve(
        {
            **sweep.base,
            **common.ALL_CNN_C,
            "model.width": size["width"],
            "data.subset": size["subset"],
            "data.dir": str(root / "data"),
            "train.epochs": size["epochs"],
            **overrides,
        }
    )


def pipeline(settings: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    clock, syncs = EpochClock(), SyncCounter()
    t0 = time.perf_counter()
    result = run.train(settings, run_dir, callbacks=[clock, syncs], progress=True)
    out = {
        **clock.summary(),
        "fit_seconds": result.timings.fit_seconds,
        "run_seconds": round(time.perf_counter() - t0, 1),
    }
    if syncs.count is not None:
        out["host_syncs_per_step"] = round(syncs.count / max(1, syncs.steps), 3)
        out["host_sync_sites"] = syncs.where
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=360, help="seconds; the rest is skipped")
    p.add_argument(
        "--data",
        default=str(ROOT / "data"),
        help="folder with fashion-mnist/ (the IDX files) for the bf16 accuracy check",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    p.add_argument(
        "--trainers-start",
        type=float,
        default=None,
        metavar="S",
        help="seconds the trainers on one device get to start (imports, a warm-up step) "
        "before they time together; default 40 on a GPU, 25 on a CPU (the test gives less: "
        "a trainer not ready by then starts its timing when it is)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="cpu: the shortened run, even where a GPU is present (the test's)",
    )
    args = p.parse_args(argv)
    return common.in_scratch(run_check, args, "gpu-check")


def run_check(args, root: Path) -> dict[str, Any]:
    t_start = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check --device cuda: no CUDA device is visible")
    cuda = args.device != "cpu" and torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    size = SIZES[device]
    compile_runs = cuda and not args.no_compile
    torch.backends.cudnn.benchmark = cuda  # as the pipeline's Trainer(benchmark=...) sets it
    settings = paper_settings(size, root, **{"train.accelerator": "auto" if cuda else "cpu"})
    auto = resolve_precision(settings["train.precision"], device)
    dm, module, _ = run.prepare(settings)
    x, y = (t.to(device) for t in dm.splits["train"])
    spec = module.spec
    skipped: list[str] = []
    figures: dict[str, Any] = {"shortened": not cuda, "auto_precision": auto, "complete": False}
    start = args.trainers_start  # seconds for the trainers' imports (and CUDA's start-up)
    used = {
        "device": device,
        "sizes": {k: (list(v) if isinstance(v, tuple) else v) for k, v in size.items()},
        "model": "All-CNN-C" if cuda else "All-CNN-C at width 0.125 (shortened CPU run)",
        "channels_last": True,
        "protocol": PROTOCOL,
        "sweep": "sweeps/paper_table3.yaml",
        "run_settings": settings,
        "trainers_start_s": (40 if cuda else 25) if start is None else start,
    }

    def save() -> Path:  # after every figure: a failure later keeps what was measured
        figures["skipped"] = skipped
        figures["elapsed_seconds"] = round(time.perf_counter() - t_start, 1)
        return common.write_result("gpu_check", figures, used, args.out)

    def budget_left(what: str) -> bool:
        if time.perf_counter() - t_start < args.budget:
            return True
        skipped.append(what)
        print(f"  skipped (time budget): {what}")
        return False

    def log(key: str, value: Any) -> None:
        print(f"  [{time.perf_counter() - t_start:5.1f} s] {key}: {value}")

    # the checks only a GPU can make, first: the sweep path, then bf16 against 32-bit
    gpus = torch.cuda.device_count() if cuda else 0
    runs = [("1 trial per device", [])]
    if cuda:
        runs.append(("2 trials per device", ["--trials-per-device", "2"]))
    else:
        skipped.append("sweep path with 2 trials per device (CPU)")
    if gpus >= 2:
        runs.append(("DDP on 2 GPUs", ["--devices-per-trial", "2"]))
    else:
        skipped.append("DDP on 2 GPUs (fewer than 2 GPUs)")
    figures["sweep_path"] = {}
    for label, extra in runs:
        if budget_left(f"sweep path, {label}"):
            figures["sweep_path"][label] = sweep_path(root, label, extra, size, cuda)
            log(f"ablate sweep --devices auto, {label}", figures["sweep_path"][label])
            save()
    if budget_left("bf16 against 32-bit accuracy"):
        figures["precision_accuracy"] = precision_accuracy(root, Path(args.data), size, cuda)
        log("bf16 against 32-bit test error", figures["precision_accuracy"])
        save()

    # the loader alone, as the datamodule builds it for training
    loader = DeviceLoader(x, y, 128, shuffle=True, augment="flip-translate")
    figures["loader_images_per_second"] = round(device_loader_ips(loader, 3))
    log("loader flip-translate images/s", figures["loader_images_per_second"])
    save()
    del loader

    # the bare loop: batch x precision, eager
    bare: dict[str, float] = {}
    piped: dict[str, dict[str, Any]] = {}
    ratios: dict[str, float] = {}
    compile_seconds: dict[str, float] = {}

    def bare_run(batch: int, precision: str, compiled: bool) -> None:
        key = f"batch {batch} {precision}" + (" compile" if compiled else "")
        if not budget_left(f"bare {key}"):
            return
        if compiled:
            torch._dynamo.reset()  # a fresh compile each time, and no recompile limit hit
        t0 = time.perf_counter()
        bare[key] = round(
            common.bare_train(
                spec,
                x,
                y,
                batch_size=batch,
                steps=size["steps"][batch],
                warmup=size["warmup"],
                precision=precision,
                compile=compiled,
            ),
            1,
        )
        if compiled:  # the warm-up steps hold the compilation; the timed steps are taken off
            timed = size["steps"][batch] * batch / bare[key]
            compile_seconds[key] = round(time.perf_counter() - t0 - timed, 1)
        log(f"bare {key} images/s", bare[key])
        figures["train_images_per_second"] = {"bare": bare, "pipeline": piped}
        save()

    for batch in size["batches"]:
        for precision in ("32-true", "bf16-mixed"):
            bare_run(batch, precision, False)

    # the pipeline, as `ablate train` runs it, at the default settings and at batch 512

    def pipeline_run(batch: int, compiled: bool) -> None:
        key = f"batch {batch} {auto}" + (" compile" if compiled else "")
        if not budget_left(f"pipeline {key}"):
            return
        if compiled:
            torch._dynamo.reset()
        s = {**settings, "train.batch_size": batch, "train.compile": compiled}
        piped[key] = pipeline(s, root / f"pipeline-{len(piped)}")
        ips = piped[key]["images_per_second"]
        piped[key]["images_per_second"] = round(ips, 1)
        if key in bare:
            ratios[key] = round(ips / bare[key], 3)
        log(f"pipeline {key}", piped[key])
        figures["pipeline_vs_bare"] = ratios
        save()

    for batch in size["pipeline_batches"]:
        pipeline_run(batch, False)

    # evaluation as validation runs it, and as a naive loop would
    net = build(spec).to(device).to(memory_format=torch.channels_last)
    xe, ye = x[: size["eval_images"]], y[: size["eval_images"]]
    evals = {
        "no_grad batch 1024": round(
            common.eval_images_per_second(net, xe, ye, batch_size=1024, precision=auto, passes=3), 1
        ),
        "grad batch 128": round(
            common.eval_images_per_second(
                net, xe, ye, batch_size=128, precision=auto, grad=True, passes=3
            ),
            1,
        ),
    }
    log("eval images/s", evals)
    figures["eval_images_per_second"] = evals
    save()

    # each Table 3 model, bare, at the sweep's batch and precision; on a CPU the eval speed
    # is scaled from All-CNN-C's (each new conv shape costs oneDNN a kernel build there)
    batch0 = size["batches"][0]
    models: dict[str, dict[str, float]] = {}
    for name, model_spec in paper_presets().items():
        if not budget_left(f"paper model {name}"):
            continue
        model_spec = replace(model_spec, width=size["width"])
        train_ips = common.bare_train(
            model_spec,
            x,
            y,
            batch_size=batch0,
            steps=size["steps"][batch0] // 2 or 1,
            warmup=size["warmup"],
            precision=auto,
        )
        if cuda:
            m = build(model_spec).to(device).to(memory_format=torch.channels_last)
            eval_ips = common.eval_images_per_second(m, xe, ye, batch_size=1024, precision=auto)
        else:
            eval_ips = evals["no_grad batch 1024"] * train_ips / bare[f"batch {batch0} {auto}"]
        models[name] = {"train": round(train_ips, 1), "eval": round(eval_ips, 1)}
    log("paper models images/s", models)
    figures["paper_models_images_per_second"] = models
    save()

    # several trainers on one device, as `ablate sweep --trials-per-device N` runs them
    shared: dict[str, float] = {}
    data_file = root / "shared-data.pt"
    torch.save({"x": x.cpu(), "y": y.cpu(), "spec": asdict(spec)}, data_file)
    for n in size["shared"]:
        if not budget_left(f"{n} trainers on one device"):
            continue
        shared[f"{n} trainers"] = concurrent_images_per_second(
            n,
            data_file,
            device,
            batch0,
            size["steps"][batch0],
            size["warmup"],
            auto,
            timeout=size["child_timeout"],
            start_s=used["trainers_start_s"],
        )
        log(f"{n} trainers on one device, images/s in all", shared[f"{n} trainers"])
        save()

    # torch.compile: the costly part, last
    if compile_runs:
        for batch in size["batches"]:
            for precision in ("32-true", "bf16-mixed"):
                bare_run(batch, precision, True)
        pipeline_run(batch0, True)
    else:
        skipped.append("torch.compile runs (CPU or --no-compile)")

    figures.update(
        train_images_per_second={"bare": bare, "pipeline": piped},
        pipeline_vs_bare=ratios,
        compile_seconds=compile_seconds,
        eval_images_per_second=evals,
        paper_models_images_per_second=models,
        shared_device_images_per_second={
            "1 trainer": bare.get(f"batch {batch0} {auto}"),
            **shared,
        },
    )
    figures["projection"] = project(piped, bare, evals, models, batch0, auto)
    figures["complete"] = True
    path = save()
    proj = figures["projection"]
    print(
        f"projected: 350-epoch protocol {proj.get('protocol_hours')} h, paper_table3 "
        f"{proj.get('paper_table3_hours_one_gpu')} h on one {common.machine()['gpu'] or 'CPU'}; "
        f"{figures['elapsed_seconds']} s; wrote {path}"
    )
    return figures


SWEEP_GRID = """\
name: gpu-check
description: benchmarks/gpu_check.py, the sweep path on this device
method: grid
metric: {{name: val/error, goal: minimize}}
parameters:
  data.dataset: {{value: synthetic}}
  data.dir: {{value: {data_dir}}}
  data.subset: {{value: {subset}}}
  data.preprocess: {{value: standardize}}
  model.width: {{value: {width}}}
  model.norm: {{value: batch}}
  train.epochs: {{value: {epochs}}}
  model.variant: {{values: [base, strided, convpool, all-cnn]}}
"""


def sweep_path(root: Path, label: str, extra: list[str], size: dict, cuda: bool) -> dict:
    """`ablate sweep --devices auto` on a 4-cell grid, as a user runs it: its exit code, wall
    time, the trials' outcomes and the device each recorded. On a CPU (the shortened run) a
    named stand-in: CUDA_VISIBLE_DEVICES=0 with the CPU standing in by name."""
    from ablations.process import CPU_FOR_GPU_ENV

    folder = root / ("sweep-" + "".join(c if c.isalnum() else "-" for c in label))
    folder.mkdir(parents=True)
    grid = SWEEP_GRID.format(data_dir=root / "data", **size["sweep"])
    (folder / "sweep.yaml").write_text(grid)
    cmd = [sys.executable, "-m", "ablations.cli", "sweep", str(folder / "sweep.yaml")]
    cmd += ["--devices", "auto", *extra, "--wandb", "disabled", "--runs-dir", str(folder)]
    env = dict(os.environ, WANDB_SILENT="true")
    if not cuda:
        env.update({"CUDA_VISIBLE_DEVICES": "0", CPU_FOR_GPU_ENV: "1"})
    t0 = time.perf_counter()
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=size["child_timeout"]
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {size['child_timeout']} s"}
    wall = time.perf_counter() - t0
    from ablations.record import TrialRecord
    from ablations.study import find

    try:
        study, _ = find("gpu-check", None, folder)
    except Exception as err:  # the sweep never made its study: its own words say why
        return {"returncode": done.returncode, "error": f"{err}", "stderr": done.stderr[-2000:]}
    records = [TrialRecord.of(t) for t in study.get_trials()]
    out = {
        "returncode": done.returncode,
        "wall_seconds": round(wall, 1),
        "outcomes": sorted(r.outcome.value for r in records),
        "devices": sorted({str(r.provenance.device) for r in records}),
        "precisions": sorted({str(r.provenance.precision) for r in records}),
        "world_sizes": sorted({r.provenance.world_size or 0 for r in records}),
        "images_per_second": [r.timings.images_per_second for r in records],
    }
    if done.returncode:
        out["stderr"] = done.stderr[-2000:]
    if cuda and any(d.startswith("cpu") for d in out["devices"]):
        out["error"] = "a trial trained on the CPU though the sweep was given GPUs"
    return out


def precision_accuracy(root: Path, data: Path, size: dict, cuda: bool) -> dict:
    """Test error of the same short Fashion-MNIST runs in 32-bit and in bf16 mixed, per seed:
    whether bf16 (auto's choice on this device) trains as well as 32-bit here."""
    from datamodules.sources import fashion_mnist_dirs

    if not cuda:  # the shortened run: a CPU's bf16 says nothing of a GPU's, and costs minutes
        return {"skipped": "CPU (the shortened run)"}
    have = [d for d in fashion_mnist_dirs(data) if list(d.glob("train-images-idx3-ubyte*"))]
    if not have:
        return {"skipped": f"no Fashion-MNIST IDX files under {data}/fashion-mnist"}
    acc = size["accuracy"]
    errors: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for precision in ("32", "bf16"):
        for seed in acc["seeds"]:
            overrides = {
                "data.dataset": "fashion-mnist",
                "data.dir": str(data),
                "model.width": acc["width"],
                "model.norm": "batch",
                "train.epochs": acc["epochs"],
                "train.lr": 0.05,
                "train.precision": precision,
                "train.accelerator": "auto" if cuda else "cpu",
                "seed": seed,
            }
            if acc["subset"]:
                overrides["data.subset"] = acc["subset"]
            s = settings.resolve(overrides)
            record = run.train(s, root / f"accuracy-{precision}-{seed}", progress=False)
            errors.setdefault(precision, []).append(round(record.metrics.test_error, 2))
            seconds[precision] = seconds.get(precision, 0.0) + (record.timings.fit_seconds or 0)
    diffs = [b - a for a, b in zip(errors["32"], errors["bf16"])]
    return {
        "test_error": errors,
        "bf16_minus_32_points": [round(d, 2) for d in diffs],
        "fit_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "settings": {**acc, "seeds": list(acc["seeds"]), "lr": 0.05, "norm": "batch"},
    }


SHARED_WORKER = """
import json, sys, time
import torch
from benchmarks import common
from lightning_modules.family import ModelSpec

path, device, batch, steps, warmup, precision, start_at = sys.argv[1:]
torch.backends.cudnn.benchmark = device == "cuda"  # as the one-trainer baseline runs
data = torch.load(path)
x, y = data["x"].to(device), data["y"].to(device)
spec = ModelSpec(**data["spec"])
common.bare_train(
    spec, x, y, batch_size=int(batch), steps=1, warmup=int(warmup), precision=precision
)
time.sleep(max(0.0, float(start_at) - time.time()))  # every trainer starts its timing together
ips = common.bare_train(
    spec, x, y, batch_size=int(batch), steps=int(steps), warmup=1, precision=precision
)
print(json.dumps({"images_per_second": ips}))
"""


def concurrent_images_per_second(
    n: int,
    data_file: Path,
    device: str,
    batch: int,
    steps: int,
    warmup: int,
    precision: str,
    *,
    timeout: float,
    start_s: float,
) -> float | str:
    """Training images/s of n bare trainers in separate processes on one device, summed: what
    `--trials-per-device n` can gain over one trainer (the bare loop's figure). They start
    timing together `start_s` seconds from now (imports and CUDA start-up before it)."""
    start_at = time.time() + start_s
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SHARED_WORKER, str(data_file), device, str(batch)]
            + [str(steps * 4), str(warmup), precision, str(start_at)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))},
        )
        for _ in range(n)
    ]
    rates = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, start_at + timeout - time.time()))
            rates.append(json.loads(out.strip().splitlines()[-1])["images_per_second"])
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout} s"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return round(sum(rates), 1)


def project(piped, bare, evals, models, batch, auto) -> dict[str, Any]:
    """Hours for the protocol (All-CNN-C) and the cells of paper_table3 (144), from the
    pipeline's measured speed and per-epoch cost; other models scale by their bare speed."""
    key = f"batch {batch} {auto}"
    if key not in piped or key not in bare:
        return {"note": "the pipeline at the default batch was not measured"}
    p = piped[key]
    ratio = p["images_per_second"] / bare[key]
    fixed = p.get("epoch_fixed_seconds", 0.0)
    eval_ips = evals["no_grad batch 1024"]

    def hours(train_ips: float, eval_ips: float) -> float:
        epoch = PROTOCOL["train"] / train_ips + PROTOCOL["val"] / eval_ips + fixed
        return (PROTOCOL["epochs"] * epoch + PROTOCOL["test"] / eval_ips) / 3600

    out: dict[str, Any] = {
        "protocol_hours": round(hours(p["images_per_second"], eval_ips), 2),
        "assumes": f"pipeline {p['images_per_second']} train images/s, {eval_ips} eval "
        f"images/s, {fixed:.2f} s per epoch besides; data loading and ZCA once per run "
        "not counted",
    }
    sweep = sweep_file.load(ROOT / "sweeps" / "paper_table3.yaml")
    cells, _ = sweep.cells()
    if models:
        total = 0.0
        for cell in cells:
            name = settings.model_spec(settings.resolve({**sweep.base, **cell})).name
            m = models.get(name)
            if m is None:
                return {**out, "paper_table3_note": f"model {name} not measured"}
            total += hours(m["train"] * ratio, m["eval"])
        out["paper_table3_cells"] = len(cells)
        out["paper_table3_hours_one_gpu"] = round(total, 1)
    return out


if __name__ == "__main__":
    main()
