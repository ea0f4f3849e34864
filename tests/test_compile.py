"""`train.compile` in a long-lived worker: every trial's network is compiled, however many
architectures the worker trained before (Dynamo's recompile limit is per code object, and
all networks share one `forward`)."""

import functools
from dataclasses import asdict

import torch

from lightning_modules.family import all_specs
from lightning_modules.module import AllConvModule


def test_each_trials_network_compiles_past_dynamos_recompile_limit(monkeypatch):
    compiled = []

    def counting_backend(gm, example_inputs):  # Dynamo hands each new graph to its backend
        compiled.append(gm)
        return gm.forward

    monkeypatch.setattr(
        torch, "compile", functools.partial(torch.compile, backend=counting_backend)
    )
    specs, _ = all_specs(3, 32, 10)
    limit = torch._dynamo.config.recompile_limit
    for spec in specs[: limit + 4]:  # more architectures than the limit, one after another
        module = AllConvModule(model=asdict(spec), train={"compile": True})
        module.net(torch.randn(2, 3, 32, 32))
    assert len(compiled) == limit + 4  # past the limit, Dynamo would run them eagerly


def test_a_compiled_runs_throughput_leaves_out_the_epoch_that_compiled():
    from ablations.run import throughput

    history = [
        {"epoch": 0, "train_seconds": 10.0, "train_images": 100},  # compiling
        {"epoch": 1, "train_seconds": 1.0, "train_images": 100},
    ]
    assert throughput(history, compiled=True) == 100.0
    assert throughput(history, compiled=False) == round(200 / 11, 1)
    assert throughput(history[:1], compiled=True) == 10.0  # nothing else to go by
