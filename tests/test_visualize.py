"""`ablate visualize` on tiny trained synthetic models: the maps, the figures, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ablations import run
from ablations.cli import main
from ablations.settings import resolve
from tests.helpers import FAST, run_worker, tree, write_sweep

TINY = {
    "data.dataset": "synthetic",
    "data.subset": 512,
    "model.width": 0.125,
    "model.variant": "all-cnn",
    "train.epochs": 1,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vis") / "run"
    settings = resolve({**TINY, "data.dir": str(folder.parent / "data")})
    run.train(settings, folder, progress=False)
    return folder


def test_the_checkpoint_carries_the_preprocessing_statistics(trained):
    ckpt = torch.load(trained / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    saved = ckpt["AllConvDataModule"]
    assert set(saved["stats"]) == {"mean", "std"} and saved["data"]["dataset"] == "synthetic"


def test_maps_have_the_input_shape_and_guided_backprop_is_not_the_gradient(trained):
    from ablations import saliency

    model = saliency.load_run(trained)
    x = model.images[:3]
    pred = model.net(x).argmax(dim=1)
    maps = saliency.attributions(model.net, x, pred)
    assert set(maps) == {"gradient", "deconvnet", "guided backprop"}
    for m in maps.values():
        assert m.shape == x.shape and torch.isfinite(m).all() and m.abs().sum() > 0
    assert not torch.allclose(maps["guided backprop"], maps["gradient"])
    # guided backprop passes only positive gradients through each ReLU: its map differs
    # from the deconvnet's too
    assert not torch.allclose(maps["guided backprop"], maps["deconvnet"])
    # no in-place ReLU is left for Captum's hooks to break
    assert not any(isinstance(m, torch.nn.ReLU) and m.inplace for m in model.net.modules())


def test_a_run_folder_gets_both_figures(trained, capsys):
    args = ["visualize", str(trained), "--layer", "stage2", "--units", "2", "--images", "3"]
    assert main([*args, "--wandb", "disabled"]) == 0
    out = capsys.readouterr().out
    assert "Test images 0, 1, 2." in out and "Layer stage2: the 2 units" in out
    for name in ("maps.png", "maps.pdf", "layer-stage2.png", "layer-stage2.pdf"):
        assert (trained / "visualize" / name).stat().st_size > 1000


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--layer", "stage9"], "--layer 'stage9' is not a layer of the network"),
        (["--layer", "layers.head.4"], "not feature maps"),
        (["--trial", "3"], "--trial and filters choose among a study's trials, not a run"),
        (["--images", "0"], "--images and --units must be at least 1"),
    ],
)
def test_bad_input_on_a_run_exits_2_and_writes_nothing(trained, capsys, extra, message):
    before = tree(trained)
    assert main(["visualize", str(trained), *extra, "--wandb", "disabled"]) == 2
    assert message in capsys.readouterr().err
    after = [p for p in tree(trained) if not p.startswith("visualize/")]
    assert after == [p for p in before if not p.startswith("visualize/")]


def test_a_run_without_its_checkpoint(tmp_path, trained, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r/settings.yaml").write_text((trained / "settings.yaml").read_text())
    assert main(["visualize", str(tmp_path / "r"), "--wandb", "disabled"]) == 2
    assert "no checkpoint at checkpoints/last.ckpt" in capsys.readouterr().err
    assert tree(tmp_path / "r") == ["settings.yaml"]


def test_a_study_shows_its_models_side_by_side(tmp_path, in_tmp, capsys):
    params = {**FAST, "data.subset": {"value": 512}}
    run_worker(write_sweep(tmp_path / "s.yaml", parameters=params))  # base and all-cnn
    assert main(["visualize", "t", "--images", "2", "--wandb", "disabled"]) == 0
    out = capsys.readouterr().out
    assert "Model C (seed 0, trial" in out and "All-CNN-C (seed 0, trial" in out
    assert (in_tmp / "runs/t/visualize/maps.png").is_file()
    assert main(["visualize", "t", "model.variant=all-cnn", "--wandb", "disabled"]) == 0
    out = capsys.readouterr().out
    assert "All-CNN-C (seed 0" in out and "Model C" not in out
    before = tree(in_tmp)
    assert main(["visualize", "t", "--trial", "99", "--wandb", "disabled"]) == 2
    assert "trial 99 of 't' did not finish; finished: 0, 1" in capsys.readouterr().err
    assert tree(in_tmp) == before


def test_bad_study_input_exits_2(tmp_path, in_tmp, capsys):
    file = write_sweep(tmp_path / "s.yaml", parameters={**FAST, "data.subset": {"value": 100_000}})
    run_worker(file)  # every trial fails
    before = tree(in_tmp)
    assert main(["visualize", "t", "--wandb", "disabled"]) == 2
    assert "study 't' has no finished trials to visualise" in capsys.readouterr().err
    assert main(["visualize", "nope", "--wandb", "disabled"]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
    assert main(["visualize", "t", "model.variant=base", "--trial", "9"]) == 2
    assert "has no finished trials" in capsys.readouterr().err
    assert tree(in_tmp) == before


def test_the_figures_are_logged_as_wandb_images(trained, tmp_path):
    """With W&B on (offline here), a `visualize` run holds each figure as an image. In a
    process of its own, as the command runs: W&B keeps per-process state that broke a later
    test's offline run when this ran in the test process."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env = {**clean, "PYTHONPATH": str(root), "WANDB_DIR": str(tmp_path / "wb")}
    done = subprocess.run(
        [sys.executable, "-m", "ablations.cli", "visualize", str(trained), "--images", "1"]
        + ["--wandb", "offline"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = (tmp_path / "wb").glob("**/offline-run-*")
    wandb = Path(sys.executable).parent / "wandb"
    out = subprocess.run(
        [str(wandb), "leet", "inspect", "--summary", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean,
    )
    doc = json.loads(out.stdout)
    assert doc["summary"]["maps"]["_type"] == "image-file"
