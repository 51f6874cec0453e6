"""``--decode-device``: torchvision's JPEG decoder under the Pillow path's limits. The GPU (nvJPEG) itself is not
available in CI; the same code runs with ``device="cpu"`` (torchvision's libjpeg-turbo decoder), which covers the
header checks, the fallbacks and the preprocessing that match Pillow's."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from p4q_engine.errors import ConfigError, ImageError
from p4q_engine.runtime.images import Preprocess
from p4q_engine.runtime.jpeg_torch import TorchJpegLoader, check_decode_device

CFG = {"size": [32, 32], "mean": [0.48, 0.45, 0.4], "std": [0.27, 0.26, 0.28]}


def encode(w: int, h: int, fmt: str = "JPEG", seed: int = 0, **kw) -> bytes:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (h // 8 + 1, w // 8 + 1, 3), generator=g, dtype=torch.uint8).numpy()
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)  # smooth: JPEG artefacts stay small
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def loader() -> TorchJpegLoader:
    return TorchJpegLoader(Preprocess(CFG, max_pixels=200_000), device="cpu")


def test_baseline_jpeg_is_decoded_by_torchvision_close_to_pillow(loader):
    for w, h in ((64, 48), (40, 90), (300, 200)):
        data = encode(w, h, quality=95)
        got = loader.load(data, name="x.jpg")
        want = loader.preprocess.load(data, name="x.jpg")
        assert got.shape == want.shape == (3, 32, 32) and got.device.type == "cpu"
        assert (got - want).abs().mean() < 0.05  # normalized units: ~3 grey levels
    assert loader.decoded == 3 and loader.fallbacks == 0


def test_other_inputs_take_the_pillow_path_exactly(loader):
    png = encode(50, 50, fmt="PNG")
    progressive = encode(64, 64, progressive=True)
    for data in (png, progressive):
        assert torch.equal(loader.load(data, name="p"), loader.preprocess.load(data, name="p"))
    assert loader.fallbacks == 2 and loader.decoded == 0


def test_limits_are_checked_from_the_header_before_decoding(loader, monkeypatch):
    import torchvision.io

    def never(*a, **k):
        raise AssertionError("decode_jpeg must not run on an image the header already refuses")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", never)
    with pytest.raises(ImageError, match="exceeds the 200000-pixel limit"):
        loader.load(encode(1000, 900), name="big.jpg")  # 4.5x the cap: too much even for a reduced decode
    with pytest.raises(ImageError, match="too extreme an aspect ratio"):
        loader.load(encode(4000, 8), name="strip.jpg")
    with pytest.raises(ImageError, match="at least 2x2"):
        loader.load(encode(1, 1), name="dot.jpg")


def test_over_cap_baseline_jpeg_goes_to_pillow_reduced_decode(loader):
    data = encode(600, 500)  # 300000 px > 200000 cap at full size, fine at Pillow's 1/2 scale
    assert torch.equal(loader.load(data, name="r.jpg"), loader.preprocess.load(data, name="r.jpg"))
    assert loader.fallbacks == 1


def test_corrupt_jpeg_is_an_image_error(loader):
    data = encode(64, 64)
    with pytest.raises(ImageError, match="bad.jpg"):
        loader.load(data[: len(data) // 3] + b"\0" * 50, name="bad.jpg")


def test_decode_device_is_checked():
    assert check_decode_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            check_decode_device("cuda")
    with pytest.raises(ConfigError):
        check_decode_device("tpu")
