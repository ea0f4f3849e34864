"""README's one-run example, run as written: its printed test error must stay what README
says it is (below 5%), so the page cannot drift from the code."""

import json
import re
import shlex
from pathlib import Path

from ablations.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def one_run_example() -> list[str]:
    text = README.read_text()
    section = text.split("## One run", 1)[1]
    command = re.search(r"```\n(ablate train [^\n]+)\n```", section).group(1)
    return shlex.split(command)[1:]


def test_the_one_run_example_learns_as_readme_says(in_tmp, capsys):
    argv = one_run_example()
    assert argv[0] == "train" and "data.dataset=synthetic" in argv
    assert main([*argv, "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["state"] == "complete"
    assert result["test/error"] < 5, result
    assert result["test/error_dropout"] < 5, result  # no dropout train/eval gap either
