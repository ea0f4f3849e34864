"""The device-resident loader: epochs, DDP shards, seeds and on-device flip-translate."""

import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch

from datamodules import AUGMENTATIONS, DeviceLoader, flip_translate
from datamodules.loader import MAX_SHIFT


def coded(n=100, c=3, size=8):
    """Image i is filled with i + 1 (so zero fill never hides it); label i % 10."""
    x = (torch.arange(n, dtype=torch.float32) + 1).view(n, 1, 1, 1).expand(n, c, size, size)
    return x.contiguous(memory_format=torch.channels_last), torch.arange(n) % 10


def image_ids(xb: torch.Tensor) -> torch.Tensor:
    return xb.amax(dim=(1, 2, 3)).long() - 1


def all_moves(x: torch.Tensor) -> torch.Tensor:
    """Every flip and shift of up to MAX_SHIFT px, zero filled: (B, 2, 11, 11, C, H, W)."""
    b, c, h, w = x.shape
    m = MAX_SHIFT
    padded = torch.nn.functional.pad(torch.stack([x, x.flip(3)], 1), (m, m, m, m))
    out = torch.empty(b, 2, 2 * m + 1, 2 * m + 1, c, h, w)
    for i, dy in enumerate(range(-m, m + 1)):
        for j, dx in enumerate(range(-m, m + 1)):
            out[:, :, i, j] = padded[..., m - dy : m - dy + h, m - dx : m - dx + w]
    return out


def test_flip_translate_moves_at_most_5px_and_flips_about_half():
    b = 400
    x = torch.rand(b, 2, 10, 10) + 0.1  # distinct, non-zero images
    out = flip_translate(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    match = (all_moves(x) == out[:, None, None, None]).flatten(-3).all(-1)  # (B, 2, 11, 11)
    # every output is exactly one flip + shift of its input: nothing moves farther than 5 px
    assert match.flatten(1).sum(1).eq(1).all()
    _, flip, dy, dx = torch.nonzero(match).T  # one row per image, in batch order
    assert 0.4 < flip.float().mean() < 0.6
    assert set(dy.tolist()) == set(dx.tolist()) == set(range(2 * MAX_SHIFT + 1))
    assert (dy == MAX_SHIFT).float().mean() < 0.2  # most images do move


def test_flip_translate_repeats_under_the_same_seed():
    x = torch.rand(64, 3, 10, 10)
    a = flip_translate(x, torch.Generator().manual_seed(7))
    b = flip_translate(x, torch.Generator().manual_seed(7))
    c = flip_translate(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_every_training_image_once_per_epoch_in_a_new_order():
    x, y = coded(100)
    loader = DeviceLoader(x, y, 32, shuffle=True, seed=3)
    assert len(loader) == 4
    orders = []
    for _ in range(3):
        batches = list(loader)
        assert [len(b) for b, _ in batches] == [32, 32, 32, 4]
        ids = torch.cat([image_ids(b) for b, _ in batches])
        labels = torch.cat([lab for _, lab in batches])
        assert sorted(ids.tolist()) == list(range(100))
        assert torch.equal(labels, ids % 10)  # labels travel with their images
        orders.append(ids)
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])


@pytest.mark.parametrize("augment", list(AUGMENTATIONS))
def test_same_seed_same_batches(augment):
    x, y = coded(50)

    def epochs(seed):
        loader = DeviceLoader(x, y, 16, shuffle=True, augment=augment, seed=seed)
        return [torch.cat([b.flatten() for b, _ in loader]) for _ in range(2)]

    first, again, other = epochs(0), epochs(0), epochs(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], first[1])


def test_augmented_batches_keep_their_labels():
    x, y = coded(90, size=12)
    loader = DeviceLoader(x, y, 32, shuffle=True, augment="flip-translate", seed=0)
    seen = []
    for xb, yb in loader:
        assert xb.is_contiguous(memory_format=torch.channels_last)
        ids = image_ids(xb)
        assert torch.equal(yb, ids % 10)
        # zero fill: each image keeps at least the 7x7 middle that no 5 px shift can empty
        assert ((xb > 0).sum(dim=(1, 2, 3)) >= 3 * 7 * 7).all()
        seen += ids.tolist()
    assert sorted(seen) == list(range(90))


@pytest.mark.parametrize("n", [99, 100, 101])
def test_ddp_shards_are_disjoint_and_cover_the_epoch(n):
    x, y = coded(n)
    world = 3
    for epoch in range(2):
        loaders = [
            DeviceLoader(x, y, 8, shuffle=True, seed=5, rank=r, world_size=world)
            for r in range(world)
        ]
        shards = [set(ld.indices(epoch).tolist()) for ld in loaders]
        assert {len(s) for s in shards} == {n // world}  # ranks stay in step
        assert {len(ld) for ld in loaders} == {-(-(n // world) // 8)}
        union = set().union(*shards)
        assert sum(map(len, shards)) == len(union)  # disjoint
        assert len(union) == n - n % world  # the whole epoch but for < world images
        # the shards are cut from the single-process permutation of the same epoch
        whole = DeviceLoader(x, y, 8, shuffle=True, seed=5).indices(epoch)
        for r, ld in enumerate(loaders):
            assert torch.equal(ld.indices(epoch), whole[: n - n % world][r::world])
        # each rank iterates its shard: ids from the batches are the shard
        for ld, shard in zip(loaders, shards):
            ld.set_epoch(epoch)
            assert {i for b, _ in ld for i in image_ids(b).tolist()} == shard


@pytest.mark.parametrize("n,batch", [(100, 16), (96, 16), (97, 32), (5, 4)])
def test_ddp_evaluation_sees_every_image_once_in_equal_steps(n, batch):
    x, y = coded(n)
    world = 4
    loaders = [DeviceLoader(x, y, batch, rank=r, world_size=world) for r in range(world)]
    seen = []
    for ld in loaders:
        batches = list(ld)
        assert len(batches) == len(ld) == len(loaders[0])
        assert all(0 < len(b) <= batch for b, _ in batches)
        seen += [i for b, _ in batches for i in image_ids(b).tolist()]
    assert sorted(seen) == list(range(n))


def test_evaluation_is_in_order_without_augmentation():
    x, y = coded(70)
    loader = DeviceLoader(x, y, 32, augment="none")
    ids = torch.cat([image_ids(b) for b, _ in loader])
    assert torch.equal(ids, torch.arange(70))


def test_lightning_sets_the_epoch():
    x, y = coded(40)
    loader = DeviceLoader(x, y, 8, shuffle=True, seed=1)
    _set_sampler_epoch(loader, 5)  # what Lightning's fit loop calls before each epoch
    assert loader.epoch == 5
    first = torch.cat([image_ids(b) for b, _ in loader])
    assert torch.equal(first, loader.indices(5))


def test_unknown_augmentation_lists_the_valid_ones():
    x, y = coded(4)
    with pytest.raises(ValueError, match="none, flip-translate"):
        DeviceLoader(x, y, 2, augment="mixup")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.gpu
def test_batches_stay_on_the_gpu():
    x, y = coded(64)
    loader = DeviceLoader(x.cuda(), y.cuda(), 16, shuffle=True, augment="flip-translate")
    ids = []
    for xb, yb in loader:
        assert xb.is_cuda and yb.is_cuda
        ids += image_ids(xb).tolist()
    assert sorted(ids) == list(range(64))


def test_a_worker_reads_its_data_set_once_and_runs_cannot_alter_it(tmp_path, monkeypatch):
    """Trials in one process share the raw images (read_raw keeps the last data set);
    each run's splits are its own copies."""
    from datamodules import datamodule

    calls = []
    real = datamodule.DATASETS["synthetic"]
    monkeypatch.setitem(datamodule.DATASETS, "synthetic", lambda *a: calls.append(a) or real(*a))
    datamodule.forget_raw()
    data = {"dataset": "synthetic", "dir": str(tmp_path), "preprocess": "standardize"}
    data |= {"augment": "none", "val_size": 64, "subset": 128}
    first = datamodule.AllConvDataModule(data, seed=0, batch_size=32)
    first.load()
    first.splits["test"][0].add_(100.0)  # a run that writes to its tensors
    first.splits["test"][1].zero_()
    second = datamodule.AllConvDataModule(data, seed=0, batch_size=32)
    second.load()
    assert len(calls) == 1
    third = datamodule.AllConvDataModule(data, seed=0, batch_size=32)
    datamodule.forget_raw()
    third.load()
    for split in ("train", "val", "test"):
        assert torch.equal(second.splits[split][0], third.splits[split][0])
        assert torch.equal(second.splits[split][1], third.splits[split][1])
    datamodule.forget_raw()
