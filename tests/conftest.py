import os

import pytest

# Never reach for the network in tests: dataset downloads fail fast, W&B stays offline.
os.environ.setdefault("ALLCONV_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder, so `runs/` and caches land in tmp_path."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tree(path):
    """Every file under path, relative; for 'nothing was written' checks."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
