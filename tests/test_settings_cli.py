import json

import pytest

from ablations.cli import main
from ablations.settings import (
    SCHEMA,
    SettingsError,
    coerce,
    defaults,
    model_spec,
    parse_assignments,
    resolve,
)
from datamodules import AUTO_PREPROCESS, DATASETS
from tests.helpers import tree


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_unknown_key_suggests_the_closest(capsys, in_tmp):
    code, _, err = run_cli(capsys, "train", "model.pooling=max", "trian.lr=0.1")
    assert code == 2
    assert "unknown setting 'trian.lr'" in err and "did you mean 'train.lr'" in err
    assert tree(in_tmp) == []


@pytest.mark.parametrize(
    "item,message",
    [
        ("model.head", "is not a key=value setting"),
        ("train.epochs=two", "wrong type: expected int"),
        ("train.lr=fast", "wrong type: expected float"),
        ("model.width=-1", "must be positive"),
        ("model.head=mlp", "valid values: gap, fc"),
        ("model.pooling=maxx", "valid values: max, avg, none"),
        ("data.dataset=mnist", "valid values: cifar10, cifar100, fashion-mnist, synthetic"),
        ("train.momentum=-5", "train.momentum=-5.0 must be at least 0"),
        ("train.weight_decay=-1", "train.weight_decay=-1.0 must be at least 0"),
        ("seed=-3", "seed=-3 must be at least 0"),
        ("seed=99999999999", "seed=99999999999 must be at most 4294967295"),
        ("model.width=1000", "model.width=1000.0 must be at most 8"),
        ("model.width=.inf", "model.width=inf must be a finite number"),
        ("train.lr=.nan", "train.lr=nan must be a finite number"),
        ("train.lr_gamma=2", "train.lr_gamma=2.0 must be at most 1"),
        ("data.subset=0", "data.subset=0 must be at least 1"),
        ("seed=1 seed=2", "seed is given twice (1 and '2'); give it once"),
    ],
)
def test_bad_settings_exit_2_and_write_nothing(capsys, in_tmp, item, message):
    base = [] if item.startswith("data.dataset") else ["data.dataset=synthetic"]
    code, out, err = run_cli(capsys, "train", *base, *item.split())
    assert code == 2
    assert message in err
    assert err.count("\n") == 1  # one message
    assert tree(in_tmp) == []


def test_fold_with_pooling_on_the_command_line(capsys, in_tmp):
    code, _, err = run_cli(capsys, "train", "model.pooling=avg", "model.strided_conv=fold")
    assert code == 2 and "halved" not in err and "halve the resolution twice" in err
    assert tree(in_tmp) == []


def test_variant_with_a_slot_it_sets(capsys, in_tmp):
    code, _, err = run_cli(capsys, "train", "model.variant=strided", "model.strided_conv=fold")
    assert code == 2 and "do not also set model.strided_conv" in err
    assert tree(in_tmp) == []


def test_parse_types():
    got = parse_assignments(
        [
            "train.lr=0.1",
            "train.epochs=3",
            "train.compile=true",
            "data.subset=none",
            "data.val_size=auto",
            "model.pooling=none",
        ]
    )
    assert got == {
        "train.lr": 0.1,
        "train.epochs": 3,
        "train.compile": True,
        "data.subset": None,
        "data.val_size": "auto",
        "model.pooling": "none",
    }


def test_models_lists_the_paper_models(capsys):
    code, out, _ = run_cli(capsys, "models", "--format", "json")
    rows = {r["model.name"]: r for r in json.loads(out)}
    assert code == 0 and len(rows) == 12
    assert rows["Model C"]["params"] == 954_730
    assert rows["All-CNN-C"]["params"] == 1_369_738
    assert rows["All-CNN-C"]["feature_maps"] == "32x32 -> 16x16 -> 8x8 -> 6x6"


def test_models_all_and_other_inputs(capsys):
    code, out, _ = run_cli(capsys, "models", "--all", "--input", "28x28x1", "--format", "csv")
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].startswith("model.name,")
    assert len(lines) - 1 == 3 * (3 * 3 - 2) * 2  # bases x valid (pooling, strided) x heads


def test_models_bad_input(capsys):
    code, _, err = run_cli(capsys, "models", "--input", "32by32")
    assert code == 2 and "must look like 32x32x3" in err


def test_train_help_shows_every_setting_with_type_default_choices_and_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for key, setting in SCHEMA.items():
        assert f"    {key} (" in out, key
        assert f"default {setting.default}" in out, key
        assert setting.help in out, key
        for choice in setting.choices or ():
            assert choice in out, (key, choice)
    assert "\n  model:\n" in out and "\n  data:\n" in out and "\n  train:\n" in out


@pytest.mark.parametrize(
    "raw,want",
    [("1e-3", 0.001), ("1E-3", 0.001), (".5", 0.5), ("5e-1", 0.5), ("0.01", 0.01), ("2", 2.0)],
)
def test_every_spelling_of_a_number(raw, want):
    assert coerce("train.lr", raw) == want


def test_a_sweep_file_with_yaml_exponents_loads(tmp_path):
    from ablations import sweep_file

    path = tmp_path / "s.yaml"
    path.write_text(
        "name: s\nmethod: grid\nparameters:\n  train.lr: {values: [1e-5, 1e-4]}\n"
        "  data.dataset: {value: synthetic}\n"
    )
    assert sweep_file.load(path).params["train.lr"].values == (1e-5, 1e-4)


@pytest.mark.parametrize("raw", [".nan", ".inf", "-.inf", "nan", "inf"])
def test_non_finite_numbers_are_refused(raw):
    with pytest.raises(SettingsError, match="must be a finite number"):
        coerce("train.lr", raw)


def test_settings_after_a_flag_are_settings(capsys, in_tmp):
    code, _, err = run_cli(capsys, "train", "data.dataset=synthetic", "--quiet", "train.lr=x")
    assert code == 2 and "train.lr='x' has the wrong type: expected float" in err
    assert tree(in_tmp) == []


def test_model_defaults_are_the_specs():
    from dataclasses import fields

    from lightning_modules.family import ModelSpec

    spec = {f.name: f.default for f in fields(ModelSpec)}
    for name in ("base", "head", "width", "norm", "dropout", "score_relu"):
        assert SCHEMA[f"model.{name}"].default == spec[name]
    # pooling and strided_conv default to None so that model.variant may set them; the
    # spec's defaults apply when neither is given
    assert model_spec(resolve({})).pooling == spec["pooling"]


def test_help_lists_type_default_choices_bounds_and_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for key, setting in SCHEMA.items():
        assert f"    {key} ({setting.kind}, default {setting.default}" in out
        assert setting.help in out
    assert "train.momentum (float, default 0.9; >= 0, <= 1)" in out
    assert "data.val_size (int or 'auto', default auto)" in out


def test_preprocess_auto_resolves_per_data_set_and_is_recorded_as_resolved():
    """The default `data.preprocess=auto` is GCN + ZCA on the paper's data sets (and
    Fashion-MNIST, where it closes the dropout train/eval gap), standardize on synthetic;
    a run records what it used, never "auto"."""
    assert defaults()["data.preprocess"] == "auto"
    for dataset, expected in AUTO_PREPROCESS.items():
        assert resolve({"data.dataset": dataset})["data.preprocess"] == expected
    assert AUTO_PREPROCESS["fashion-mnist"] == AUTO_PREPROCESS["cifar10"] == "gcn-zca"
    assert (
        resolve({"data.dataset": "cifar10", "data.preprocess": "standardize"})["data.preprocess"]
        == "standardize"
    )
    assert set(AUTO_PREPROCESS) == set(DATASETS)
