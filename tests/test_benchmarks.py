"""The GPU check, shortened on the CPU: it runs, and writes the figures and provenance it
promises; its projection arithmetic on known figures. Its two trainers on one device get 10 s
to start instead of the CPU default's 25 (their imports take about 9 s on an idle machine; one
not ready by then starts its timing when it is): the same code path, 15 s less waiting."""

import json

import pytest

from benchmarks import gpu_check


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    figures = gpu_check.main(["--out", str(out), "--device", "cpu", "--trainers-start", "10"])
    return figures, json.loads((out / "gpu_check.json").read_text())


def test_shortened_gpu_check_writes_every_figure(check):
    figures, doc = check
    assert doc["figures"] == json.loads(json.dumps(figures, default=str))
    f = doc["figures"]
    assert f["shortened"] is True
    bare = f["train_images_per_second"]["bare"]
    assert len(bare) == 4 and all(v > 0 for v in bare.values())  # 2 batches x 2 precisions
    (pipe,) = f["train_images_per_second"]["pipeline"].values()
    assert pipe["images_per_second"] > 0 and pipe["epoch_fixed_seconds"] >= 0
    assert list(f["pipeline_vs_bare"]) == list(f["train_images_per_second"]["pipeline"])
    assert f["loader_images_per_second"] > 0
    assert set(f["eval_images_per_second"]) == {"no_grad batch 1024", "grad batch 128"}
    assert len(f["paper_models_images_per_second"]) == 12
    shared = f["shared_device_images_per_second"]  # --trials-per-device's figure
    assert set(shared) == {"1 trainer", "2 trainers"} and all(v > 0 for v in shared.values())
    proj = f["projection"]
    assert proj["protocol_hours"] > 0 and proj["paper_table3_cells"] == 144
    assert proj["paper_table3_hours_one_gpu"] > 0
    assert "torch.compile runs (CPU or --no-compile)" in f["skipped"]
    assert f["complete"] is True
    # the real sweep path, here with the CPU standing in for GPU 0 by name
    sweep = f["sweep_path"]["1 trial per device"]
    assert sweep["returncode"] == 0 and sweep["outcomes"] == ["complete"] * 4, sweep
    assert all(d.startswith("cpu") for d in sweep["devices"]) and sweep["world_sizes"] == [1]
    assert f["precision_accuracy"] == {"skipped": "CPU (the shortened run)"}  # GPU only


def test_results_carry_the_machine_and_settings(check):
    _, doc = check
    m = doc["machine"]
    for key in ("date", "torch", "cpu", "cpu_cores", "git_commit"):
        assert key in m
    assert doc["settings"]["device"] == "cpu"
    assert doc["settings"]["trainers_start_s"] == 10
    assert doc["settings"]["run_settings"]["train.accelerator"] == "cpu"


def test_projection_arithmetic():
    piped = {"batch 128 bf16-mixed": {"images_per_second": 900.0, "epoch_fixed_seconds": 1.0}}
    bare = {"batch 128 bf16-mixed": 1000.0}
    evals = {"no_grad batch 1024": 5000.0}
    models = {name: {"train": 1000.0, "eval": 5000.0} for name in gpu_check.paper_presets()}
    proj = gpu_check.project(piped, bare, evals, models, 128, "bf16-mixed")
    epoch = 45000 / 900 + 5000 / 5000 + 1.0  # training, validation, the rest
    hours = (350 * epoch + 10000 / 5000) / 3600
    assert proj["protocol_hours"] == round(hours, 2)
    # every model as fast as All-CNN-C, and the pipeline at 0.9 of bare: 144 equal cells
    # (12 models x 4 rates x 3 seeds)
    assert proj["paper_table3_hours_one_gpu"] == round(144 * hours, 1)


def test_cli_startup_benchmark_times_each_command(tmp_path):
    from benchmarks import cli_startup

    figures = cli_startup.main(["--out", str(tmp_path), "--repeats", "1"])
    for name in cli_startup.COMMANDS:
        assert figures[name]["median"] > 0
    assert set(figures["over_floor_seconds"]) == set(cli_startup.COMMANDS) - {
        "import optuna, pandas (floor)"
    }
    assert (tmp_path / "cli_startup.json").is_file()
