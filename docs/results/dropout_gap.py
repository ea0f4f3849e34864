"""The dropout train/eval gap of one trained run, measured on its test images.

    .venv/bin/python docs/results/dropout_gap.py RUN_DIR

RUN_DIR is a trial or `ablate train` folder (settings.yaml, checkpoints/last.ckpt). Prints
the test error in eval mode, with dropout left on (one pass, and the mean of 8 passes' class
probabilities), how the eval-mode predictions spread over the classes, and each stage's
activation mean and std in both modes on the first 1000 test images.
"""

import sys
from pathlib import Path

import torch
import yaml

from ablations import run
from ablations import settings as S
from lightning_modules.module import AllConvModule


def main(run_dir: Path) -> None:
    torch.set_num_threads(1)
    flat = yaml.safe_load((run_dir / "settings.yaml").read_text())
    expanded = ("model.pooling", "model.strided_conv")  # model.variant says them
    settings = S.resolve({k: v for k, v in flat.items() if k in S.SCHEMA and k not in expanded})
    dm, _, _ = run.prepare(settings)
    x, y = dm.splits["test"]
    net = AllConvModule.load_from_checkpoint(
        run_dir / "checkpoints" / "last.ckpt", map_location="cpu"
    ).net.float()
    acts: dict[str, torch.Tensor] = {}
    for name, module in net.layers.named_children():
        module.register_forward_hook(lambda m, i, o, name=name: acts.__setitem__(name, o))

    def predict(train: bool, passes: int = 1) -> torch.Tensor:
        net.train(train)
        probs = 0
        with torch.no_grad():
            for _ in range(passes):
                probs = probs + torch.cat(
                    [net(x[i : i + 1000]).softmax(1) for i in range(0, len(x), 1000)]
                )
        return probs.argmax(1)

    for mode, train in (("eval", False), ("dropout on", True)):
        torch.manual_seed(0)
        net.train(train)
        with torch.no_grad():
            net(x[:1000])
        stats = ", ".join(f"{k} {v.mean():.2f}/{v.std():.2f}" for k, v in acts.items())
        print(f"activations (mean/std), {mode}: {stats}")
    torch.manual_seed(0)
    for label, train, passes in (
        ("eval mode", False, 1),
        ("dropout on, 1 pass", True, 1),
        ("dropout on, mean of 8 passes", True, 8),
    ):
        pred = predict(train, passes)
        error = 100 * (pred != y).float().mean().item()
        counts = torch.bincount(pred, minlength=dm.num_classes).tolist()
        print(f"test error, {label}: {error:.2f}%  predictions per class: {counts}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
