"""Zero-shot evaluation / calibration datasets behind one call, :func:`load_dataset`.

Every dataset comes back as a :class:`ZeroShotData`: the torch ``Dataset`` plus the class names and prompt
templates that turn it into a zero-shot task, so callers never special-case a dataset. Loaders live in a small
registry (:data:`_REGISTRY`); :data:`DATASETS` lists its names for the CLI's ``--dataset`` choices.

Nothing here downloads anything unless asked (``download=True`` for CIFAR-100); a missing or broken dataset raises
:class:`~p4q_engine.errors.DatasetError` and a missing option :class:`~p4q_engine.errors.ConfigError`, each with
a one-line message the CLI can print.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from torch.utils.data import Dataset, Subset

from p4q_engine.data.classnames import CIFAR100_CLASSNAMES, CIFAR_TEMPLATES
from p4q_engine.errors import ConfigError, DatasetError

__all__ = [
    "ZeroShotData",
    "load_dataset",
    "DATASETS",
    "SPLITS",
    "DEFAULT_TEMPLATES",
    "SUBSET_SEED",
    "decode_image",
    "deterministic_subset",
]

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
SUBSET_SEED = 0  # fixed: ``size=N`` must select the same images in every run, process and machine
CLASSNAMES_FILE = "classnames.txt"
_TRAIN_SPLITS = ("train", "calib")
# Sub-folders tried, in order, for a split of a folder dataset (calib images come from the train set).
_SPLIT_DIRS: dict[str, tuple[str, ...]] = {"train": ("train",), "calib": ("calib", "train"), "test": ("test", "val")}


@dataclass
class ZeroShotData:
    """A dataset yielding ``(image, label)`` plus what zero-shot classification needs: ``classnames[label]`` is
    the label's name and each template is a ``str.format`` pattern with one ``{}``. ``image`` is
    ``transform(PIL image)``; the raw PIL image when no transform was given (torchvision convention)."""

    dataset: Dataset
    classnames: list[str]
    templates: tuple[str, ...]
    name: str


class _Entry(NamedTuple):
    loader: Callable[..., ZeroShotData]
    splits: tuple[str, ...]
    adapt: tuple[str, str] = ("train", "test")  # (train, eval) splits for P4Q / CoOp / linear-probe training


# ---------------------------------------------------------------- helpers
def _require_root(name: str, data_root: Optional[str]) -> Path:
    """Public datasets are never fetched implicitly, so the user must say where they live."""
    if not data_root:
        raise ConfigError(f"--data-root is required for {name}")
    return Path(data_root).expanduser()


def decode_image(path: str):
    """``ImageFolder`` loader that turns an undecodable file into a :class:`DatasetError` naming the file, instead of
    a PIL traceback deep inside a DataLoader worker. Module-level so DataLoader workers can pickle it."""
    from PIL import UnidentifiedImageError
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot decode image {path}: {type(e).__name__}: {_short(e)}") from e


def _short(e: BaseException, limit: int = 200) -> str:
    """One line, bounded: torchvision lists every class folder in some messages (1000 for ImageNet)."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _image_folder(root: Path, transform):
    """torchvision ImageFolder with the decoding loader. Empty class folders are allowed (a class needs no images
    to be a zero-shot candidate, and labels must keep following the full sorted folder list), but a tree with no
    images at all, or no class folders, is a DatasetError."""
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    try:
        ds = ImageFolder(str(root), transform=transform, loader=decode_image, allow_empty=True)
    except (FileNotFoundError, OSError) as e:
        raise DatasetError(
            f"{root} is not an image-folder dataset (one sub-folder of images per class): {_short(e)}"
        ) from e
    if len(ds) == 0:
        raise DatasetError(f"{root} has {len(ds.classes)} class folders but no images")
    return ds


def _folder_classnames(data_root: Path, classes: list[str]) -> list[str]:
    """Names from ``data_root/classnames.txt`` (one per line, sorted-folder order) or the folder names with
    ``_`` -> space: folder names are often identifiers, and a prompt needs words."""
    path = data_root / CLASSNAMES_FILE
    if not path.is_file():
        return [c.replace("_", " ") for c in classes]
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    names = [n for n in names if n]
    if len(names) != len(classes):
        raise DatasetError(f"{path} lists {len(names)} class names but {data_root} has {len(classes)} class folders")
    return names


def _split_dir(data_root: Path, split: str) -> Path:
    """``data_root/<split>`` (or its alias: val for test, train for calib) when present, else ``data_root``."""
    for sub in _SPLIT_DIRS[split]:
        if (data_root / sub).is_dir():
            return data_root / sub
    return data_root


def deterministic_subset(dataset: Dataset, size: Optional[int], seed: int = SUBSET_SEED) -> Dataset:
    """The first ``size`` items of a fixed-seed permutation: a class-balanced-in-expectation subset (folder
    datasets are sorted by class, so a prefix would be a handful of classes) that is identical across runs."""
    if size is None:
        return dataset
    n = len(dataset)
    if size >= n:
        return dataset
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, perm[:size].tolist())


# ---------------------------------------------------------------- loaders
def _load_cifar100(split: str, data_root: Optional[str], transform, download: bool, size: Optional[int]):
    """torchvision's CIFAR-100 (python pickle version); test = the 10k test set, train/calib = the 50k train set."""
    from torchvision.datasets import CIFAR100

    root = _require_root("cifar100", data_root)
    folder = root / CIFAR100.base_folder
    if not download and not folder.is_dir():
        raise DatasetError(
            f"CIFAR-100 not found: no {folder}; pass --download on an online machine or point "
            f"--data-root at the folder that contains the extracted {CIFAR100.base_folder}/"
        )
    try:
        ds = CIFAR100(root=str(root), train=split in _TRAIN_SPLITS, download=download, transform=transform)
    except (RuntimeError, OSError, ValueError, EOFError, KeyError) as e:
        # RuntimeError: torchvision's md5 check ("not found or corrupted"); URLError (an OSError) when offline.
        hint = "" if download else "; pass --download on an online machine to fetch a fresh copy"
        raise DatasetError(f"cannot load CIFAR-100 from {folder}: {_short(e)}{hint}") from e
    found = [c.replace("_", " ") for c in ds.classes]
    if found != list(CIFAR100_CLASSNAMES):
        raise DatasetError(
            f"{folder}/meta does not list the 100 CIFAR-100 fine labels in torchvision's order "
            f"(first names: {found[:3]})"
        )
    return ZeroShotData(deterministic_subset(ds, size), list(CIFAR100_CLASSNAMES), CIFAR_TEMPLATES, "cifar100")


def _load_imagenet(split: str, data_root: Optional[str], transform, download: bool, size: Optional[int]):
    """ILSVRC-2012 as class folders: ``data_root/val`` (test) or ``data_root/train`` (train, calib)."""
    from p4q_engine.data.classnames import IMAGENET_CLASSNAMES, IMAGENET_TEMPLATES

    root = _require_root("imagenet", data_root)
    sub = "train" if split in _TRAIN_SPLITS else "val"
    folder = root / sub
    if not folder.is_dir():
        raise DatasetError(
            f"ImageNet {sub} folder not found: {folder} (expected {sub}/<wnid>/*.JPEG, with the "
            "validation images sorted into class folders)"
        )
    ds = _image_folder(folder, transform)
    if len(ds.classes) == len(IMAGENET_CLASSNAMES):
        names = list(IMAGENET_CLASSNAMES)  # sorted wnid order == open_clip's (OpenAI's) class order
    else:
        log.warning(
            "%s has %d class folders, not 1000: using %s or folder names as class names",
            folder,
            len(ds.classes),
            CLASSNAMES_FILE,
        )
        names = _folder_classnames(root, ds.classes)
    return ZeroShotData(deterministic_subset(ds, size), names, IMAGENET_TEMPLATES, "imagenet")


def _load_imagefolder(split: str, data_root: Optional[str], transform, download: bool, size: Optional[int]):
    """Any ``root/<class>/<image>`` tree (optionally one per split under ``root/<split>``)."""
    root = _require_root("imagefolder", data_root)
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    ds = _image_folder(_split_dir(root, split), transform)
    return ZeroShotData(
        deterministic_subset(ds, size), _folder_classnames(root, ds.classes), DEFAULT_TEMPLATES, "imagefolder"
    )


def _load_reference(split: str, data_root: Optional[str], transform, download: bool, size: Optional[int]):
    """The embedded synthetic task: rendered on the fly, so it needs no files and ``size`` is passed straight
    through (its labels are round-robin over the split's classes, so any prefix is balanced)."""
    from p4q_engine.data.reference import ReferenceDataset  # lazy: written separately, heavy-ish import

    ds = ReferenceDataset(split, size=size, transform=transform)
    return ZeroShotData(ds, list(ds.classnames), tuple(ds.templates), "reference")


_REGISTRY: dict[str, _Entry] = {
    "reference": _Entry(
        _load_reference, ("train", "calib", "test", "test_seen", "adapt", "adapt_test"), ("adapt", "adapt_test")
    ),
    "cifar100": _Entry(_load_cifar100, ("train", "calib", "test")),
    "imagenet": _Entry(_load_imagenet, ("train", "calib", "test")),
    "imagefolder": _Entry(_load_imagefolder, ("train", "calib", "test")),
}
DATASETS: tuple[str, ...] = tuple(_REGISTRY)
SPLITS: dict[str, tuple[str, ...]] = {k: v.splits for k, v in _REGISTRY.items()}


def adaptation_splits(name: str) -> tuple[str, str]:
    """``(train, eval)`` splits used to *train* on a dataset (P4Q, CoOp, linear probes): the labelled training
    images and the test images of the same classes. The reference task uses ``adapt``/``adapt_test`` (all 100
    classes); its ``train``/``test`` splits are for contrastive pre-training and held-out zero-shot."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ConfigError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return entry.adapt


def load_dataset(
    name: str,
    split: str = "test",
    data_root: Optional[str] = None,
    transform=None,
    download: bool = False,
    size: Optional[int] = None,
) -> ZeroShotData:
    """Load split ``split`` of dataset ``name`` (one of :data:`DATASETS`).

    ``data_root`` is required for the on-disk datasets; ``download`` only applies to CIFAR-100; ``size`` selects a
    deterministic subset (see :func:`deterministic_subset`). Raises ConfigError for a bad name/split/size and
    DatasetError when the data is missing or unreadable.
    """
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ConfigError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if split not in entry.splits:
        raise ConfigError(f"unknown split {split!r} for {name}; choose from {', '.join(entry.splits)}")
    if size is not None and (isinstance(size, bool) or int(size) != size or size < 1):
        raise ConfigError(f"dataset size must be a positive integer, got {size!r}")
    if data_root is not None:
        data_root = os.fspath(data_root)
    return entry.loader(split, data_root, transform, download, None if size is None else int(size))
