"""The paper's Table 3 protocol, written down once: which settings decide a result, and what
they must be for a run to stand beside the paper's number.

A row of an export gets the paper's test error (and the difference) only when every rule
below holds and its learning rate was chosen on validation over the paper's grid. Anything
else is another experiment, however close, and gets no paper column; `differences` says why
in one line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Springenberg et al. (2015), section 3.2: the rate is chosen per model from this grid.
PAPER_LR_GRID = (0.25, 0.1, 0.05, 0.01)


@dataclass(frozen=True)
class Rule:
    key: str
    value: Any
    why: str


PROTOCOL: tuple[Rule, ...] = (
    Rule("data.dataset", "cifar10", "Table 3 is CIFAR-10"),
    Rule("data.preprocess", "gcn-zca", "the paper applies GCN, then ZCA fitted on training data"),
    Rule("data.augment", "none", "Table 3 is without augmentation"),
    Rule("data.subset", None, "every training image"),
    Rule(
        "data.val_size",
        0,
        "the reported model trains on all 50,000 training images; the "
        "rate is chosen on a held-out split first (ablate export --final-sweep)",
    ),
    Rule("model.width", 1.0, "the paper's widths: 96, 192, 192 channels"),
    Rule("model.norm", "none", "the paper has no normalisation layers"),
    Rule("model.dropout", "paper", "20% on the input, 50% after each downsampling point"),
    Rule("model.head", "gap", "the all-convolutional head with global averaging"),
    Rule("model.score_relu", True, "Table 1's class-score layer is '1x1 conv, 10, ReLU'"),
    Rule("train.epochs", 350, "350 epochs"),
    Rule(
        "train.batch_size",
        128,
        "not stated in the paper; 128 is this project's reading, "
        "and another size changes the number of steps at every rate",
    ),
    Rule("train.momentum", 0.9, "SGD with momentum 0.9"),
    Rule("train.weight_decay", 0.001, "weight decay 0.001"),
    Rule("train.lr_gamma", 0.1, "the rate times 0.1 at epochs 200, 250 and 300"),
    Rule("train.warmup_epochs", 0.0, "no warm-up in the paper"),
)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def differences(
    settings: Mapping[str, Any], lr_candidates: Iterable[float] | None, selected_by: str | None
) -> list[str]:
    """What keeps a row from the paper's protocol, as `key=value` strings (empty: on it).

    `lr_candidates` are the rates the row's rate was chosen from and `selected_by` the metric
    it was chosen on (None when the rate was not selected)."""
    if settings.get("data.dataset") != "cifar10":  # nothing else matters then
        return [f"data.dataset={settings.get('data.dataset')} (Table 3 is CIFAR-10)"]
    out = [
        f"{r.key}={settings.get(r.key)}"
        for r in PROTOCOL
        if not _same(settings.get(r.key), r.value)
    ]
    grid = {float(v) for v in PAPER_LR_GRID}
    if selected_by is None or not selected_by.startswith("val/"):
        out.append("train.lr not chosen on validation over the paper's grid")
    elif not grid <= {float(v) for v in lr_candidates or ()}:
        out.append(
            "train.lr chosen over "
            + ",".join(str(v) for v in lr_candidates or ())
            + " (the paper's grid is "
            + ",".join(map(str, PAPER_LR_GRID))
            + ")"
        )
    return out
