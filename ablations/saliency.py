"""The torch side of `ablate visualize` (ablations/visualize.py): load a run's network and
its test images as it saw them, compute Captum's maps, draw the figures.

Captum overrides the ReLUs' gradients with hooks, which in-place ReLUs break (its docs say
so): the network is copied with every ReLU made out-of-place before any attribution.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from ablations.settings import from_recorded, recorded, resolve
from ablations.visualize_spec import LAYER_ALIASES, METHODS, VisualizeError


@dataclass
class Loaded:
    name: str  # the model's name, e.g. All-CNN-C
    label: str  # what the figure calls it: name, seed, trial
    net: nn.Module  # eval mode, out-of-place ReLUs
    images: torch.Tensor  # preprocessed test images, NCHW
    labels: torch.Tensor
    shown: torch.Tensor  # the same images for display, in [0, 1], NHWC
    classes: list[str]


def load_run(run_dir: Path, label: str | None = None) -> Loaded:
    """The trained network of a run folder, and its test images as it saw them."""
    from datamodules import AllConvDataModule
    from lightning_modules.module import AllConvModule

    settings_file, ckpt = run_dir / "settings.yaml", run_dir / "checkpoints" / "last.ckpt"
    if not settings_file.is_file():
        raise VisualizeError(f"{run_dir}: no settings.yaml; give a run folder or a study name")
    if not ckpt.is_file():
        raise VisualizeError(f"{run_dir}: no checkpoint at {ckpt.relative_to(run_dir)}")
    settings = resolve(from_recorded(yaml.safe_load(settings_file.read_text())))
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    # the statistics the run used, saved with its checkpoint; older checkpoints lack them,
    # and the same images and seed fit them again (or the preprocessing cache has them)
    saved = checkpoint.get("AllConvDataModule") or {}
    data = {k.removeprefix("data."): v for k, v in settings.items() if k.startswith("data.")}
    dm = AllConvDataModule(data, seed=settings["seed"])
    dm.load(stats=saved.get("stats"))
    module = AllConvModule(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    flat = recorded(settings, module.spec)
    net = _out_of_place(module.net).eval()
    x, y = dm.splits["test"]
    x = x.contiguous()
    raw_low, raw_high = x.amin(dim=(0, 2, 3), keepdim=True), x.amax(dim=(0, 2, 3), keepdim=True)
    shown = ((x - raw_low) / (raw_high - raw_low).clamp_min(1e-8)).permute(0, 2, 3, 1)
    name = flat["model.name"]
    return Loaded(
        name=name,
        label=label or f"{name} (seed {flat['seed']})",
        net=net,
        images=x,
        labels=y,
        shown=shown,
        classes=list(dm.class_names),
    )


def _out_of_place(net: nn.Module) -> nn.Module:
    net = copy.deepcopy(getattr(net, "_orig_mod", net)).float()
    for m in net.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return net.to(memory_format=torch.contiguous_format)


# --- the maps -----------------------------------------------------------------------------------


def attributions(net: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each method's map of `x` for class `target`, the shape of `x`."""
    from captum import attr

    out = {}
    for title, cls in METHODS.items():
        method = getattr(attr, cls)(net)
        kwargs = {"abs": False} if cls == "Saliency" else {}
        out[title] = method.attribute(x.clone().requires_grad_(True), target=target, **kwargs)
    return {k: v.detach() for k, v in out.items()}


class _Unit(nn.Module):
    """One unit of a layer, as a network output: its strongest activation in each image."""

    def __init__(self, net: nn.Module, layer: nn.Module, unit: int) -> None:
        super().__init__()
        self.net, self.unit = net, unit
        self._out: torch.Tensor | None = None
        layer.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self._out = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.net(x)
        a = self._out[:, self.unit]
        return a.flatten(1).amax(dim=1, keepdim=True)


def find_layer(net: nn.Module, layer: str) -> tuple[str, nn.Module]:
    path = LAYER_ALIASES.get(layer, layer)
    modules = dict(net.named_modules())
    if path not in modules or not path:
        shown = ", ".join([*LAYER_ALIASES, *(n for n in modules if n.count(".") <= 2 and n)])
        raise VisualizeError(f"--layer {layer!r} is not a layer of the network; try one of {shown}")
    return path, modules[path]


def top_units(
    loaded: Loaded, layer: str, units: int, pool: int
) -> tuple[str, list[tuple[int, int, torch.Tensor]]]:
    """(layer path, [(unit, image index, guided-backprop reconstruction)]) for the `units`
    units with the highest activation over the first `pool` test images."""
    from captum.attr import GuidedBackprop

    path, module = find_layer(loaded.net, layer)
    kept = {}
    handle = module.register_forward_hook(lambda m, i, o: kept.update(out=o.detach()))
    with torch.no_grad():
        loaded.net(loaded.images[:pool])
    handle.remove()
    act = kept["out"]
    if act.dim() != 4:
        raise VisualizeError(f"--layer {layer!r} gives {tuple(act.shape)[1:]}, not feature maps")
    peak = act.flatten(2).amax(dim=2)  # image x unit
    best_units = peak.amax(dim=0).topk(min(units, peak.shape[1])).indices.tolist()
    out = []
    for unit in best_units:
        image = int(peak[:, unit].argmax())
        wrapper = _Unit(loaded.net, module, unit)
        x = loaded.images[image : image + 1].clone().requires_grad_(True)
        recon = GuidedBackprop(wrapper).attribute(x, target=0).detach()
        out.append((unit, image, recon[0]))
    return path, out


# --- figures ------------------------------------------------------------------------------------


def _show(m: torch.Tensor) -> torch.Tensor:
    """A signed map as an image: 0 grey, each map scaled by its own largest |value|."""
    m = m.permute(1, 2, 0) if m.dim() == 3 else m
    scale = m.abs().max().clamp_min(1e-12)
    img = 0.5 + 0.5 * m / scale
    return img[..., 0] if img.shape[-1] == 1 else img


def _image(ax, img: torch.Tensor, title: str | None = None) -> None:
    img = img.cpu().numpy()
    ax.imshow(img, cmap="gray" if img.ndim == 2 or img.shape[-1] == 1 else None, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def _save(plt, fig, caption: str, paths: list[Path]) -> str:
    """The caption on top, each file written, the figure closed."""
    fig.suptitle(caption, fontsize=7, wrap=True)
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return caption


def maps_figure(models: list[Loaded], indices: list[int], paths: list[Path]) -> str:
    from ablations.export.figures import pyplot

    plt = pyplot()
    cols = 1 + len(models) * len(METHODS)
    fig, axes = plt.subplots(
        len(indices), cols, figsize=(1.1 * cols, 1.2 * len(indices) + 0.6), squeeze=False
    )
    first = models[0]
    for r, i in enumerate(indices):
        _image(
            axes[r][0],
            first.shown[i].squeeze(-1) if first.shown.shape[-1] == 1 else first.shown[i],
            "input" if r == 0 else None,
        )
        axes[r][0].set_ylabel(f"#{i} {first.classes[int(first.labels[i])]}", fontsize=7)
    for c, model in enumerate(models):
        x = model.images[indices]
        with torch.no_grad():
            pred = model.net(x).argmax(dim=1)
        maps = attributions(model.net, x, pred)
        for k, title in enumerate(METHODS):
            col = 1 + c * len(METHODS) + k
            for r in range(len(indices)):
                head = f"{model.name}\n{title}" if r == 0 else None
                _image(axes[r][col], _show(maps[title][r]), head)
                axes[r][col].set_xlabel(f"pred {model.classes[int(pred[r])]}", fontsize=6)
    caption = (
        f"Maps for the predicted class: {', '.join(METHODS)}. Models: "
        f"{'; '.join(m.label for m in models)}. Test images {', '.join(map(str, indices))}."
    )
    return _save(plt, fig, caption, paths)


def layer_figure(models: list[Loaded], layer: str, units: int, pool: int, paths: list[Path]) -> str:
    from ablations.export.figures import pyplot

    plt = pyplot()
    rows = [(m, *top_units(m, layer, units, pool)) for m in models]
    fig, axes = plt.subplots(
        len(models), 2 * units, figsize=(1.1 * 2 * units, 1.3 * len(models) + 0.6), squeeze=False
    )
    for r, (model, path, found) in enumerate(rows):
        for k in range(units):
            a, b = axes[r][2 * k], axes[r][2 * k + 1]
            if k >= len(found):
                a.axis("off"), b.axis("off")
                continue
            unit, image, recon = found[k]
            shown = model.shown[image]
            _image(
                a, shown.squeeze(-1) if shown.shape[-1] == 1 else shown, f"unit {unit}: #{image}"
            )
            _image(b, _show(recon), "guided backprop")
        axes[r][0].set_ylabel(f"{model.name}\n{path}", fontsize=7)
    caption = (
        f"Layer {layer}: the {units} units with the highest activation over {pool} test images, "
        f"the image that drives each hardest and its guided-backpropagation reconstruction. "
        f"Models: {'; '.join(m.label for m in models)}."
    )
    return _save(plt, fig, caption, paths)
