"""The device-resident loader: the split is one tensor on the device; batches are index cuts.

No per-image Python and no worker processes: a permutation per epoch, drawn on the device,
and augmentation vectorised over the batch (after airbench).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

MAX_SHIFT = 5  # px, the paper's translations for the augmented CIFAR-10 result


def flip_translate(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flip half the images left-right, shift each by up to 5 px in x and y, zero fill."""
    b, c, h, w = x.shape
    dev = x.device
    flip = torch.rand(b, device=dev, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    shift = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (2, b), device=dev, generator=gen)
    padded = torch.nn.functional.pad(x, (MAX_SHIFT,) * 4)
    rows = torch.arange(h, device=dev) + MAX_SHIFT - shift[0][:, None]  # (B, H)
    cols = torch.arange(w, device=dev) + MAX_SHIFT - shift[1][:, None]  # (B, W)
    batch = torch.arange(b, device=dev)[:, None, None]
    # advanced indices around a slice put their dims first: (B, H, W, C), which permuted
    # back to (B, C, H, W) is exactly the channels-last layout the model runs in
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None] = {
    "none": None,
    "flip-translate": flip_translate,
}


class DeviceLoader:
    """Iterates (images, labels) batches of tensors that already live on the device."""

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
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = AUGMENTATIONS[augment]
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.channels_last = channels_last
        self.epoch = 0

    def _per_rank(self) -> int:
        # every rank gets the same number of images so DDP steps stay in lockstep
        return len(self.x) // self.world_size if self.world_size > 1 else len(self.x)

    def __len__(self) -> int:
        return -(-self._per_rank() // self.batch_size)

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's image order for `epoch`; the same seed and epoch give the same order."""
        dev = self.x.device
        n = len(self.x)
        if self.shuffle:
            gen = torch.Generator(device=dev).manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(n, device=dev, generator=gen)
        else:
            order = torch.arange(n, device=dev)
        if self.world_size > 1:
            order = order[: self._per_rank() * self.world_size][self.rank :: self.world_size]
        return order

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        order = self.indices(epoch)
        gen = None
        if self.augment is not None:
            gen = torch.Generator(device=self.x.device)
            gen.manual_seed(self.seed * 100_003 + epoch + 7919 * (self.rank + 1))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            xb, yb = self.x[idx], self.y[idx]
            if gen is not None:
                xb = self.augment(xb, gen)
            elif self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb
