"""How often a study's training loss rose by more than 10% from one epoch to the next.

    .venv/bin/python docs/results/loss_rises.py docs/results/STUDY [...]

Reads each trial's record (`trials/*/result.yaml`: its settings and per-epoch history) and
prints, per data set, rate, normalisation and precision: the runs, the epoch-to-epoch steps,
how many of those steps the training loss rose by more than 10%, how many runs had such a
rise, the runs that diverged (a non-finite loss, no test error) and the runs that ended
above 5% test error, diverged ones included.
"""

import sys
from collections import defaultdict
from pathlib import Path

import yaml

RISE = 1.10


def main(folders: list[Path]) -> None:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for folder in folders:
        for record in sorted(folder.glob("trials/*/result.yaml")):
            result = yaml.safe_load(record.read_text())
            s = yaml.safe_load((record.parent / "settings.yaml").read_text())
            key = (s["data.dataset"], s["train.lr"], s["model.norm"], result["precision"])
            groups[key].append(result)
    print("dataset        lr     norm   precision  runs steps rises>10% with-rise diverged test>5%")
    for (dataset, lr, norm, precision), results in sorted(groups.items()):
        steps = rises = rising = diverged = above = 0
        for r in results:
            diverged += r["state"] == "diverged"
            losses = [h["train/loss"] for h in r["history"] if "train/loss" in h]
            up = sum(b > RISE * a for a, b in zip(losses, losses[1:]))
            steps, rises, rising = steps + len(losses) - 1, rises + up, rising + (up > 0)
            above += not (r["test/error"] is not None and r["test/error"] < 5)
        print(
            f"{dataset:<14} {lr:<6} {norm:<6} {precision:<10} {len(results):>4} {steps:>5}"
            f" {rises:>9} {rising:>9} {diverged:>8} {above:>7}"
        )


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]])
