"""Raw datasets as uint8 NHWC arrays: CIFAR-10/100 pickles, Fashion-MNIST IDX, synthetic."""

from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A dataset that is absent, malformed or asked for wrongly; the message says which."""


@dataclass
class RawData:
    train_x: np.ndarray  # (N, H, W, C) uint8
    train_y: np.ndarray  # (N,) int64
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str]
    files: list[str] = field(default_factory=list)  # what was read, for provenance


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def offline() -> bool:
    return os.environ.get("ALLCONV_OFFLINE", "") not in ("", "0")


def _download(root: Path, fetch: Callable[[Path], Path], dest: Path) -> str | None:
    """Run a torchvision download in a scratch folder under `root`, then move what it
    unpacked into `dest`; return why it failed, or None.

    A failed or interrupted download leaves nothing behind: no partial archive that a later
    run would have to notice, and no `root` that was not there before.
    """
    if offline():
        return "no download tried, as ALLCONV_OFFLINE is set"
    made = [p for p in (root, *root.parents) if not p.exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
            unpacked = fetch(Path(tmp))
            dest.mkdir(parents=True, exist_ok=True)
            for f in unpacked.iterdir():
                if f.is_file() and not (dest / f.name).exists():
                    os.replace(f, dest / f.name)
    except Exception as err:  # no network, DNS, HTTP, disk: all mean "not here"
        for p in made:  # innermost first
            with contextlib.suppress(OSError):
                p.rmdir()
        return f"the torchvision download failed ({type(err).__name__}: {err})"
    return None


# --- CIFAR ---------------------------------------------------------------------------------

CIFAR = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        meta="batches.meta",
        labels="labels",
        names="label_names",
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train=["train"],
        test=["test"],
        meta="meta",
        labels="fine_labels",
        names="fine_label_names",
    ),
}


# The only globals the official CIFAR archives (and numpy arrays pickled by any numpy) name.
# Anything else in a "CIFAR" file is refused before it is called: unpickling runs code.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2
}


class _ArchiveUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise DataError(
                f"refused to load {module}.{name}: a CIFAR archive holds only dicts, lists, "
                "bytes, strings, numbers and numpy arrays"
            )
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArchiveUnpickler(f, encoding="bytes").load()
    except DataError as err:
        raise DataError(f"{path}: {err}") from None
    except Exception as err:
        raise DataError(
            f"{path}: not a readable CIFAR pickle ({type(err).__name__}: {err}); "
            "the archive may be truncated, unpack it again"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batches(
    folder: Path, names: list[str], label_key: str, n_classes: int
) -> tuple[np.ndarray, ...]:
    xs, ys = [], []
    for name in names:
        path = folder / name
        batch = _unpickle(path)
        if "data" not in batch or label_key not in batch:
            raise DataError(f"{path}: missing 'data' or {label_key!r} (keys: {sorted(batch)})")
        try:
            data = np.asarray(batch["data"], dtype=np.uint8)
            labels = np.asarray(batch[label_key], dtype=np.int64)
        except (TypeError, ValueError) as err:
            raise DataError(f"{path}: 'data' or {label_key!r} is not numeric ({err})") from None
        if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),):
            raise DataError(
                f"{path}: data has shape {data.shape} with labels of shape {labels.shape}; "
                "expected (N, 3072) with N labels"
            )
        _check_labels(path, labels, n_classes)
        # each row: 1024 red, 1024 green, 1024 blue bytes, each plane row-major
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels)
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


def _cifar_missing(name: str, root: Path, missing: list[Path], why: str) -> DataError:
    info = CIFAR[name]
    folder = root / info["folder"]
    return DataError(
        f"{name} not found: looked in {folder} for {', '.join(p.name for p in missing)}; "
        f"{why}. Get {info['archive']} from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html and unpack it in {root} (giving "
        f"{folder}/), or set data.dir to the folder that holds {info['folder']}/"
    )


def load_cifar(name: str, root: Path, download: bool = True) -> RawData:
    info = CIFAR[name]
    folder = root / info["folder"]
    needed = [folder / f for f in (*info["train"], *info["test"], info["meta"])]
    missing = [p for p in needed if not p.exists()]
    if missing:
        why = "downloads are off"
        if download:
            import torchvision

            sets = torchvision.datasets
            cls = sets.CIFAR10 if name == "cifar10" else sets.CIFAR100

            def fetch(tmp: Path) -> Path:
                cls(str(tmp), train=True, download=True)
                return tmp / info["folder"]

            why = _download(root, fetch, folder) or "the download did not hold them"
        missing = [p for p in needed if not p.exists()]
        if missing:
            raise _cifar_missing(name, root, missing, why)
    meta_path = folder / info["meta"]
    meta = _unpickle(meta_path)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(info["names"], [])]
    if not names:
        raise DataError(f"{meta_path}: no {info['names']!r} (keys: {sorted(meta)})")
    train_x, train_y = _cifar_batches(folder, info["train"], info["labels"], len(names))
    test_x, test_y = _cifar_batches(folder, info["test"], info["labels"], len(names))
    raw = RawData(train_x, train_y, test_x, test_y, names, _provenance(needed))
    check(raw, {"train": folder / info["train"][0], "test": folder / info["test"][0]})
    return raw


# --- Fashion-MNIST (IDX) -------------------------------------------------------------------

FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
# The IDX files carry no names; these are Zalando's, in label order (the dataset's README).
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IDX_UBYTE = 0x08  # the IDX type code for unsigned bytes, the only one the datasets use


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes, gzipped (by its .gz name) or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot be read ({err}); the file may be truncated") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UBYTE:
        hint = "; it looks gzipped, so name it .gz" if raw[:2] == b"\x1f\x8b" else ""
        raise DataError(
            f"{path}: bad magic number {raw[:4].hex() or '(empty file)'}; expected "
            f"000008NN (IDX of unsigned bytes, NN dimensions){hint}"
        )
    ndim = raw[3]
    if ndim < 1 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: {len(raw)} bytes is too short for a {ndim}-dimension header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = 4 + 4 * ndim + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"{path}: {len(raw)} bytes, but the header's shape {shape} needs "
            f"{expected}; the file is truncated or corrupt"
        )
    # a writable copy: torch.from_numpy warns on (and must not write to) read-only buffers
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist_dirs(root: Path) -> list[Path]:
    """Where the four IDX files are looked for, in order."""
    return [
        root / "fashion-mnist",
        root,
        root / "FashionMNIST" / "raw",  # torchvision's own layout
        DEBIAN_FASHION_MNIST,
    ]


def load_fashion_mnist(root: Path, download: bool = True) -> RawData:
    def complete(folder: Path) -> dict[str, Path] | None:
        found = {k: _find_idx(folder, stem) for k, stem in FASHION_FILES.items()}
        return found if all(found.values()) else None

    places = fashion_mnist_dirs(root)
    found = next((f for f in map(complete, places) if f), None)
    if found is None:
        why = "downloads are off"
        if download:
            import torchvision

            def fetch(tmp: Path) -> Path:
                torchvision.datasets.FashionMNIST(str(tmp), train=True, download=True)
                return tmp / "FashionMNIST" / "raw"

            why = _download(root, fetch, places[0]) or "the download did not hold them"
            found = complete(places[0])
        if found is None:
            raise DataError(
                "fashion-mnist not found: looked in "
                + ", ".join(map(str, places))
                + f" for {', '.join(FASHION_FILES.values())} (.gz or not); {why}. "
                "Install Debian's package (apt-get install dataset-fashion-mnist, giving "
                f"{DEBIAN_FASHION_MNIST}), or put the four IDX files in {places[0]}"
            )
    arrays = {k: read_idx(p) for k, p in found.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"{found[split + '_x']}: images of shape {x.shape} do not match the labels "
                f"of shape {y.shape} in {found[split + '_y']}; expected (N, H, W) and (N,)"
            )
    for k in ("train_y", "test_y"):
        _check_labels(found[k], arrays[k], len(FASHION_CLASSES))
    raw = RawData(
        arrays["train_x"][..., None],
        arrays["train_y"].astype(np.int64),
        arrays["test_x"][..., None],
        arrays["test_y"].astype(np.int64),
        list(FASHION_CLASSES),
        _provenance(found.values()),
    )
    check(raw, {"train": found["train_x"], "test": found["test_x"]})
    return raw


# --- checks shared by every source ---------------------------------------------------------


def _provenance(paths) -> list[str]:
    return [os.path.abspath(p) for p in paths]


def _check_labels(path: Path, labels: np.ndarray, n_classes: int) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(
            f"{path}: labels run from {labels.min()} to {labels.max()}, but there are "
            f"{n_classes} classes (labels 0 to {n_classes - 1})"
        )


def check(raw: RawData, where: dict[str, Path]) -> None:
    """Both splits hold images, of one shape; `where` names the file to blame."""
    for split in ("train", "test"):
        if not len(getattr(raw, f"{split}_y")):
            raise DataError(f"{where[split]}: the {split} split has no images")
    if raw.train_x.shape[1:] != raw.test_x.shape[1:]:
        raise DataError(
            f"{where['test']}: test images are {raw.test_x.shape[1:]}, training images "
            f"{raw.train_x.shape[1:]}; both splits must have one shape"
        )


# --- synthetic -----------------------------------------------------------------------------


def make_synthetic(
    n_train: int = 8000,
    n_test: int = 1000,
    size: int = 32,
    channels: int = 3,
    classes: int = 10,
    seed: int = 1234,
    noise: float = 0.1,
) -> RawData:
    """Each class is a grating with its own orientation, frequency and colour, at a random
    phase, under pixel noise: learnable by a conv net in a few hundred steps, not by one pixel.

    Deterministic for a given seed, any size, channel count and class count.
    """
    rng = np.random.default_rng(seed)
    angle = np.pi * (np.arange(classes) % 5) / 5
    freq = (2 + 2 * (np.arange(classes) // 5 % 2)) / size  # cycles per pixel: 2 or 4 per image
    colour = rng.uniform(0.3, 1.0, size=(classes, channels))
    tint = rng.uniform(-1.0, 1.0, size=(classes, channels))  # a weak cue a GAP net finds fast
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, size=n)
        phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
        t = xx * np.cos(angle[y])[:, None, None] + yy * np.sin(angle[y])[:, None, None]
        wave = np.sin(2 * np.pi * freq[y][:, None, None] * t + phase)
        x = wave[..., None] * colour[y][:, None, None, :] + tint[y][:, None, None, :]
        x = x + rng.normal(scale=noise, size=x.shape)
        img = np.clip(128 + 50 * x, 0, 255).astype(np.uint8)
        return img, y.astype(np.int64)

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return RawData(
        train_x,
        train_y,
        test_x,
        test_y,
        [f"class{i}" for i in range(classes)],
        # the generator and its arguments stand in for a file (provenance and cache key)
        [
            f"synthetic-v2(n_train={n_train}, n_test={n_test}, size={size}, channels={channels}, "
            f"classes={classes}, seed={seed}, noise={noise})"
        ],
    )


def load_synthetic(root: Path, download: bool = True) -> RawData:
    return make_synthetic()


SOURCES: dict[str, Callable[[Path, bool], RawData]] = {
    "cifar10": lambda root, dl=True: load_cifar("cifar10", root, dl),
    "cifar100": lambda root, dl=True: load_cifar("cifar100", root, dl),
    "fashion-mnist": load_fashion_mnist,
    "synthetic": load_synthetic,
}
