"""The typed trial record: what a trial stores is what is read back, and its one outcome
field reads the same from studies written before the record existed."""

import math

import optuna
import pytest
from optuna.trial import TrialState

from ablations.record import COLUMNS, Metrics, Outcome, Provenance, Timings, TrialRecord, store
from ablations.storage import fail_trial


@pytest.fixture
def study():
    return optuna.create_study(storage=optuna.storages.InMemoryStorage())


def full_record() -> TrialRecord:
    return TrialRecord(
        Outcome.COMPLETE,
        settings={"model.name": "All-CNN-C", "seed": 1},
        metrics=Metrics(val_error=12.5, test_error=11.0, test_error_dropout=math.nan, params=7),
        timings=Timings(fit_seconds=3.5, images_per_second=100.0),
        provenance=Provenance(device="cpu", precision="32-true", data_files=["a", "b"]),
        history=[
            {"epoch": 0, "val/error": 12.5, "train/loss": 2.302585093, "train_images": 64},
            {"epoch": 1, "val/error": math.nan, "train/loss": 1.5},
        ],
    )


def test_a_stored_record_reads_back_the_same(study):
    trial = study.ask()
    trial.set_user_attr("cell", "c1")
    record = full_record()
    store(trial, record)
    study.tell(trial, 12.5)
    back = TrialRecord.of(study.trials[0])
    assert back.outcome == Outcome.COMPLETE and back.cell == "c1"
    assert back.settings == record.settings and back.model_name == "All-CNN-C"
    assert back.metrics == Metrics(val_error=12.5, test_error=11.0, params=7)  # NaN not stored
    assert back.timings == record.timings
    assert back.provenance == record.provenance
    # the curves the report draws, 6 digits, a diverged epoch's NaN as a gap
    assert back.history == [
        {"epoch": 0, "val/error": 12.5, "train/loss": 2.30259},
        {"epoch": 1, "train/loss": 1.5},
    ]
    assert study.trials[0].user_attrs["curves"] == {
        "epoch": [0, 1],
        "train/loss": [2.30259, 1.5],
        "val/error": [12.5, None],
    }
    # the project's names in the study, as optuna-dashboard and older studies have them
    attrs = study.trials[0].user_attrs
    assert attrs["state"] == "complete" and attrs["val/error"] == 12.5
    assert attrs["data.files"] == ["a", "b"] and "test/error_dropout" not in attrs
    assert set(COLUMNS) <= set(back.fields())


def test_a_complete_run_whose_metric_is_not_finite_is_failed_with_why():
    record = full_record().failed("val/error is not finite: nan")
    assert record.outcome == Outcome.FAILED and record.metrics.val_error == 12.5
    assert record.fields()["error_message"] == "val/error is not finite: nan"
    assert full_record().get("test/error_dropout") != full_record().get("test/error_dropout")
    assert full_record().fields()["test/error_dropout"] is None


@pytest.mark.parametrize(
    "state,attrs,outcome",
    [
        (TrialState.FAIL, {"state": "diverged"}, Outcome.DIVERGED),
        (TrialState.FAIL, {"interrupted": True}, Outcome.INTERRUPTED),  # before the record
        (TrialState.FAIL, {"state": "interrupted"}, Outcome.INTERRUPTED),
        (TrialState.FAIL, {"state": "complete"}, Outcome.FAILED),  # told FAIL after all
        (TrialState.FAIL, {}, Outcome.FAILED),
        (TrialState.PRUNED, {"state": "pruned"}, Outcome.PRUNED),
        (TrialState.COMPLETE, {}, Outcome.COMPLETE),
    ],
)
def test_the_outcome_of_a_finished_trial(study, state, attrs, outcome):
    trial = study.ask()
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    study.tell(trial, 1.0 if state == TrialState.COMPLETE else None, state=state)
    assert TrialRecord.of(study.trials[0]).outcome == outcome


def test_running_and_waiting_trials_are_so_whatever_they_carry(study):
    study.enqueue_trial({})
    assert TrialRecord.of(study.trials[0]).outcome == Outcome.WAITING
    trial = study.ask()
    trial.set_user_attr("state", "complete")  # stored before the trial was told
    assert TrialRecord.of(study.trials[0]).outcome == Outcome.RUNNING


def test_failing_a_trial_records_its_outcome_and_never_overwrites_a_finished_one(study):
    trial = study.ask()
    assert fail_trial(study, trial, "worker died: gone", interrupted=True)
    record = TrialRecord.of(study.trials[0])
    assert record.outcome == Outcome.INTERRUPTED and record.error_message == "worker died: gone"
    done = study.ask()
    store(done, full_record())
    study.tell(done, 12.5)
    assert not fail_trial(study, done, "late", interrupted=True)
    again = TrialRecord.of(study.trials[1])
    assert again.outcome == Outcome.COMPLETE and again.error_message is None
