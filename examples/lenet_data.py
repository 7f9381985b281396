"""MNIST / Fashion-MNIST for examples/train_lenet.py, loaded through torchvision's datasets.

MNIST comes from --data-dir or a download; Fashion-MNIST also from Debian's
`dataset-fashion-mnist` package, whose gzipped IDX files are extracted into
<data-dir>/FashionMNIST/raw/ on first use (torchvision reads them from there).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DOWNLOAD_TIMEOUT_S = 5.0  # per connection; offline runs should not wait long
# Per-dataset pixel mean and std (of the training images scaled to [0, 1]).
STATS = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}
HOW_TO_GET = ("apt-get install dataset-fashion-mnist, or put MNIST's IDX files under "
              "DATA_DIR/MNIST/raw/")


class NoDataError(Exception):
    """No data set could be found or fetched; the message says how to get one."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 (N, 1, 28, 28)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Data:
    name: str  # "mnist" or "fashion-mnist"
    train: Split
    test: Split
    note: str  # how it was found, for the log

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = STATS[self.name]
        return (images.float() / 255.0 - mean) / std


def load(dataset: str, data_dir: str | Path, *, download: bool) -> Data:
    """dataset is "auto", "mnist" or "fashion-mnist"; "auto" prefers MNIST when it is at hand."""
    root = Path(data_dir)
    if dataset in ("auto", "mnist"):
        data = _mnist(root, download)
        if data is not None:
            return data
        if dataset == "mnist":
            how = "download failed" if download else "download disabled"
            raise NoDataError(f"no MNIST under {root / 'MNIST' / 'raw'} ({how}); put MNIST's IDX files "
                              "there, or apt-get install dataset-fashion-mnist and use --dataset "
                              "fashion-mnist")
    data = _fashion(root, download)
    if data is not None:
        if dataset == "auto":
            data = Data(data.name, data.train, data.test, f"{data.note}; no MNIST under {root}")
        return data
    raise NoDataError(f"no MNIST or Fashion-MNIST under {root} and none to download; {_how(root)}")


def _how(root: Path) -> str:
    return "get one with: " + HOW_TO_GET.replace("DATA_DIR", str(root))


def _mnist(root: Path, download: bool) -> Data | None:
    return _find("mnist", "MNIST", torchvision.datasets.MNIST, root, download)


def _fashion(root: Path, download: bool) -> Data | None:
    return _find("fashion-mnist", "Fashion-MNIST", torchvision.datasets.FashionMNIST, root, download,
                 debian_raw=root / "FashionMNIST" / "raw")


def _find(name: str, title: str, cls, root: Path, download: bool, debian_raw: Path | None = None):
    """The data set from `root`; else extracted from Debian's package (if it has one); else
    downloaded (if allowed); else None."""
    found = _open(cls, root, download=False)
    if found is not None:
        return _data(name, found, f"{title} from {root}")
    if debian_raw is not None and _extract_debian(debian_raw):
        found = _open(cls, root, download=False)
        if found is not None:
            return _data(name, found, f"{title} extracted from {DEBIAN_FASHION_MNIST}")
    if download:
        fetched = _open(cls, root, download=True)
        if fetched is not None:
            return _data(name, fetched, f"{title} downloaded into {root}")
    return None


def _open(cls, root: Path, *, download: bool):
    """Both splits of a torchvision data set, or None where they are missing and not fetched."""
    try:
        if not download:
            return cls(root, train=True), cls(root, train=False)
        # Offline, a download must fail fast and quietly: torchvision prints each mirror it
        # tries, and a socket without a timeout can hang on a filtered network.
        before = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                return cls(root, train=True, download=True), cls(root, train=False, download=True)
        finally:
            socket.setdefaulttimeout(before)
    except (RuntimeError, OSError):
        return None


def _extract_debian(raw: Path) -> bool:
    """Gunzip Debian's Fashion-MNIST IDX files into `raw`; False where the package is absent."""
    sources = [DEBIAN_FASHION_MNIST / f"{name}.gz" for name in IDX_FILES]
    if not all(s.is_file() for s in sources):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for source, name in zip(sources, IDX_FILES, strict=True):
        target = raw / name
        if target.exists():
            continue
        # Write beside the target and rename, so an interrupted run leaves no truncated file
        # that torchvision would later take for the real one.
        tmp = target.with_name(f"{name}.tmp{os.getpid()}")
        with gzip.open(source, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, target)
    return True


def _data(name: str, splits, note: str) -> Data:
    train, test = splits
    return Data(name, _split(train), _split(test), note)


def _split(ds) -> Split:
    # Keep torchvision's uint8 tensors and batch them by index: per-item PIL transforms through a
    # DataLoader would cost more than a LeNet step on a small CPU.
    return Split(ds.data.unsqueeze(1).contiguous(), ds.targets.long())


def batches(split: Split, batch_size: int, *, limit: int | None = None,
            generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) batches, shuffled when a generator is given; at most `limit`."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else None
    count = num_batches(n, batch_size, limit)
    for i in range(count):
        sl = slice(i * batch_size, min((i + 1) * batch_size, n))
        idx = order[sl] if order is not None else sl
        yield split.images[idx], split.labels[idx]


def num_batches(n: int, batch_size: int, limit: int | None) -> int:
    count = -(-n // batch_size)
    return count if limit is None else min(count, limit)
