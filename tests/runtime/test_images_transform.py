"""The preprocessing fast path (``_ToNormalizedTensor``: ToTensor + Normalize in numpy) against open_clip's own
eval transform, bit for bit: the engine's inputs must not change when the server stops using torch's thread pool
for them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from p4q_engine.errors import ImageError
from p4q_engine.runtime.images import _ToNormalizedTensor, build_transform

MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
CONFIGS = (
    {"size": 224, "resize_mode": "shortest", "interpolation": "bicubic"},
    {"size": [64, 48], "resize_mode": "squash", "interpolation": "bilinear"},
    {"size": 32, "resize_mode": "longest", "interpolation": "bicubic"},
)
MODES = ("RGB", "L", "RGBA", "P", "CMYK")


def image(rng: np.random.Generator, mode: str) -> Image.Image:
    h, w = (int(v) for v in rng.integers(7, 300, 2))
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return rgb if mode == "RGB" else rgb.convert(mode)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['resize_mode']}-{c['size']}")
def test_fast_transform_equals_open_clip_bit_for_bit(cfg):
    pre = build_transform({**cfg, "mean": MEAN, "std": STD})
    assert isinstance(pre.transform.transforms[-1], _ToNormalizedTensor)  # the fast path is the one in use
    rng = np.random.default_rng(len(str(cfg)))
    for mode in MODES:
        for _ in range(8):
            img = image(rng, mode)
            out, ref = pre.transform(img), pre.reference_transform(img)
            assert out.dtype == ref.dtype == torch.float32 and out.shape == ref.shape
            assert out.is_contiguous()
            assert torch.equal(out, ref), f"{mode} {img.size}: max diff {float((out - ref).abs().max())}"


def test_fast_transform_falls_back_for_other_inputs():
    """Tensors and non-RGB images (never produced after open_clip's MaybeConvertMode, but callable) take the torch
    path, with its result."""
    pre = build_transform({"size": 16, "mean": MEAN, "std": STD})
    tail = pre.transform.transforms[-1]
    x = torch.rand(3, 16, 16)
    assert torch.equal(tail(x), pre.reference_transform.transforms[-1](x.clone()))
    gray = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")  # 1 channel vs a 3-channel mean
    ref_tail = pre.reference_transform.transforms
    with pytest.raises(RuntimeError):
        ref_tail[-1](ref_tail[-2](gray))
    with pytest.raises(RuntimeError):  # the same torch error, not a numpy broadcast of something else
        tail(gray)


def test_a_rounding_change_is_caught():
    """The equality above is bit-level: a float64 division (one rounding instead of two) must break it."""
    pre = build_transform({"size": 224, "mean": MEAN, "std": STD})
    img = image(np.random.default_rng(0), "RGB").resize((224, 224))
    x = np.asarray(img, dtype=np.float64).transpose(2, 0, 1) / 255
    x = (x - np.asarray(MEAN).reshape(3, 1, 1)) / np.asarray(STD).reshape(3, 1, 1)
    assert not torch.equal(torch.from_numpy(x.astype(np.float32)), pre.reference_transform(img))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['resize_mode']}-{c['size']}")
def test_raw_pixels_normalized_later_are_the_same_bits(cfg):
    """``load(raw=True)`` returns the 8-bit pixels and ``normalize`` finishes them (alone or batched) into exactly
    what ``load`` returns - the path the server takes to queue, pickle and copy a quarter of the bytes."""
    import io

    pre = build_transform({**cfg, "mean": MEAN, "std": STD})
    assert pre.raw_ok
    rng = np.random.default_rng(7 + len(str(cfg)))
    raws, floats = [], []
    for mode in MODES:
        buf = io.BytesIO()
        image(rng, mode).save(buf, format="TIFF" if mode == "CMYK" else "PNG")
        u, f = pre.load(buf.getvalue(), raw=True), pre.load(buf.getvalue())
        assert u.dtype == torch.uint8 and f.dtype == torch.float32 and u.shape == f.shape
        assert torch.equal(pre.normalize(u), f), mode
        raws.append(u)
        floats.append(f)
    if all(r.shape == raws[0].shape for r in raws):
        assert torch.equal(pre.normalize(torch.stack(raws)), torch.stack(floats))


@pytest.mark.parametrize(
    "x",
    [torch.zeros(3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.uint8), torch.zeros(2, 4, 8, 8, dtype=torch.uint8),
     torch.zeros(8, 8, dtype=torch.uint8), np.zeros((3, 8, 8), dtype=np.uint8)],
    ids=["float", "one-channel", "four-channel", "2d", "numpy"],
)  # fmt: skip
def test_normalize_takes_only_3_channel_uint8(x):
    """Float pixels would be normalised twice and [1, H, W] broadcast to three channels: both are refused."""
    pre = build_transform({"size": 8, "mean": MEAN, "std": STD})
    with pytest.raises(ImageError, match="uint8 pixels"):
        pre.normalize(x)


def test_no_raw_path_without_the_standard_tail():
    """A transform that does not end in (ToTensor, Normalize) has no 8-bit path: ``raw`` is ignored, ``normalize``
    refuses."""
    from torchvision.transforms import Compose

    from p4q_engine.runtime.images import ImageError

    pre = build_transform({"size": 16, "mean": MEAN, "std": STD})
    pre.transform = Compose(pre.reference_transform.transforms[:-1] + [lambda x: x * 2])
    pre._tail, pre.raw_ok = None, False
    img = image(np.random.default_rng(1), "RGB")
    assert pre.load(img, raw=True).dtype == torch.float32
    with pytest.raises(ImageError, match="no 8-bit path"):
        pre.normalize(torch.zeros(3, 16, 16, dtype=torch.uint8))


def test_the_transform_pickles_without_its_device_constants():
    """Decode processes receive the transform by pickle: the constants ``normalize`` caches per device stay home."""
    import pickle

    pre = build_transform({"size": 16, "mean": MEAN, "std": STD})
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    y = pre.normalize(x)
    tail = pre.transform.transforms[-1]
    assert tail.__dict__.get("_on_device")  # cached after the first call
    back = pickle.loads(pickle.dumps(pre))
    assert "_on_device" not in back.transform.transforms[-1].__dict__
    assert torch.equal(back.normalize(x), y)
