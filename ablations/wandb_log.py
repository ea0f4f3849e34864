"""W&B: one run per trial, grouped by study, and never the reason a trial fails."""

from __future__ import annotations

import contextlib
import logging
import netrc
import os
import secrets
import string
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ablations.wandb_logger import SafeWandbLogger


log = logging.getLogger("ablations.wandb")
MODES = ("online", "offline", "disabled")


def default_mode() -> str:
    """Online when W&B credentials are present, offline otherwise."""
    if os.environ.get("WANDB_MODE") in MODES:
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


DEFAULT_PROJECT = "allconv-ablations"
PRECEDENCE = (
    "W&B settings, first found wins: mode: --wandb, WANDB_MODE, online with W&B credentials "
    "else offline; project and entity: the sweep file's project/entity, WANDB_PROJECT/"
    f"WANDB_ENTITY, default project {DEFAULT_PROJECT}; run files: WANDB_DIR, else each trial's "
    "folder (runs/<study>/trials/*/wandb)"
)


def target(project: str | None, entity: str | None, save_dir: Path) -> dict[str, Any]:
    """Project, entity and directory of a run, with PRECEDENCE's order (W&B's own init
    arguments beat its environment, so the environment is read here)."""
    return {
        "project": project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
        "entity": entity or os.environ.get("WANDB_ENTITY") or None,
        "save_dir": Path(os.environ["WANDB_DIR"]) if os.environ.get("WANDB_DIR") else save_dir,
    }


def run_name(flat: dict[str, Any], trial: int) -> str:
    return f"{flat['model.name']}-s{flat['seed']}-t{trial}"


def trial_logger(
    mode: str,
    *,
    study: str,
    trial: int,
    flat: dict[str, Any],
    tagged: list[str],
    save_dir: Path,
    project: str | None,
    entity: str | None,
    run_id: str | None = None,
) -> SafeWandbLogger | None:
    """Start the trial's W&B run, or continue it (`run_id`, kept by the trial a resumed one
    continues); None (with a warning) when W&B is off or cannot start."""
    if mode == "disabled":
        return None
    config = {**{k: v for k, v in flat.items() if v is not None}, "study": study, "trial": trial}
    where = target(project, entity, save_dir)
    tags = [f"{k}={flat[k]}"[:64] for k in tagged if k in flat]
    try:
        from ablations.wandb_logger import SafeWandbLogger  # Lightning, on first use

        logger = SafeWandbLogger(
            project=where["project"],
            entity=where["entity"],
            group=study,
            job_type=flat["model.name"],
            name=run_name(flat, trial),
            tags=tags,
            config=config,
            save_dir=str(where["save_dir"]),
            mode=mode,
            log_model=False,
            reinit="create_new",
            id=run_id,
            resume="allow",
        )
        logger.experiment  # noqa: B018  (starts the run now, inside this try)
    except Exception as err:
        log.warning(
            "W&B run for trial %s could not start, the trial goes on without it: %s", trial, err
        )
        return None
    return logger


def new_run_id() -> str:
    """A run id as W&B makes them (8 lowercase letters and digits), chosen before the run
    starts so that the trial keeps it for every segment."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def finish(logger: SafeWandbLogger | None, summary: dict[str, Any]) -> str | None:
    """Write the final metrics to the run's summary and finish it; returns the run id."""
    if logger is None:
        return None
    run_id = None
    try:
        run = logger.experiment
        run_id = run.id
        run.summary.update({k: v for k, v in summary.items() if v is not None})
        run.finish()
    except Exception as err:
        log.warning("W&B finish failed (the trial's result is kept): %s", err)
    return run_id


def log_table(
    mode: str,
    *,
    study: str,
    project: str | None,
    entity: str | None,
    save_dir: Path,
    tables: dict[str, Any],
    images: dict[str, Path] | None = None,
    job_type: str = "ablation-table",
    html: dict[str, Path] | None = None,
) -> str | None:
    """One run of tables and figures in the study's group: the sweep's closing
    `ablation-table` run (DataFrames as wandb.Tables), or `ablate visualize`'s figures.
    `html`: pages shown in the run (wandb.Html) and kept as its `report` artifacts."""
    if mode == "disabled":
        return None
    try:
        import wandb

        where = target(project, entity, save_dir)
        with masked_argv():
            run = wandb.init(
                project=where["project"],
                entity=where["entity"],
                group=study,
                job_type=job_type,
                name=f"{study}-{job_type}",
                dir=str(where["save_dir"]),
                mode=mode,
                reinit="create_new",
                config={"study": study},
            )
        payload: dict[str, Any] = {k: wandb.Table(dataframe=df) for k, df in tables.items()}
        for key, path in (images or {}).items():
            payload[key] = wandb.Image(str(path))
        for key, path in (html or {}).items():
            payload[key] = wandb.Html(str(path), inject=False)
            artifact = wandb.Artifact(f"{study}-{key}", type="report")
            artifact.add_file(str(path))
            run.log_artifact(artifact)
        run.log(payload)
        run_id = run.id
        run.finish()
        # wait for W&B's service to write everything (its run file, the artifacts) before
        # returning: the launcher exits right after, and a reader may open the files then
        wandb.teardown()
        return run_id
    except Exception as err:
        log.warning("W&B %s run failed (the study is unaffected): %s", job_type, err)
        return None


@contextlib.contextmanager
def masked_argv() -> Iterator[None]:
    """W&B records the program's arguments in every run (uploaded when online); an
    `ablate sweep --storage postgresql://user:PASSWORD@...` must not put the password there."""
    from ablations.storage import describe_url

    argv = sys.argv
    sys.argv = [describe_url(a) for a in argv]
    try:
        yield
    finally:
        sys.argv = argv
