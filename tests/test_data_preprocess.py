"""GCN + ZCA and standardise: fitted on the training split only, cached, refitted on change."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import AllConvDataModule, preprocess
from tests.helpers import write_fashion


def correlated_images(n=3000, size=6, channels=1, seed=0) -> torch.Tensor:
    """uint8 (N, H, W, C) images with strongly correlated pixels, like natural images."""
    rng = np.random.default_rng(seed)
    d = size * size * channels
    mix = rng.normal(size=(d, d)) * np.linspace(3.0, 0.05, d)  # a spread of variances
    z = rng.normal(size=(n, d)) @ mix.T
    x = 128 + 40 * z / z.std()
    return torch.from_numpy(np.clip(x, 0, 255).astype(np.uint8).reshape(n, size, size, channels))


def reference_gcn(x: torch.Tensor) -> np.ndarray:
    """pylearn2's global_contrast_normalize(scale=55, subtract_mean=True, use_std=False)."""
    a = x.reshape(len(x), -1).numpy().astype(np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    return 55.0 * a / np.sqrt((a**2).sum(axis=1, keepdims=True))


def test_gcn_zca_whitens_the_training_data():
    x = correlated_images()
    stats = preprocess.fit_gcn_zca(x)
    g = reference_gcn(x)
    # pylearn2's ZCA(filter_bias=0.1), in float64, as the reference
    cov = np.cov(g, rowvar=False, bias=True)
    s, v = np.linalg.eigh(cov)
    whiten = v @ np.diag(1 / np.sqrt(np.clip(s, 0, None) + 0.1)) @ v.T
    np.testing.assert_allclose(stats["mean"].numpy(), g.mean(axis=0), atol=1e-4)
    np.testing.assert_allclose(stats["whiten"].numpy(), whiten, atol=1e-4 * np.abs(whiten).max())

    out = preprocess.apply_gcn_zca(x, stats).reshape(len(x), -1).double().numpy()
    assert np.abs(out.mean(axis=0)).max() < 1e-4
    out_cov = np.cov(out, rowvar=False, bias=True)
    # in the eigenbasis of the data the covariance is diag(s / (s + 0.1)): the identity in
    # every direction with real variance; GCN's removed mean direction (s = 0) stays 0
    in_basis = v.T @ out_cov @ v
    np.testing.assert_allclose(in_basis, np.diag(s / (s + 0.1)), atol=2e-3)
    strong = s > 10  # s / (s + 0.1) > 0.99
    assert strong.sum() > len(s) // 2
    np.testing.assert_allclose(in_basis[np.ix_(strong, strong)], np.eye(strong.sum()), atol=0.011)


def test_gcn_scales_each_image_to_norm_55():
    x = correlated_images(n=50)
    g = preprocess.gcn(x.reshape(50, -1).double())
    np.testing.assert_allclose(g.mean(dim=1), 0, atol=1e-9)
    np.testing.assert_allclose(g.norm(dim=1), 55.0, rtol=1e-9)


def test_standardize_is_per_channel():
    x = correlated_images(n=500, channels=3)
    stats = preprocess.fit_standardize(x)
    ref = x.reshape(-1, 3).double()
    np.testing.assert_allclose(stats["mean"], ref.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], ref.std(0), rtol=1e-5)
    out = preprocess.apply_standardize(x, stats).reshape(-1, 3)
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(out.std(0), 1, atol=1e-4)


# --- in the datamodule: which split the fit sees, and the cache ---------------------------


def module(root, **data) -> AllConvDataModule:
    settings = dict(
        dataset="fashion-mnist",
        dir=str(root),
        preprocess="gcn-zca",
        augment="none",
        val_size="auto",
        subset=None,
    )
    settings.update(data)
    seed = settings.pop("seed", 0)
    dm = AllConvDataModule(settings, seed=seed, download=False)
    dm.load()
    return dm


@pytest.fixture
def fashion(tmp_path, monkeypatch):
    """Tiny 8x8 Fashion-MNIST-format files in tmp_path/fashion-mnist; no Debian fallback."""
    from datamodules import sources

    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "none")
    write_fashion(tmp_path / "fashion-mnist", n_train=400, n_test=100, size=8)
    return tmp_path


@pytest.mark.parametrize("name", list(preprocess.PREPROCESSING))
def test_fit_sees_only_the_training_split(fashion, monkeypatch, name):
    seen = []
    prep = preprocess.PREPROCESSING[name]

    def spy(x):
        seen.append(x.clone())
        return prep.fit(x)

    monkeypatch.setitem(preprocess.PREPROCESSING, name, prep._replace(fit=spy))
    dm = module(fashion, preprocess=name, subset=300)
    (fit_x,) = seen
    assert len(fit_x) == 300  # not the 30 held out for validation, not the test split
    train, val, test = (dm.splits[k][0] for k in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (300, 30, 100)
    # the training split is exactly the images the statistics came from ...
    torch.testing.assert_close(train, prep.apply(fit_x, dm.stats).permute(0, 3, 1, 2))
    # ... and the test split went through those same statistics, not its own
    from datamodules.sources import load_fashion_mnist

    raw = load_fashion_mnist(fashion, download=False)
    expected = prep.apply(torch.from_numpy(raw.test_x), dm.stats).permute(0, 3, 1, 2)
    torch.testing.assert_close(test, expected)
    own = prep.fit(torch.from_numpy(raw.test_x))
    assert not all(torch.allclose(own[k], dm.stats[k]) for k in own)
    flat = train.reshape(len(train), -1) if name == "gcn-zca" else train.transpose(0, 1)
    assert flat.reshape(flat.shape[0], -1).mean().abs() < 1e-3


def test_cache_reused_then_refitted_when_anything_changes(fashion):
    first = module(fashion)
    assert first.stats_source.startswith("fitted ")
    again = module(fashion)
    assert again.stats_source == first.stats_source.replace("fitted ", "cache ", 1)
    for k in first.stats:
        assert torch.equal(first.stats[k], again.stats[k])
    torch.testing.assert_close(first.splits["test"][0], again.splits["test"][0])

    sources = {first.stats_source.split(" ", 1)[1]}
    for change in (
        dict(subset=200),
        dict(val_size=50),
        dict(seed=1),
        dict(preprocess="standardize"),
    ):
        dm = module(fashion, **change)
        assert dm.stats_source.startswith("fitted "), change
        sources.add(dm.stats_source.split(" ", 1)[1])
    assert len(sources) == 5  # one file per distinct fit
    assert all(p.startswith(str(fashion / "cache" / "fashion-mnist-")) for p in sources)

    # a dataset file replaced in place (same name, new contents) refits too
    labels = fashion / "fashion-mnist" / "train-labels-idx1-ubyte"
    st = labels.stat()
    os.utime(labels, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert module(fashion).stats_source.startswith("fitted ")
    assert sorted(p.suffix for p in (fashion / "cache").iterdir()) == [".pt"] * 6  # no temp files


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),  # truncated
        lambda p: p.write_bytes(b"not a torch file"),
        lambda p: p.write_bytes(b""),
        lambda p: torch.save({"mean": torch.zeros(3), "whiten": torch.eye(3)}, p),  # wrong shape
        lambda p: torch.save({"mean": torch.full((64,), float("nan")), "whiten": torch.eye(64)}, p),
        lambda p: torch.save([1, 2, 3], p),
    ],
)
def test_corrupt_cache_is_refitted_and_replaced(fashion, damage):
    good = module(fashion)
    path = Path(good.stats_source.split(" ", 1)[1])
    damage(path)
    dm = module(fashion)
    assert dm.stats_source == good.stats_source  # "fitted ...", not "cache ..."
    for k in good.stats:
        assert torch.equal(dm.stats[k], good.stats[k])
    assert module(fashion).stats_source.startswith("cache ")  # the refit was saved whole
