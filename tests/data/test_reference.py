"""The embedded reference dataset: determinism, class layout, held-out combinations, splits."""

import numpy as np
import pytest
import torch

from p4q_engine.data import reference as ref
from p4q_engine.data.reference import (
    COLOURS,
    HELD_OUT_CLASSES,
    REFERENCE_CLASSNAMES,
    REFERENCE_TEMPLATES,
    SHAPES,
    ReferenceDataset,
    render,
    render_tensor_batch,
)
from p4q_engine.errors import ConfigError

HELD = set(HELD_OUT_CLASSES)


def test_render_is_deterministic_and_split_dependent():
    a, la, ca = render(7, "train")
    b, lb, cb = render(7, "train")
    assert a.mode == "RGB" and a.size == (32, 32)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and la == lb and ca == cb
    assert not np.array_equal(np.asarray(a), np.asarray(render(8, "train")[0]))
    assert not np.array_equal(np.asarray(render(7, "test_seen")[0]), np.asarray(a))


def test_render_pixels_pinned():
    # guards against silent rendering changes (which would invalidate the committed checkpoint)
    x, y, caps = render_tensor_batch("test", 0, 4)
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32)
    assert y.tolist() == [HELD_OUT_CLASSES[i] for i in range(4)]
    again, _, caps2 = render_tensor_batch("test", 2, 2)
    assert torch.equal(again, x[2:]) and caps2 == caps[2:]
    assert ref.RENDER_VERSION == "v2"
    assert int(x.long().sum()) == PINNED_TEST_SUM


PINNED_TEST_SUM = 1283103  # sum of the first 4 "test" images' uint8 pixels (render version v2)


def test_classnames_and_templates():
    assert len(SHAPES) == 10 and len(COLOURS) == 10
    assert len(REFERENCE_CLASSNAMES) == 100 and len(set(REFERENCE_CLASSNAMES)) == 100
    assert REFERENCE_CLASSNAMES[ref.class_label("triangle", "red")] == "red triangle"
    assert len({tuple(v) for v in ref.COLOUR_RGB.values()}) == 10
    assert all("{}" in t for t in REFERENCE_TEMPLATES) and len(REFERENCE_TEMPLATES) >= 4


def test_held_out_is_a_latin_square():
    assert len(HELD) == 20
    shapes = [c // len(COLOURS) for c in HELD]
    colours = [c % len(COLOURS) for c in HELD]
    assert sorted(shapes) == sorted(list(range(10)) * 2)
    assert sorted(colours) == sorted(list(range(10)) * 2)
    assert set(ref.SEEN_CLASSES) | HELD == set(range(100)) and not set(ref.SEEN_CLASSES) & HELD


def test_train_never_shows_held_out_and_covers_every_shape_and_colour():
    _, labels, captions = render_tensor_batch("train", 0, 400)
    assert not set(labels.tolist()) & HELD
    held_names = [REFERENCE_CLASSNAMES[c] for c in HELD]
    for cap in captions:
        assert not any(n in cap for n in held_names), cap
    seen_shapes = {l // len(COLOURS) for l in labels.tolist()}
    seen_colours = {l % len(COLOURS) for l in labels.tolist()}
    assert seen_shapes == set(range(10)) and seen_colours == set(range(10))
    for lab, cap in zip(labels.tolist(), captions):  # the caption names the drawn class
        assert REFERENCE_CLASSNAMES[lab] in cap
    calib = render_tensor_batch("calib", 0, 100)[1]
    assert not set(calib.tolist()) & HELD


def test_test_split_is_held_out_only_and_test_seen_is_seen_only():
    _, labels, _ = render_tensor_batch("test", 0, 60)
    assert set(labels.tolist()) == HELD
    _, seen, _ = render_tensor_batch("test_seen", 0, 160)
    assert set(seen.tolist()) == set(ref.SEEN_CLASSES)


def test_dataset_interface():
    ds = ReferenceDataset("test", size=10)
    assert len(ds) == 10 and ds.classnames == REFERENCE_CLASSNAMES and ds.templates == REFERENCE_TEMPLATES
    img, label = ds[3]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and label in HELD
    expected = ref.normalize_uint8(render_tensor_batch("test", 3, 1)[0])[0]
    assert torch.allclose(img, expected, atol=1e-5)
    img2, label2, cap = ReferenceDataset("test", size=10, with_captions=True)[3]
    assert torch.equal(img, img2) and label2 == label and REFERENCE_CLASSNAMES[label] in cap
    pil, _ = ReferenceDataset("calib", size=2, transform=lambda im: im)[0]
    assert pil.size == (32, 32)
    assert len(ReferenceDataset("test")) == 2000
    big = ref.reference_transform(64)(render(0, "test")[0])
    assert big.shape == (3, 64, 64)
    with pytest.raises(IndexError):
        ds[10]


@pytest.mark.parametrize("split", ["val", "", "TEST"])
def test_bad_split_raises_config_error(split):
    with pytest.raises(ConfigError):
        ReferenceDataset(split)
    with pytest.raises(ConfigError):
        render(0, split)


def test_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("P4Q_CACHE", str(tmp_path))
    a = ref.cached_split("calib", 8)
    assert any(tmp_path.rglob("*.npz"))
    b = ref.cached_split("calib", 8)
    c = render_tensor_batch("calib", 0, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and a[2] == b[2] == c[2]


def test_adapt_splits_cover_all_classes_and_leave_other_splits_unchanged():
    from p4q_engine.data.datasets import adaptation_splits

    assert adaptation_splits("reference") == ("adapt", "adapt_test")
    assert adaptation_splits("cifar100") == ("train", "test")
    for split in ("adapt", "adapt_test"):
        labels = {ref.split_label(split, i) for i in range(300)}
        assert labels == set(range(100))
    # new splits have their own seeds: same index, different image than any existing split
    a = ref.render_array(0, "adapt")[0]
    assert not np.array_equal(a, ref.render_array(0, "adapt_test")[0])
    assert not np.array_equal(a, ref.render_array(0, "train")[0])
