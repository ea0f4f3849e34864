"""What `train.precision` and `train.deterministic` ask of the device, checked on the CPU
through the switches they set (torch's TF32 and determinism flags need no GPU to read)."""

import pytest
import torch

from ablations import run
from ablations.settings import resolve
from lightning_modules.precision import lightning_precision, resolve_precision


@pytest.fixture
def tf32_flags():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_32_bit_is_32_bit_on_a_gpu_and_tf32_is_asked_for_by_name(tf32_flags):
    assert resolve_precision("32", "cuda") == "32-true"
    assert resolve_precision("tf32", "cuda") == "tf32"
    assert resolve_precision("tf32", "cpu") == "32-true"  # no TF32 there: record what ran
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default: TF32 convolutions
    assert lightning_precision("32-true") == "32-true"
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert lightning_precision("tf32") == "32-true"
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    assert lightning_precision("bf16-mixed") == "bf16-mixed"


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_turns_on_deterministic_algorithms(tmp_path, deterministic):
    settings = resolve({"data.dataset": "synthetic", "train.deterministic": deterministic})
    before = torch.are_deterministic_algorithms_enabled()
    try:
        run.make_trainer(
            settings,
            tmp_path,
            run.EpochRecorder(),
            has_val=True,
            loggers=[],
            callbacks=[],
            progress=False,
            devices=1,
            strategy="auto",
        )
        assert torch.are_deterministic_algorithms_enabled() is deterministic
    finally:
        torch.use_deterministic_algorithms(before)
