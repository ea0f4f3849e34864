"""`ablate visualize`: what a trained network looks at, by the paper's Section 4 methods.

For a run folder (from `ablate train`) or a study's finished trials: the network from its
checkpoint, fed exactly as it was trained (the preprocessing statistics stored in the
checkpoint, or, for older checkpoints, fitted again from the same images and seed), then

- maps: for N test images, the input and, for the predicted class, the plain gradient
  (`captum.attr.Saliency`), the deconvnet (`Deconvolution`) and guided backpropagation
  (`GuidedBackprop`), one row per image; with several models, their maps side by side;
- layer: for a layer (`--layer stage1|stage2|head` or a module path such as
  `layers.stage2.1`), its most active units over the test images, the image that drives each
  one hardest, and the guided-backpropagation reconstruction of that unit's activation.

Captum overrides the ReLUs' gradients with hooks, which in-place ReLUs break (its docs say
so): the network is copied with every ReLU made out-of-place before any attribution.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ablations.record import Outcome, TrialRecord
from ablations.settings import coerce
from ablations.study import find
from ablations.sweep_file import SweepError
from ablations.visualize_spec import VisualizeError


def study_runs(
    name: str, runs_dir: Path, trial: int | None, filters: dict[str, Any]
) -> tuple[list[tuple[Path, str]], Path]:
    """(run folder, label) of each chosen finished trial, one per model; and the output dir."""
    try:
        study, _ = find(name, None, runs_dir)
    except SweepError as err:
        raise VisualizeError(str(err)) from None
    records = {t.number: TrialRecord.of(t) for t in study.get_trials(deepcopy=False)}
    done = {n: r for n, r in records.items() if r.outcome == Outcome.COMPLETE}
    if not done:
        raise VisualizeError(f"study {name!r} has no finished trials to visualise")
    if trial is not None:
        chosen = {n: r for n, r in done.items() if n == trial}
        if not chosen:
            numbers = ", ".join(str(n) for n in done)
            raise VisualizeError(f"trial {trial} of {name!r} did not finish; finished: {numbers}")
    else:
        chosen = {
            n: r
            for n, r in done.items()
            if all(str(r.settings.get(k)) == str(v) for k, v in filters.items())
        }
        if not chosen:
            raise VisualizeError(f"no finished trial of {name!r} matches {filters}")
        by_model: dict[str, int] = {}
        for n in sorted(chosen):
            by_model.setdefault(chosen[n].model_name, n)
        chosen = {n: chosen[n] for n in by_model.values()}
    out = []
    for n, r in chosen.items():
        label = f"{r.model_name} (seed {r.settings['seed']}, trial {n})"
        out.append((Path(r.provenance.run_dir), label))
    return out, runs_dir / name / "visualize"


# --- the command ------------------------------------------------------------------------------


def _filters(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise VisualizeError(f"{item!r} is not a key=value filter (e.g. model.variant=all-cnn)")
        out[key] = coerce(key, value)
    return out


def cmd_visualize(args: argparse.Namespace) -> int:
    target = Path(args.target)
    if args.images < 1 or args.units < 1:
        raise VisualizeError("--images and --units must be at least 1")
    filters = _filters(args.filter)
    if (target / "settings.yaml").is_file():
        if args.trial is not None or filters:
            raise VisualizeError("--trial and filters choose among a study's trials, not a run")
        runs, out_dir = [(target, None)], target / "visualize"
        group = None
    else:
        runs, out_dir = study_runs(args.target, Path(args.runs_dir), args.trial, filters)
        group = args.target
    from ablations import saliency  # torch and Captum, only when there is work to do

    models = [saliency.load_run(path, label) for path, label in runs]
    n = len(models[0].images)
    indices = list(range(min(args.images, n)))
    if args.layer is not None:  # checked before anything is written
        for m in models:
            saliency.find_layer(m.net, args.layer)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    caption = saliency.maps_figure(models, indices, [out_dir / "maps.png", out_dir / "maps.pdf"])
    written += [out_dir / "maps.png", out_dir / "maps.pdf"]
    print(caption)
    if args.layer is not None:
        stem = f"layer-{args.layer.replace('.', '_')}"
        paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
        print(saliency.layer_figure(models, args.layer, args.units, min(args.pool, n), paths))
        written += paths
    for p in written:
        print(f"wrote {p}")
    _log_wandb(args.wandb, group, out_dir, [p for p in written if p.suffix == ".png"])
    return 0


def _log_wandb(mode: str | None, group: str | None, out_dir: Path, images: list[Path]) -> None:
    from ablations import wandb_log

    wandb_log.log_table(
        mode or wandb_log.default_mode(),
        study=group or out_dir.parent.name,
        project=None,
        entity=None,
        save_dir=out_dir,
        tables={},
        images={p.stem: p for p in images},
        job_type="visualize",
    )


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "visualize",
        help="guided backprop, deconvnet and gradient maps of trained models (paper Sec. 4)",
        description="TARGET is a run folder (ablate train) or a study name: its finished "
        "trials, one per model, side by side. Writes PNG and PDF under TARGET's visualize/.",
    )
    p.add_argument("target", metavar="TARGET")
    p.add_argument("filter", nargs="*", metavar="key=value", help="choose a study's trials")
    p.add_argument("--trial", type=int, default=None, help="one trial of the study")
    p.add_argument("--images", type=int, default=4, help="test images, one row each")
    p.add_argument("--layer", default=None, help="stage1, stage2, head or a module path")
    p.add_argument("--units", type=int, default=4, help="top units of --layer")
    p.add_argument("--pool", type=int, default=1000, help="test images searched for --layer")
    p.add_argument("--wandb", choices=("online", "offline", "disabled"), default=None)
    p.add_argument("--runs-dir", default="runs", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_visualize)
