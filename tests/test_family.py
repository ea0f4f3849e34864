import csv
import math
from itertools import product
from pathlib import Path

import pytest
import torch

from lightning_modules import family
from lightning_modules.net import build, count_macs, count_params

SHAPES = [(3, 32, 10), (1, 28, 10), (3, 32, 100)]
COMBOS = list(product(family.BASES, family.POOLINGS, family.STRIDED_CONVS, family.HEADS))


def is_valid(pooling, strided):
    return not (pooling != "none" and strided == "fold")


VALID = [c for c in COMBOS if is_valid(c[1], c[2])]
TABLE3 = Path(__file__).resolve().parents[1] / "ablations" / "data" / "table3.csv"


@pytest.mark.parametrize("base,pooling,strided,head", VALID)
@pytest.mark.parametrize("channels,size,classes", SHAPES[:2])
def test_every_combination_builds_runs_and_gets_gradients(
    base, pooling, strided, head, channels, size, classes
):
    spec = family.ModelSpec(
        base,
        pooling,
        strided,
        head,
        width=0.125,
        in_channels=channels,
        in_size=size,
        num_classes=classes,
    )
    net = build(spec)
    out = net(torch.randn(2, channels, size, size))
    assert out.shape == (2, classes)
    out.square().sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_hundred_classes():
    spec = family.ModelSpec(pooling="none", strided_conv="extra", width=0.125, num_classes=100)
    assert build(spec)(torch.randn(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize("pooling", [p for p in family.POOLINGS if p != "none"])
def test_fold_with_pooling_is_rejected(pooling):
    with pytest.raises(family.SpecError, match="halve the resolution twice per stage"):
        family.ModelSpec(pooling=pooling, strided_conv="fold")


def test_all_specs_lists_exactly_the_invalid_combinations():
    valid, invalid = family.all_specs()
    assert len(valid) + len(invalid) == len(COMBOS)
    assert sorted(
        (c["base"], c["pooling"], c["strided_conv"], c["head"]) for c, _ in invalid
    ) == sorted(c for c in COMBOS if not is_valid(c[1], c[2]))


@pytest.mark.parametrize(
    "table,key",
    [
        (family.BASES, "base"),
        (family.POOLINGS, "pooling"),
        (family.STRIDED_CONVS, "strided_conv"),
        (family.HEADS, "head"),
        (family.NORMS, "norm"),
        (family.DROPOUTS, "dropout"),
    ],
)
def test_unknown_slot_value_lists_valid_ones(table, key):
    with pytest.raises(family.SpecError) as err:
        family.ModelSpec(**{key: "nope"})
    for name in table:
        assert name in str(err.value)
    assert f"model.{key}" in str(err.value)


def test_paper_parameter_counts():
    presets = family.paper_presets()
    count = {name: count_params(build(spec)) for name, spec in presets.items()}
    assert count["Model C"] == 954_730
    assert count["All-CNN-C"] == 1_369_738
    assert count["ConvPool-CNN-C"] == count["All-CNN-C"]
    assert count["Strided-CNN-C"] == count["Model C"]


def test_presets_carry_table3_names():
    with open(TABLE3) as f:
        rows = list(csv.DictReader(f))
    presets = family.paper_presets()
    assert sorted(presets) == sorted(r["name"] for r in rows)
    for r in rows:
        spec = presets[r["name"]]
        assert (spec.base, spec.variant) == (r["base"], r["variant"])


def test_descriptive_name_for_non_paper_combination():
    assert family.ModelSpec(pooling="avg", strided_conv="extra", head="fc").name == "C/avg/extra/fc"


def test_variant_shorthand_and_clash():
    spec = family.spec_from_settings({"model.variant": "all-cnn"})
    assert (spec.pooling, spec.strided_conv, spec.name) == ("none", "extra", "All-CNN-C")
    with pytest.raises(family.SpecError, match="do not also set model.pooling"):
        family.spec_from_settings({"model.variant": "all-cnn", "model.pooling": "max"})


def test_input_too_small_gives_the_sizes():
    with pytest.raises(family.SpecError, match=r"8x8 is too small: feature maps go 8 -> 4 -> 2"):
        family.ModelSpec(in_size=8)


def test_feature_sizes_and_macs():
    spec = family.ModelSpec(in_channels=1, in_size=28)
    assert spec.feature_sizes() == [28, 14, 7, 5]
    # Model C's first conv alone: 32*32 positions x 96 filters x 27 weights
    assert count_macs(build(family.ModelSpec())) > 32 * 32 * 96 * 27


def test_batch_norm_and_width():
    spec = family.ModelSpec(norm="batch", width=0.5)
    net = build(spec)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert spec.channels() == (48, 96, 96)


@pytest.mark.parametrize("name", list(family.paper_presets()))
def test_he_init_keeps_activations_near_unit_scale(name):
    # the property that lets the paper models train without normalisation layers, with the
    # paper's dropout on (training) and off (evaluation)
    net = build(family.paper_presets()[name])
    x = torch.randn(8, 3, 32, 32)
    for training in (True, False):
        net.train(training)
        rms = []
        hooks = [
            m.register_forward_hook(lambda m, i, o, rms=rms: rms.append(o.pow(2).mean().sqrt()))
            for m in net.modules()
            if isinstance(m, torch.nn.ReLU)
        ]
        with torch.no_grad():
            net(x)
        for h in hooks:
            h.remove()
        assert all(0.2 < r < 5 for r in rms), (training, rms)  # max pooling lifts it a little


def test_init_corrects_for_dropout_and_the_class_score_layer():
    """He fan-in std sqrt(2 / fan_in), times sqrt(1 - p) right after a dropout of rate p, and
    gain 1 (std sqrt(1 / fan_in)) for the class-score layer, which no ReLU follows."""
    torch.manual_seed(0)
    net = build(family.ModelSpec(base="C", dropout="paper"))
    weights = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    first, after_stage1, last = weights[0], weights[2], weights[-1]

    def expected(m, factor):
        return math.sqrt(2 / (m.weight[0].numel())) * factor

    assert first.weight.std().item() == pytest.approx(expected(first, math.sqrt(0.8)), rel=0.1)
    assert after_stage1.weight.std().item() == pytest.approx(
        expected(after_stage1, math.sqrt(0.5)), rel=0.05
    )
    assert weights[1].weight.std().item() == pytest.approx(expected(weights[1], 1), rel=0.05)
    assert last.weight.std().item() == pytest.approx(expected(last, math.sqrt(0.5)), rel=0.1)
    plain = [
        m
        for m in build(family.ModelSpec(base="C", dropout="none")).modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    assert plain[2].weight.std().item() == pytest.approx(expected(plain[2], 1), rel=0.05)


@pytest.mark.parametrize(
    "flags,expected",
    [
        ("fpu avx2 avx512f avx512bw", "32-true"),  # AVX-512 without its bf16 extension
        ("fpu avx2 avx512f avx512_bf16", "bf16-mixed"),
        ("fpu avx2 amx_bf16 amx_tile", "bf16-mixed"),
    ],
)
def test_auto_precision_on_a_cpu_follows_its_bf16_flags(tmp_path, monkeypatch, flags, expected):
    from lightning_modules import precision

    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n")
    read = precision.cpu_computes_bf16.__wrapped__  # the uncached reader
    monkeypatch.setattr(precision, "cpu_computes_bf16", lambda: read(info))
    assert precision.resolve_precision("auto", "cpu") == expected
    assert precision.resolve_precision("32", "cpu") == "32-true"
    assert precision.resolve_precision("bf16", "cpu") == "bf16-mixed"
    assert not read(tmp_path / "absent")
