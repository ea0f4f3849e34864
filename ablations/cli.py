"""`ablate`: models, train, sweep, status, export, report, visualize. Exit 2 on bad input."""

from __future__ import annotations

import argparse
import json
import math
import sys

from ablations.process import Exit
from datamodules import DataError
from lightning_modules.family import SpecError

EXIT_BAD_INPUT = Exit.BAD_INPUT


class UsageError(ValueError):
    """Bad command-line input that is not a setting."""


def _user_errors() -> tuple[type[Exception], ...]:
    from ablations.export import ExportError
    from ablations.settings import SettingsError
    from ablations.sweep_file import SweepError
    from ablations.visualize_spec import VisualizeError

    return (
        UsageError,
        SettingsError,
        SpecError,
        DataError,
        SweepError,
        ExportError,
        VisualizeError,
    )


def _json_default(value: object) -> object:
    return None if isinstance(value, float) and math.isnan(value) else str(value)


def _clean(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --- models --------------------------------------------------------------------------------


def parse_input(text: str) -> tuple[int, int, int]:
    try:
        h, w, c = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise UsageError(
            f"--input {text!r} must look like 32x32x3 (height x width x channels)"
        ) from None
    if h != w or min(h, c) < 1:
        raise UsageError(f"--input {text!r}: only square images with at least one channel")
    return h, w, c


def cmd_models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from lightning_modules.family import all_specs, paper_presets
    from lightning_modules.net import describe

    size, _, channels = parse_input(args.input)
    if args.all:
        specs, invalid = all_specs(channels, size, args.classes)
    else:
        specs, invalid = list(paper_presets(channels, size, args.classes).values()), []
    rows = [describe(s) for s in specs]
    if args.format == "json":
        print(json.dumps(rows, indent=1))
    elif args.format == "csv":
        import pandas as pd

        print(pd.DataFrame(rows).to_csv(index=False), end="")
    else:
        table = Table(title=f"All-CNN family at {args.input}, {args.classes} classes")
        for col in (
            "model.name",
            "model.base",
            "model.pooling",
            "model.strided_conv",
            "model.head",
            "params",
            "MMACs",
            "feature maps",
        ):
            table.add_column(col, justify="right" if col in ("params", "MMACs") else "left")
        for r in rows:
            table.add_row(
                r["model.name"],
                r["model.base"],
                r["model.pooling"],
                r["model.strided_conv"],
                r["model.head"],
                f"{r['params']:,}",
                f"{r['macs'] / 1e6:,.1f}",
                r["feature_maps"],
            )
        console = Console(width=160)
        console.print(table)
        for combo, why in invalid:
            console.print(f"[dim]skipped {'/'.join(combo.values())}: {why}[/dim]")
    return 0


# --- train ---------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from ablations import run
    from ablations.settings import parse_assignments, resolve

    settings = resolve(parse_assignments(args.settings))
    prepared = run.prepare(settings)  # data and model checks, before anything is written
    result = run.train(settings, prepared=prepared, progress=not args.quiet).fields()
    keys = (
        "state",
        "model.name",
        "val/error",
        "test/error",
        "test/error_dropout",
        "params",
        "macs",
        "epochs_run",
        "fit_seconds",
        "images_per_second",
        "precision",
        "device",
        "data.files",
        "run_dir",
        "error_message",
    )
    print(json.dumps({k: _clean(result[k]) for k in keys}, default=_json_default))
    return 0


# --- the parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ablate", description="All Convolutional Net ablations: models, runs, sweeps, tables."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="the model family with params, MACs, feature maps")
    p.add_argument("--input", default="32x32x3", help="HxWxC (default 32x32x3)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--all", action="store_true", help="every valid slot combination")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "train",
        help="one run from key=value settings",
        description="One run. Settings are dotted keys, e.g. model.base=C "
        "model.variant=all-cnn data.dataset=synthetic train.epochs=2.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("settings", nargs="*", metavar="key=value")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    from ablations import launcher, status, visualize
    from ablations.export import cli as export_cli
    from ablations.report import cli as report_cli

    launcher.register_cli(sub)
    status.register_cli(sub)
    export_cli.register_cli(sub)
    report_cli.register_cli(sub)
    visualize.register_cli(sub)
    return parser


def settings_help() -> str:
    """Every setting with its type, default, allowed values and help, grouped by prefix."""
    from ablations.settings import SCHEMA

    lines, group = ["settings (key=value):"], None
    for key, s in SCHEMA.items():
        prefix = key.split(".")[0] if "." in key else "other"
        if prefix != group:
            lines.append(f"\n  {prefix}:")
            group = prefix
        allowed = f"; one of {', '.join(s.choices)}" if s.choices else ""
        bounds = f"; {s.bounds()}" if s.bounds() else ""
        lines.append(f"    {key} ({s.kind}, default {s.default}{allowed}{bounds})")
        lines.append(f"        {s.help}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops a nargs="*" positional at the first flag: `train a=1 --quiet b=2` leaves
    # b=2 over; key=value pairs on both sides of a flag are all settings
    if extra and args.command == "train" and not any(e.startswith("-") for e in extra):
        args.settings = [*args.settings, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except _user_errors() as err:
        print(f"ablate {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # Ctrl-C outside a sweep's workers (start-up, export, train)
        print(f"ablate {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        from ablations.process import machine_fault

        fault = machine_fault(err)
        if fault is None:
            raise
        # a read-only or full disk is the machine's state, not a bug: one line, not a traceback
        where = f" {fault.filename}" if fault.filename else ""
        print(
            f"ablate {args.command}: error: cannot write{where}: {fault.strerror}", file=sys.stderr
        )
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
