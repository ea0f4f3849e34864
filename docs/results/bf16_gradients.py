"""bf16 autocast against 32-bit on the CPU: one batch's gradients at initialisation.

    .venv/bin/python docs/results/bf16_gradients.py

Prints, for All-CNN-C and Model C at width 0.25 (no dropout), channels-last and NCHW, the
cosine similarity of each parameter's gradient under bf16 autocast to its 32-bit gradient.
"""

import torch
import torch.nn.functional as F

from lightning_modules.family import ModelSpec
from lightning_modules.net import build


def grads(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> list:
    net.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = net(x)
    F.cross_entropy(out.float(), y).backward()
    return [p.grad.clone() for p in net.parameters()]


torch.set_num_threads(1)
torch.manual_seed(0)
for channels_last in (True, False):
    for spec in (
        ModelSpec(pooling="none", strided_conv="extra", width=0.25, dropout="none"),
        ModelSpec(width=0.25, dropout="none"),
    ):
        net = build(spec)
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)

        cos = [
            F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
            for a, b in zip(grads(net, x, y, False), grads(net, x, y, True))
        ]
        layout = "channels-last" if channels_last else "NCHW"
        print(f"{spec.name} {layout}: min cosine {min(cos):.3f} over {len(cos)} tensors")
