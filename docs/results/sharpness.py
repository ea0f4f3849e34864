"""The sharpness of the training loss (its Hessian's top eigenvalue) early in a run, against
the step size SGD with momentum can take without diverging.

    .venv/bin/python docs/results/sharpness.py > docs/results/sharpness.txt

All-CNN-C, width 0.25, no dropout, no normalisation, lr 0.01, momentum 0.9, seeds 0-2: the
synthetic set and Fashion-MNIST (GCN + ZCA, 5,000 training images). After 0, 20 and 40 SGD
steps, power iteration (20 Hessian-vector products) on the first 512 training images.
Heavy-ball SGD is stable along a direction of curvature lam only while
lam < 2 (1 + momentum) / lr = 380.
"""

import torch
import torch.nn.functional as F

from ablations import run
from ablations import settings as S

LR, MOMENTUM, STEPS = 0.01, 0.9, (0, 20, 40)


def top_eigenvalue(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    params = list(net.parameters())
    grads = torch.autograd.grad(F.cross_entropy(net(x), y), params, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    lam = 0.0
    for _ in range(20):
        norm = torch.sqrt(sum((a * a).sum() for a in v))
        v = [a / norm for a in v]
        hv = torch.autograd.grad(grads, params, v, retain_graph=True)
        lam = float(sum((a * b).sum() for a, b in zip(hv, v)))
        v = [h.detach() for h in hv]
    return lam


def sharpness(data: list[str], seed: int) -> list[float]:
    base = ["model.variant=all-cnn", "model.width=0.25", "model.dropout=none", f"seed={seed}"]
    settings = S.resolve(S.parse_assignments(base + data))
    dm, module, _ = run.prepare(settings)
    net = module.net.float()
    x, y = dm.splits["train"]
    probe = (x[:512].contiguous(), y[:512])
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=1e-3)
    batches, done, out = iter(dm.train_dataloader()), 0, []
    for k in STEPS:
        while done < k:
            xb, yb = next(batches)
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
        out.append(top_eigenvalue(net, *probe))
    return out


def main() -> None:
    torch.set_num_threads(1)
    print(f"bound 2 (1 + {MOMENTUM}) / {LR} = {2 * (1 + MOMENTUM) / LR:.0f}; steps {STEPS}")
    for name, data in (
        ("synthetic", ["data.dataset=synthetic"]),
        ("fashion-mnist", ["data.dataset=fashion-mnist", "data.subset=5000"]),
    ):
        for seed in (0, 1, 2):
            values = ", ".join(f"{v:.0f}" for v in sharpness(data, seed))
            print(f"{name:<14} seed {seed}: {values}", flush=True)


if __name__ == "__main__":
    main()
