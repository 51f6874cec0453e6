"""load_dataset: CIFAR-100 in torchvision's on-disk format, image folders, errors, subsets (all offline)."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from p4q_engine.data import datasets as D
from p4q_engine.data.classnames import CIFAR100_CLASSNAMES, CIFAR_TEMPLATES
from p4q_engine.data.datasets import DATASETS, ZeroShotData, load_dataset
from p4q_engine.errors import ConfigError, DatasetError

FINE_LABEL_NAMES = [n.replace(" ", "_") for n in CIFAR100_CLASSNAMES]


# ---------------------------------------------------------------- class names / templates
def test_cifar100_classnames_and_templates():
    assert len(CIFAR100_CLASSNAMES) == 100 and len(set(CIFAR100_CLASSNAMES)) == 100
    assert list(CIFAR100_CLASSNAMES) == sorted(CIFAR100_CLASSNAMES)  # torchvision's label order is alphabetical
    assert CIFAR100_CLASSNAMES[1] == "aquarium fish" and "maple tree" in CIFAR100_CLASSNAMES
    assert all("_" not in n for n in CIFAR100_CLASSNAMES)
    assert len(CIFAR_TEMPLATES) == 18 and len(set(CIFAR_TEMPLATES)) == 18
    assert all(t.count("{}") == 1 for t in CIFAR_TEMPLATES)
    assert CIFAR_TEMPLATES[0] == "a photo of a {}." and CIFAR_TEMPLATES[-1] == "a photo of the big {}."


def test_imagenet_names_and_templates_are_format_strings():
    from p4q_engine.data import classnames

    assert len(classnames.IMAGENET_CLASSNAMES) == 1000 and classnames.IMAGENET_CLASSNAMES[0] == "tench"
    templates = classnames.IMAGENET_TEMPLATES
    assert len(templates) == 80 and all(isinstance(t, str) and t.count("{}") == 1 for t in templates)
    assert "a bad photo of a {}." in templates


def test_registry_names():
    assert set(DATASETS) == {"reference", "cifar100", "imagenet", "imagefolder"}


# ---------------------------------------------------------------- CIFAR-100
def _write_cifar(root, n_train=6, n_test=5, seed=0):
    """A tiny CIFAR-100 in the real pickle layout; returns {split: (uint8 N x 3072 data, fine labels)}."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 100, size=n).tolist()
        entry = {
            "filenames": [f"{name}_{i}.png" for i in range(n)],
            "batch_label": name,
            "fine_labels": labels,
            "coarse_labels": [x // 5 for x in labels],
            "data": data,
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        out[name] = (data, labels)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": FINE_LABEL_NAMES, "coarse_label_names": [f"c{i}" for i in range(20)]}, f)
    return out


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision checks md5s of train/test (``_check_integrity``) and of meta (module-level ``check_integrity``
    in ``_load_meta``); accept any file that exists."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    monkeypatch.setattr(
        cifar.CIFAR100,
        "_check_integrity",
        lambda self: all(
            os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f, _ in self.train_list + self.test_list
        ),
    )


@pytest.mark.parametrize("split", ["test", "train", "calib"])
def test_cifar100_loads_labels_pixels_classnames(tmp_path, no_md5, split):
    written = _write_cifar(tmp_path)
    data, labels = written["test" if split == "test" else "train"]
    zs = load_dataset("cifar100", split=split, data_root=str(tmp_path))
    assert isinstance(zs, ZeroShotData) and zs.name == "cifar100"
    assert zs.classnames == list(CIFAR100_CLASSNAMES) and zs.templates == CIFAR_TEMPLATES
    assert len(zs.dataset) == len(labels)
    for i in range(len(labels)):
        img, label = zs.dataset[i]
        assert label == labels[i]
        expected = data[i].reshape(3, 32, 32).transpose(1, 2, 0)  # CIFAR rows are channel-planar RGB
        assert np.array_equal(np.asarray(img), expected)


def test_cifar100_transform_and_subset(tmp_path, no_md5):
    written = _write_cifar(tmp_path, n_test=10)
    data, labels = written["test"]
    import torchvision.transforms as T

    zs = load_dataset("cifar100", data_root=tmp_path, transform=T.ToTensor(), size=4)
    assert isinstance(zs.dataset, torch.utils.data.Subset) and len(zs.dataset) == 4
    again = load_dataset("cifar100", data_root=tmp_path, transform=T.ToTensor(), size=4)
    assert zs.dataset.indices == again.dataset.indices  # deterministic
    for j, i in enumerate(zs.dataset.indices):
        x, y = zs.dataset[j]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == labels[i]
        assert torch.allclose(x, torch.from_numpy(data[i].reshape(3, 32, 32)).float() / 255)


def test_deterministic_subset_is_a_seeded_permutation():
    ds = torch.utils.data.TensorDataset(torch.arange(100))
    sub = D.deterministic_subset(ds, 10)
    assert len(set(sub.indices)) == 10 and sub.indices != list(range(10))
    assert sub.indices == torch.randperm(100, generator=torch.Generator().manual_seed(D.SUBSET_SEED))[:10].tolist()
    assert D.deterministic_subset(ds, None) is ds and D.deterministic_subset(ds, 1000) is ds


def test_cifar100_requires_root():
    with pytest.raises(ConfigError, match="--data-root is required for cifar100"):
        load_dataset("cifar100")


def test_cifar100_absent_data(tmp_path):
    with pytest.raises(DatasetError, match="--download") as ei:
        load_dataset("cifar100", data_root=str(tmp_path))
    assert "\n" not in str(ei.value) and "cifar-100-python" in str(ei.value)


def test_cifar100_corrupt_data_is_dataset_error(tmp_path):
    _write_cifar(tmp_path)  # real md5 check (no monkeypatch): our fake files fail it
    with pytest.raises(DatasetError, match="cannot load CIFAR-100"):
        load_dataset("cifar100", data_root=str(tmp_path))


def test_cifar100_wrong_meta(tmp_path, no_md5):
    _write_cifar(tmp_path)
    with open(tmp_path / "cifar-100-python" / "meta", "wb") as f:
        pickle.dump({"fine_label_names": list(reversed(FINE_LABEL_NAMES))}, f)
    with pytest.raises(DatasetError, match="fine labels"):
        load_dataset("cifar100", data_root=str(tmp_path))


# ---------------------------------------------------------------- image folders
COLOURS = {"red_thing": (255, 0, 0), "green_thing": (0, 255, 0), "blue_thing": (0, 0, 255)}


def _write_folder(root, per_class=2, classnames_txt=True):
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 6), rgb).save(root / name / f"{i}.png")
    if classnames_txt:
        # sorted folder order: blue_thing, green_thing, red_thing
        (root / "classnames.txt").write_text("blue object\ngreen object\nred object\n", encoding="utf-8")


def test_imagefolder_names_labels_pixels(tmp_path):
    _write_folder(tmp_path)
    zs = load_dataset("imagefolder", data_root=str(tmp_path))
    assert zs.classnames == ["blue object", "green object", "red object"]
    assert zs.templates == ("a photo of a {}.",) and zs.name == "imagefolder"
    assert len(zs.dataset) == 6
    for i in range(len(zs.dataset)):
        img, label = zs.dataset[i]
        colour = np.asarray(img)[0, 0].tolist()
        assert colour == list(COLOURS[["blue_thing", "green_thing", "red_thing"][label]])


def test_imagefolder_folder_names_without_classnames_txt(tmp_path):
    _write_folder(tmp_path, classnames_txt=False)
    zs = load_dataset("imagefolder", data_root=tmp_path)
    assert zs.classnames == ["blue thing", "green thing", "red thing"]


def test_imagefolder_split_subfolder_and_transform(tmp_path):
    _write_folder(tmp_path / "val", classnames_txt=False)
    (tmp_path / "classnames.txt").write_text("b\ng\nr\n", encoding="utf-8")
    import torchvision.transforms as T

    zs = load_dataset("imagefolder", split="test", data_root=tmp_path, transform=T.ToTensor())
    assert zs.classnames == ["b", "g", "r"]
    x, y = zs.dataset[0]
    assert x.shape == (3, 6, 8) and y == 0


def test_imagefolder_classnames_count_mismatch(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "classnames.txt").write_text("only one\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="lists 1 class names"):
        load_dataset("imagefolder", data_root=tmp_path)


def test_imagefolder_corrupt_image_names_path(tmp_path):
    _write_folder(tmp_path)
    bad = tmp_path / "red_thing" / "zz_corrupt.png"
    bad.write_bytes(b"this is not a png")
    zs = load_dataset("imagefolder", data_root=tmp_path)
    idx = [p for p, _ in zs.dataset.samples].index(str(bad))
    with pytest.raises(DatasetError, match="zz_corrupt.png"):
        zs.dataset[idx]
    zs.dataset[0]  # the good ones still decode


def test_imagefolder_truncated_image_is_dataset_error(tmp_path):
    _write_folder(tmp_path)
    good = (tmp_path / "blue_thing" / "0.png").read_bytes()
    bad = tmp_path / "blue_thing" / "trunc.png"
    bad.write_bytes(good[: len(good) // 2])
    zs = load_dataset("imagefolder", data_root=tmp_path)
    idx = [p for p, _ in zs.dataset.samples].index(str(bad))
    with pytest.raises(DatasetError, match="trunc.png"):
        zs.dataset[idx]


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ConfigError, match="--data-root"):
        load_dataset("imagefolder")
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("imagefolder", data_root=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="image-folder"):
        load_dataset("imagefolder", data_root=tmp_path / "empty")
    (tmp_path / "no_images" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        load_dataset("imagefolder", data_root=tmp_path / "no_images")


def test_imagenet_layout(tmp_path):
    _write_folder(tmp_path / "val", classnames_txt=False)
    zs = load_dataset("imagenet", data_root=tmp_path)  # 3 folders, not 1000: folder names
    assert zs.classnames == ["blue thing", "green thing", "red thing"] and len(zs.templates) == 80
    with pytest.raises(DatasetError, match="train"):
        load_dataset("imagenet", split="calib", data_root=tmp_path)


def test_imagenet_1000_folders_use_open_clip_names(tmp_path):
    import open_clip

    for i in range(1000):
        d = tmp_path / "val" / f"n{i:08d}"
        d.mkdir(parents=True)
    # empty class folders (a partial copy) must not shift the labels of the others
    Image.new("RGB", (4, 4)).save(tmp_path / "val" / "n00000007" / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "val" / "n00000999" / "b.png")
    zs = load_dataset("imagenet", data_root=tmp_path)
    assert zs.classnames == list(open_clip.IMAGENET_CLASSNAMES)
    assert [zs.dataset[i][1] for i in range(2)] == [7, 999]


# ---------------------------------------------------------------- bad options
def test_unknown_dataset_and_split():
    with pytest.raises(ConfigError, match="cifar100, imagenet, imagefolder") as ei:
        load_dataset("mnist")
    assert "reference" in str(ei.value)
    with pytest.raises(ConfigError, match="test_seen"):
        load_dataset("reference", split="val")
    with pytest.raises(ConfigError, match="split"):
        load_dataset("cifar100", split="test_seen", data_root="/nonexistent")
    with pytest.raises(ConfigError, match="size"):
        load_dataset("reference", size=0)


# ---------------------------------------------------------------- embedded reference task
@pytest.mark.parametrize("split", ["train", "calib", "test", "test_seen"])
def test_reference_dataset(split):
    ref = pytest.importorskip("p4q_engine.data.reference")
    zs = load_dataset("reference", split=split, size=3)
    assert zs.name == "reference" and len(zs.dataset) == 3
    assert zs.classnames == list(ref.REFERENCE_CLASSNAMES) and zs.templates == tuple(ref.REFERENCE_TEMPLATES)
    x, y = zs.dataset[0]
    assert torch.is_tensor(x) and x.shape == (3, 32, 32) and 0 <= y < len(zs.classnames)
