"""`ablate report`: the whole study as one self-contained HTML file that opens in any browser
with no server and no network, read from the study as the export reads it (never W&B).

`build` makes the page from what `ablate export` builds (`export.build`: the same summary,
effects and selection) plus what only the study holds: each trial's per-epoch curves
(`record.CURVES_ATTR`, or for older studies the run folder's `epochs.json` or Optuna's
intermediate values), its host, and the launches `provenance` recorded. `charts` makes the
figures' plotly specs; `page` the HTML, with plotly.js (`VENDOR.md`) and the page's own
script inline. `write` swaps the file in whole. Imports neither torch nor Lightning.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml

from ablations import provenance
from ablations.export import Tables
from ablations.export import build as build_tables
from ablations.export.frame import ExportError
from ablations.export.summary import cell_keys
from ablations.export.tables import (
    beside_name,
    caption,
    display_table,
    effects_caption,
    effects_table,
    label,
    with_units,
)
from ablations.files import atomic_write
from ablations.record import DONE, Outcome, TrialRecord
from ablations.report import charts, page
from ablations.study import DEFINITION_ATTR

__all__ = ["FINISHED", "build", "histories", "write"]

# a trial that ended and says something: a result, or a failure with its message
FINISHED = (*DONE, Outcome.FAILED)
CURVE_SOURCES = {
    "study": "stored with each trial in the study",
    "run folder": "read from each trial's run folder (epochs.json)",
    "intermediate": "Optuna's intermediate values (the validation metric only)",
}


def histories(
    study: optuna.Study, runs_dir: Path | None = None
) -> dict[int, tuple[list[dict[str, Any]], str]]:
    """Each trial's per-epoch rows and where they came from: the study's `curves`, else the
    run folder's `epochs.json` (where it is, or under `runs_dir/trials/`), else Optuna's
    intermediate values."""
    out: dict[int, tuple[list[dict[str, Any]], str]] = {}
    metric = study.metric_names[0] if study.metric_names else "val/error"
    for t in study.get_trials(deepcopy=False):
        rows = TrialRecord.of(t).history
        if rows:
            out[t.number] = (rows, "study")
            continue
        rows = _epochs_json(t.user_attrs.get("run_dir"), runs_dir)
        if rows and _same_trial(rows, t):
            out[t.number] = (rows, "run folder")
        elif t.intermediate_values:
            key = metric if metric in ("val/error", "val/loss", "train/loss") else "val/error"
            steps = sorted(t.intermediate_values.items())
            out[t.number] = ([{"epoch": s, key: v} for s, v in steps], "intermediate")
    return out


def _same_trial(rows: list[dict[str, Any]], t: optuna.trial.FrozenTrial) -> bool:
    """Whether a run folder's history is this trial's: a relative `run_dir` may name another
    run's folder on the machine reading the study (its epochs and last validation error)."""
    attrs = t.user_attrs
    if attrs.get("epochs_run") is not None and len(rows) != attrs["epochs_run"]:
        return False
    last, recorded = rows[-1].get("val/error"), attrs.get("val/error")
    return last is None or recorded is None or abs(float(last) - float(recorded)) < 1e-4


def _epochs_json(run_dir: str | None, runs_dir: Path | None) -> list[dict[str, Any]]:
    if not run_dir:
        return []
    places = [Path(run_dir) / "epochs.json"]
    if runs_dir is not None:
        places.append(runs_dir / "trials" / Path(run_dir).name / "epochs.json")
    for path in places:
        try:
            return list(json.loads(path.read_text()).get("history") or [])
        except (OSError, ValueError, AttributeError):
            continue
    return []


def build(
    study: optuna.Study,
    *,
    runs_dir: Path | None = None,
    tables: Tables | None = None,
    metrics: list[str] | None = None,
    select_by: str | None = None,
    over: list[str] | None = None,
    command: list[str] | None = None,
) -> str:
    """The report's HTML. `tables`: what `export.build` made already; `runs_dir`: the study's
    folder, where older studies' run folders are looked for; `command`: the line that made it."""
    t = tables or build_tables(study, metrics=metrics, select_by=select_by, over=over)
    frozen = {tr.number: tr for tr in study.get_trials(deepcopy=False)}
    finished = [n for n in t.trials["trial"] if TrialRecord.of(frozen[n]).outcome in FINISHED]
    if not finished:
        counts = t.trials["state"].value_counts()
        have = ", ".join(f"{n} {s}" for s, n in counts.items())
        raise ExportError(
            f"study {study.study_name} has no finished trials yet ({have}): nothing to report"
        )
    curves = histories(study, runs_dir)
    metric = "test/error" if "test/error" in t.metrics else t.metrics[-1]
    sections = [
        ("summary", "Summary", _summary(t, metric)),
        ("effects", "Paired effects", _effects(t)),
        ("cost", "Error against cost", _cost(t, metric)),
    ]
    if t.selection is not None:
        sections.append(("selection", "Selection", _selection(t)))
    sections += [
        ("curves", "Learning curves", _curves(t, curves)),
        ("factors", "Swept factors", _factors(t)),
        ("trials", "Trials", _trials(t, frozen)),
        ("provenance", "Provenance", _provenance(study, t, frozen, command)),
    ]
    return page.document(f"{study.study_name}: ablation report", _header(study, t), sections)


def write(out: Path, text: str) -> Path:
    """The page at `out`, swapped in whole (a reader never sees half a file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, text)
    return out


def _header(study: optuna.Study, t: Tables) -> str:
    states = t.trials["state"].value_counts()
    counts = ", ".join(f"{n} {s}" for s, n in states.items())
    fit = pd.to_numeric(t.trials["fit_seconds"], errors="coerce").sum()
    starts = t.trials["datetime_start"].dropna()
    ends = t.trials["datetime_complete"].dropna()
    when = f"{_when(starts.min())} to {_when(ends.max())}" if len(starts) and len(ends) else "–"
    desc = study.user_attrs.get("sweep.description") or ""
    return (
        f"<h1>{page.esc(study.study_name)}</h1>"
        + (f"<p>{page.esc(desc)}</p>" if desc else "")
        + f"<p>{page.esc(t.sweep.method)} sweep on {page.esc(t.sweep.metric)} "
        f"({page.esc(t.sweep.goal)}); {len(t.trials)} trials: {page.esc(counts)}; "
        f"{fit / 3600:.2f} h of training; {page.esc(when)} (UTC).</p>"
    )


def _when(iso: str | None) -> str:
    if not iso:
        return "–"
    return str(iso).replace("T", " ")[:19]


def _png(draw, *args) -> str:
    """A matplotlib figure of the export's as an inline image (what readers without scripts
    see in a figure's place)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "figure.png"
        draw(*args, [path])
        data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="figure" style="max-width:100%" src="data:image/png;base64,{data}">'


def _summary(t: Tables, metric: str) -> str:
    from ablations.export.figures import figure

    shown, best = display_table(t.summary, t.metrics, t.sweep.swept)
    paper = "paper test/error" in t.summary
    text = caption(t.study, t.trials, t.sweep, t.select_by, t.over, paper)
    keys = [k for k in cell_keys(t.sweep, []) if k in t.summary]
    if "precision" in t.summary:
        keys.append("precision")
    spec = charts.summary_points(t.summary, t.trials, keys, metric)
    fallback = _png(figure, t.summary, t.trials, t.sweep, metric, t.over)
    return (
        f'<p class="note">{page.esc(text)}</p>'
        + page.table(shown, best=best)
        + "".join(page.paragraph(n) for n in t.notes)
        + f"<h3>{page.esc(label(metric))}: each seed, the mean and its 95% interval</h3>"
        + page.plot("fig-summary", spec, 380, fallback)
    )


def _effects(t: Tables) -> str:
    from ablations.export.figures import forest

    if t.effects.empty:
        return page.paragraph(
            "No paired effects: no swept factor has two levels run on the same other settings "
            "and seeds."
        )
    height = 90 + 34 * len(t.effects)
    return (
        f'<p class="note">{page.esc(effects_caption(t.study))}</p>'
        + page.table(effects_table(t.effects))
        + page.plot("fig-effects", charts.forest(t.effects), height, _png(forest, t.effects))
    )


def _cost(t: Tables, metric: str) -> str:
    from ablations.export import pareto_caption, row_label
    from ablations.export.pareto import table as pareto_table

    name = row_label(t)
    parts = [
        f'<p class="note">{page.esc(pareto_caption(t, metric))}</p>',
        page.table(pareto_table(t.summary, metric, name)),
    ]
    spec = charts.pareto(t.summary, metric, name)
    if spec is not None:
        parts.append(page.plot("fig-pareto", spec, 420))
    if t.sweep.multi:
        objectives = ", ".join(f"{n} ({g})" for n, g in t.sweep.objectives)
        on = t.trials[t.trials["pareto"]]  # export.build adds it to multi-objective studies
        parts.append(
            page.paragraph(
                f"This sweep optimised several objectives: {objectives}. Its own front, "
                f"trial by trial ({len(on)} trials; the Pareto column of the trials table): "
                + (", ".join(str(n) for n in on["trial"]) or "none yet")
                + "."
            )
        )
    return "".join(parts)


def _selection(t: Tables) -> str:
    sel = t.selection.rename(columns=with_units)
    return page.paragraph(
        f"Per model, the {', '.join(label(k) for k in t.over)} with the lowest mean "
        f"{t.select_by} among settings whose seeds all completed; every candidate below "
        "(selection.csv)."
    ) + page.table(sel)


def _curves(t: Tables, curves: dict[int, tuple[list[dict[str, Any]], str]]) -> str:
    rows = t.trials
    have = [n for n in rows["trial"] if n in curves]
    if not have:
        return page.paragraph(
            "No per-epoch values are stored for these trials: the study was run before each "
            "trial kept its curves in the study, and no run folder with an epochs.json was "
            "found. Re-running a trial records them."
        )
    sources = pd.Series([curves[n][1] for n in have]).value_counts()
    said = "; ".join(f"{n} trials: {CURVE_SOURCES[s]}" for s, n in sources.items())
    missing = len(rows) - len(have)
    parts = [
        page.paragraph(
            "Per cell: each seed a thin line (dotted if it did not complete), the completed "
            "seeds' mean as a thick line and its ± one standard deviation band. Epochs count "
            f"from 1. Where the curves come from: {said}"
            + (f"; {missing} trials have none." if missing else ".")
        )
    ]
    keys = [k for k in cell_keys(t.sweep, []) if k in rows]
    label_keys = beside_name(keys)
    hist = {n: curves[n][0] for n in have}
    for i, model in enumerate(pd.unique(rows["model.name"])):
        part = rows[rows["model.name"] == model]
        cells = []
        groups = part.groupby(label_keys, sort=False, dropna=False) if label_keys else [((), part)]
        for values, g in groups:
            values = values if isinstance(values, tuple) else (values,)
            name = ", ".join(f"{label(k)}={v}" for k, v in zip(label_keys, values)) or model
            cells.append((name, g))
        if not any(int(n) in hist for n in part["trial"]):
            parts.append(f"<h3>{page.esc(model)}</h3>" + page.paragraph("No curves recorded."))
            continue
        spec = charts.learning_curves(cells, hist)
        parts.append(f"<h3>{page.esc(model)}</h3>" + page.plot(f"fig-curves-{i}", spec, 360))
    return "".join(parts)


def _factors(t: Tables) -> str:
    spec = charts.factor_slices(t.trials, t.sweep, t.sweep.metric)
    parts = []
    if spec is None:
        parts.append(page.paragraph("No factor is swept besides the seed, or no trial completed."))
    else:
        n = sum(1 for k in t.sweep.swept if k != "seed")
        parts.append(
            page.paragraph(
                f"Each swept factor against {t.sweep.metric}, the metric the sweep ran on: every "
                "completed trial a point coloured by model, a level's mean as a bar."
            )
            + page.plot("fig-factors", spec, 380 if n < 4 else 420)
        )
    if t.sweep.method in ("random", "bayes"):
        hist = charts.optimisation_history(t.trials, t.sweep)
        if hist is not None:
            parts.append(
                f"<h3>Optimisation history ({page.esc(t.sweep.method)})</h3>"
                + page.plot("fig-history", hist, 340)
            )
    return "".join(parts)


TRIAL_COLUMNS = (
    ("val/error", "Val. error (%)", ".2f"),
    ("test/error", "Test error (%)", ".2f"),
    ("test/error_dropout", "Test error, dropout on (%)", ".2f"),
    ("best_epoch", "Best epoch", None),
    ("epochs_run", "Epochs", None),
    ("params", "Params", None),
    ("fit_seconds", "Fit (s)", ".1f"),
    ("images_per_second", "Images/s", ".1f"),
    ("segments", "Segments", None),
    ("precision", "Ran in", None),
    ("device", "Device", None),
)


def _trials(t: Tables, frozen: dict[int, optuna.trial.FrozenTrial]) -> str:
    rows = t.trials
    swept = [k for k in t.sweep.swept if k != "seed" and k in rows]
    out = pd.DataFrame(
        {"Trial": rows["trial"], "State": rows["state"], "Model": rows["model.name"]}
    )
    for k in swept:
        out[label(k)] = rows[k].map(lambda v: "–" if v is None or pd.isna(v) else str(v))
    out["Seed"] = rows["seed"]
    numbers = {}
    for key, title, fmt in TRIAL_COLUMNS:
        if key in rows and rows[key].notna().any():
            out[title] = rows[key]
            if fmt:
                out[title] = pd.to_numeric(out[title], errors="coerce")
                numbers[title] = fmt
    out["Host"] = [frozen[n].user_attrs.get("worker.host") for n in rows["trial"]]
    out["Ranks"] = [frozen[n].user_attrs.get("world_size") for n in rows["trial"]]
    out["W&B run"] = rows["wandb_run_id"]
    out["Started"] = rows["datetime_start"].map(_when)
    out["Completed"] = rows["datetime_complete"].map(_when)
    out["Message"] = rows["error_message"]
    out = out[[c for c in out.columns if out[c].notna().any() or c == "Message"]]
    states = [str(s) for s in rows["state"]]
    options = "".join(
        f'<option value="{page.esc(s)}">{page.esc(s)} ({states.count(s)})</option>'
        for s in dict.fromkeys(states)
    )
    controls = (
        '<div class="controls"><input id="trials-filter" type="search" '
        'placeholder="filter: every word must appear (e.g. failed All-CNN)" '
        'aria-label="filter the trials">'
        f'<select id="trials-state" aria-label="state"><option value="">every state</option>'
        f'{options}</select><span id="trials-count" class="note"></span></div>'
    )
    return (
        page.paragraph(
            "Every trial, failed, diverged and interrupted ones with their messages; click a "
            "header to sort."
        )
        + controls
        + page.table(out, sortable=True, table_id="trials-table", row_state=states, numbers=numbers)
    )


def _provenance(
    study: optuna.Study,
    t: Tables,
    frozen: dict[int, optuna.trial.FrozenTrial],
    command: list[str] | None,
) -> str:
    launches = provenance.launches(study)
    rows = t.trials
    fit = pd.to_numeric(rows["fit_seconds"], errors="coerce")
    ranks = pd.to_numeric(
        pd.Series([frozen[n].user_attrs.get("world_size") or 1 for n in rows["trial"]]),
        errors="coerce",
    ).to_numpy()
    starts, ends = rows["datetime_start"].dropna(), rows["datetime_complete"].dropna()
    made = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    facts = [
        ("Study", study.study_name),
        ("First trial started", _when(starts.min()) if len(starts) else "–"),
        ("Last trial ended", _when(ends.max()) if len(ends) else "–"),
        ("Training time", f"{fit.sum() / 3600:.2f} h over {int(fit.notna().sum())} trials"),
        ("Device time", f"{(fit.fillna(0).to_numpy() * ranks).sum() / 3600:.2f} device-hours"),
        ("Report made", f"{_when(made)} UTC by allconv-ablations at {provenance.git_commit()}"),
    ]
    if command:
        facts.append(("Report command", " ".join(command)))
    body = "<dl class=\"facts\">" + "".join(
        f"<dt>{page.esc(k)}</dt><dd>{page.esc(v)}</dd>" for k, v in facts
    ) + "</dl>"  # fmt: skip
    if launches:
        table = pd.DataFrame(
            {
                "Started": [_when(x.get("started")) for x in launches],
                "Ended": [_when(x.get("ended")) for x in launches],
                "Exit": [x.get("exit_code") for x in launches],
                "Host": [x.get("host") for x in launches],
                "Command": [" ".join(x.get("argv") or []) for x in launches],
                "Commit": [x.get("git_commit") for x in launches],
                **{
                    name: [(x.get("versions") or {}).get(name) for x in launches]
                    for name in ("python", *provenance.PACKAGES)
                },
            }
        )
        body += "<h3>Runs of <code>ablate sweep</code></h3>" + page.table(table)
        text, whence = launches[-1].get("sweep_file") or "", "as the last run read it"
    else:
        body += page.paragraph(
            "No run of `ablate sweep` is recorded in this study (runs are recorded with the "
            "study from this version of the tool on): its command lines and package versions "
            "are unknown. The trials' own records below give their commits, hosts and devices."
        )
        definition = study.user_attrs.get(DEFINITION_ATTR) or {}
        raw = {"name": study.user_attrs.get("sweep.name", study.study_name)}
        raw |= {k: v for k, v in definition.items() if v is not None}
        text, whence = yaml.safe_dump(raw, sort_keys=False), "as stored with the study"
    body += f"<h3>The sweep file ({page.esc(whence)})</h3><pre>{page.esc(text)}</pre>"
    hosts = [frozen[n].user_attrs.get("worker.host") for n in rows["trial"]]
    machines = (
        pd.DataFrame(
            {
                "Host": hosts,
                "Device": rows["device"],
                "Ran in": rows["precision"],
                "Ranks": ranks,
                "fit": fit,
            }
        )
        .fillna({"Host": "–", "Device": "–", "Ran in": "–"})
        .groupby(["Host", "Device", "Ran in", "Ranks"], dropna=False)
        .agg(Trials=("fit", "size"), hours=("fit", "sum"))
        .reset_index()
        .rename(columns={"hours": "Training (h)"})
    )
    machines["Training (h)"] = machines["Training (h)"] / 3600
    body += "<h3>Machines and devices</h3>" + page.table(machines, numbers={"Training (h)": ".2f"})
    commits = rows["git_commit"].fillna("unknown").value_counts()
    body += "<h3>Code the trials ran</h3>" + page.table(
        pd.DataFrame(
            {
                "Commit": list(commits.index),
                "Trials": list(commits.values),
                "Uncommitted changes": [str(c).endswith("-dirty") for c in commits.index],
            }
        )
    )
    files = _unique(frozen[n].user_attrs.get("data.files") for n in rows["trial"])
    if files:
        body += "<h3>Data files</h3><pre>" + page.esc("\n".join(files)) + "</pre>"
    return body


def _unique(lists: Iterable[list[str] | None]) -> list[str]:
    seen: dict[str, None] = {}
    for files in lists:
        for f in files or []:
            seen[f] = None
    return list(seen)
