"""The device-resident loader: the split is one tensor on the device; batches are index cuts.

No per-image Python and no worker processes: a permutation per epoch, drawn on the device,
and augmentation vectorised over the batch (after airbench).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import torch

from datamodules.choices import AUGMENT_CHOICES

MAX_SHIFT = 5  # px, the paper's translations for the augmented CIFAR-10 result


class FlipTranslate:
    """Flip half the images left-right, shift each by up to 5 px in x and y, zero fill.

    Built once per loader: the images (channels-last) with their mirror images beside them,
    each row zero padded by 5 px left and right, and one zero row at the end. Every output
    row is then one contiguous window of that store (its row, flipped or not, shifted, or
    the zero row), so a whole batch is a single `index_select` of rows, one pass over the
    batch's memory; the store is 2.6x the images' memory. Selecting, flipping, padding and
    gathering per batch took 6 passes and a per-element gather: 8x slower on a CPU thread
    (benchmarks/loader.py), and on a busy machine each extra parallel op waits for a core.
    """

    def __init__(self, x: torch.Tensor) -> None:
        n, c, h, w = x.shape
        m = MAX_SHIFT
        self.n, self.h, self.w, self.c, self.row = n, h, w, c, w + 2 * m
        store = x.new_zeros(2 * n * h + 1, self.row, c)
        images = store[: 2 * n * h].view(2, n, h, self.row, c)
        nhwc = x.permute(0, 2, 3, 1)
        images[0, :, :, m : m + w] = nhwc
        images[1, :, :, m : m + w] = nhwc.flip(2)
        self.zero_row = 2 * n * h * self.row  # the first pixel of the zero row
        # window k: the w pixels (w * c values) from pixel k on; windows overlap, no copy
        self.windows = store.view(-1).as_strided((store.numel() // c - w + 1, w * c), (c, 1))

    def __call__(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, h, dev = len(idx), self.h, idx.device
        flip = torch.rand(b, device=dev, generator=gen) < 0.5
        shift = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (2, b), device=dev, generator=gen)
        rows = torch.arange(h, device=dev) - shift[0][:, None]  # (B, H) source rows
        image = idx + self.n * flip  # the mirror images follow the originals
        start = (image[:, None] * h + rows) * self.row + (MAX_SHIFT - shift[1])[:, None]
        start = torch.where((rows >= 0) & (rows < h), start, self.zero_row)
        out = self.windows.index_select(0, start.flatten()).view(b, h, self.w, self.c)
        return out.permute(0, 3, 1, 2)  # NHWC memory viewed as NCHW: channels-last


def flip_translate(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One batch through FlipTranslate: (B, C, H, W) in, channels-last (B, C, H, W) out."""
    return FlipTranslate(x)(torch.arange(len(x), device=x.device), gen)


# name -> what a loader builds from its images once; it then maps (indices, generator) to
# an augmented batch
AUGMENTATIONS: dict[str, Callable[[torch.Tensor], FlipTranslate] | None] = {
    "none": None,
    "flip-translate": FlipTranslate,
}
assert set(AUGMENTATIONS) == set(AUGMENT_CHOICES), set(AUGMENTATIONS) ^ set(AUGMENT_CHOICES)


def stream_seed(*parts: int) -> int:
    """One 63-bit seed per (seed, epoch, stream, ...): distinct streams never share a seed."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class DeviceLoader:
    """Iterates (images, labels) batches of tensors that already live on the device.

    Training (`shuffle=True`): each epoch is one permutation drawn on the device from
    (seed, epoch); under DDP every rank draws the same one and takes every world_size-th
    image of it, so the shards are disjoint, and all ranks get len // world_size images and
    the same number of steps (the few left over differ from epoch to epoch).
    Evaluation (`shuffle=False`): every image exactly once across the ranks, in as many
    batches on every rank.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: str = "none",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = True,
    ) -> None:
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment={augment!r}: valid values are {', '.join(AUGMENTATIONS)}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = AUGMENTATIONS[augment]
        self._augmenter: FlipTranslate | None = None  # built on first use, kept for all epochs
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.channels_last = channels_last
        self.epoch = 0

    # Lightning calls `sampler.set_epoch(epoch)` on a loader before each training epoch, as
    # for a DistributedSampler; so the order follows the trainer's epoch, resumed runs too.
    @property
    def sampler(self) -> DeviceLoader:
        return self

    batch_sampler = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _per_rank(self) -> int:
        n, w = len(self.x), self.world_size
        return n // w if self.shuffle else -(-n // w)

    def __len__(self) -> int:
        return -(-self._per_rank() // self.batch_size)

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's image order for `epoch`; the same seed and epoch give the same order."""
        dev = self.x.device
        n = len(self.x)
        if self.shuffle:
            gen = torch.Generator(device=dev).manual_seed(stream_seed(self.seed, epoch, 0))
            order = torch.randperm(n, device=dev, generator=gen)
            order = order[: self._per_rank() * self.world_size]
        else:
            order = torch.arange(n, device=dev)
        return order[self.rank :: self.world_size]

    def batches(self, epoch: int) -> list[torch.Tensor]:
        """This rank's index batches for `epoch`."""
        order = self.indices(epoch)
        if self.world_size > 1 and not self.shuffle:
            # eval shards differ by up to one image; equal batch counts keep ranks in step
            return [b for b in order.tensor_split(len(self)) if len(b)]
        return list(order.split(self.batch_size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1  # for plain iteration; Lightning sets it through set_epoch
        gen = None
        if self.augment is not None:
            if self._augmenter is None:
                self._augmenter = self.augment(self.x)
            gen = torch.Generator(device=self.x.device)
            gen.manual_seed(stream_seed(self.seed, epoch, 1, self.rank))
        for idx in self.batches(epoch):
            if gen is not None:
                xb = self._augmenter(idx, gen)
            else:
                xb = self.x[idx]
                if self.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, self.y[idx]
