"""Bounded cost per image on the library path (``Engine.classify``/``embed``/``preprocess``, ``p4q classify``):
the pixel cap and the resize guard apply from the header, before anything is decoded, and JPEGs decode at the
model's resolution (reduced-scale decoding), not the file's.

CPU is measured with ``time.process_time`` (this process's CPU, not wall time), with bounds 3x or more above what
the fixed code costs and below what the unbounded code cost, so load on a shared machine cannot flip them."""

from __future__ import annotations

import io
import threading
import time

import pytest
import torch
from PIL import Image

from p4q_engine.artifact.format import ArtifactError
from p4q_engine.cli import main
from p4q_engine.errors import ImageError
from p4q_engine.runtime.engine import Engine
from p4q_engine.runtime.images import (
    FORMATS,
    JPEG_DECLARED_FACTOR,
    MAX_PIXELS,
    DeadlineExceeded,
    DecodeBudget,
    Preprocess,
    decode_cost,
    decode_image,
)
from tests.serve.conftest import build_tiny_artifact

CFG = {"size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def lying_jpeg(width: int, height: int, progressive: bool = False) -> bytes:
    """A 16x16 JPEG (~600 bytes) whose frame header declares ``width x height``: libjpeg decodes it 'successfully'
    as a grey fill of the declared size."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (1, 2, 3)), "JPEG", progressive=progressive))
    sof = data.index(b"\xff\xc2" if progressive else b"\xff\xc0")
    data[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    data[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    d = tmp_path_factory.mktemp("bounds_artifact")
    return build_tiny_artifact(d / "tiny.p4q", d)


@pytest.fixture(scope="module")
def engine(artifact) -> Engine:
    return Engine.load(artifact, "cpu")


def test_default_cap_is_sized_for_clip():
    """16.7 Mpx (4096x4096) decoded at most; baseline JPEGs may declare 4x that (decoded at <= 1/2 scale)."""
    assert MAX_PIXELS == 4096 * 4096 and JPEG_DECLARED_FACTOR == 4


def test_lying_jpeg_decodes_at_the_models_resolution(engine):
    """A ~600-byte JPEG declaring 7000x7000 decoded in full cost 0.17-0.33 s of CPU and 200 MB; at the model's
    resolution it is an 875x875 decode (1/8 scale, still >= 2x the 32-px input)."""
    liar = lying_jpeg(7000, 7000)
    assert len(liar) < 1100
    img = decode_image(liar, draft_size=engine.transform.draft_size)
    assert img.size == (875, 875)
    assert decode_image(lying_jpeg(500, 300), draft_size=(64, 64)).size == (125, 75)  # 1/4: both sides >= 64
    assert decode_image(lying_jpeg(100, 100), draft_size=(64, 64)).size == (100, 100)  # no smaller scale fits
    engine.preprocess([liar])  # warm up
    t0 = time.process_time()
    pixels = engine.preprocess([liar] * 16)
    cpu = time.process_time() - t0
    assert pixels.shape == (16, 3, 32, 32) and torch.isfinite(pixels).all()
    assert cpu < 1.0, f"16 lying 7000x7000 JPEGs cost {cpu:.2f} s of CPU (full decodes: ~3-5 s)"


def test_reduced_scale_decoding_keeps_the_pixels(engine):
    """Reduced-scale decoding of a large photo-like JPEG stays close to preprocessing its full decode."""
    g = torch.Generator().manual_seed(0)
    small = (torch.rand(48, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
    big = Image.fromarray(small).resize((1024, 768), Image.BICUBIC)  # smooth content, 12x larger than the input
    data = encode(big, "JPEG", quality=95)
    drafted = engine.preprocess([data])[0]
    full = engine.transform(Image.open(io.BytesIO(data)).convert("RGB"))
    assert drafted.shape == full.shape
    assert (drafted - full).abs().mean() < 2 * (2 / 255)  # < 2 grey levels on average (std 0.5 -> 2/255 a level)


@pytest.mark.parametrize(
    "img,fmt", [(Image.new("RGB", (7000, 7000), (9, 99, 199)), "PNG"), (Image.new("L", (4097, 4096), 7), "PNG")]
)
def test_over_cap_refused_from_the_header(engine, img, fmt):
    """Formats without reduced-scale decoding must declare at most the cap; refused before decoding (a 7000x7000
    PNG decoded in full was 0.5 s of CPU and 200 MB)."""
    data = encode(img, fmt)
    t0 = time.process_time()
    with pytest.raises(ImageError, match=r"exceeds the 16777216-pixel limit"):
        engine.classify([data])
    assert time.process_time() - t0 < 0.2


def test_jpeg_declared_caps():
    """Baseline JPEGs may declare up to 4x the cap (decoded reduced); progressive ones buffer full-size coefficients
    in libjpeg whatever the scale, so they get the plain cap."""
    pp = Preprocess(CFG)
    assert pp.load(lying_jpeg(8192, 8192)).shape == (3, 32, 32)
    with pytest.raises(ImageError, match="exceeds"):
        pp.load(lying_jpeg(8192, 8193))
    assert pp.load(lying_jpeg(4096, 4096, progressive=True)).shape == (3, 32, 32)
    with pytest.raises(ImageError, match="exceeds"):
        pp.load(lying_jpeg(4097, 4096, progressive=True))
    with pytest.raises(ImageError, match="even at"):  # a model that needs full-scale decoding gets the plain cap
        Preprocess({**CFG, "size": [3000, 3000]}, max_pixels=MAX_PIXELS).load(lying_jpeg(5000, 5000))


def test_extreme_aspect_ratio_raises_fast_without_allocating(engine, tmp_path):
    """A 9 KB 2x3000000 PNG: its resize to 32 px would need a 32x48000000 image (6 GiB); a 2x60000 one 32x960000
    (123 MB). Refused from the header, on every library entry point and in ``p4q classify``."""
    data = encode(Image.new("RGB", (2, 3_000_000), (5, 5, 5)))
    assert len(data) < 40_000
    t0 = time.perf_counter()
    for image in (data, encode(Image.new("RGB", (2, 60_000), (5, 5, 5)))):
        for call in (engine.classify, engine.embed, engine.preprocess, engine.logits):
            with pytest.raises(ImageError, match="aspect ratio"):
                call([image])
    path = tmp_path / "tall.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match="tall.png.*aspect ratio"):
        engine.classify([str(path)])
    assert time.perf_counter() - t0 < 5.0


def test_cli_classify_refuses_a_bomb_with_one_line(artifact, tmp_path, capsys):
    path = tmp_path / "wide.png"
    path.write_bytes(encode(Image.new("L", (60_000, 2), 1)))
    assert main(["classify", str(artifact), str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "aspect ratio" in err and "wide.png" in err


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
def test_resize_guard_predicts_the_real_resize(mode):
    """The guard's size arithmetic equals what the transform's resize step really produces (so the bound it
    enforces is the real allocation), and every extreme aspect ratio is refused in every resize mode."""
    from open_clip.transform import ResizeKeepRatio
    from torchvision.transforms import Resize

    for size in ([32, 32], [24, 40]):
        pp = Preprocess({**CFG, "size": size, "resize_mode": mode}, max_pixels=100_000)
        resize = next(t for t in pp.transform.transforms if isinstance(t, (Resize, ResizeKeepRatio)))
        for w, h in ((2, 2), (3, 700), (700, 3), (33, 35), (640, 480), (31, 1000), (1000, 31), (5, 17)):
            if min(pp.resized_size(w, h)) < 1:  # e.g. 3x700 -> 0x32 ('longest'): torchvision's ValueError
                with pytest.raises(ValueError):
                    resize(Image.new("RGB", (w, h)))
                with pytest.raises(ImageError, match="aspect ratio"):
                    pp.check(w, h, "x")
                continue
            out = resize(Image.new("RGB", (w, h)))
            assert pp.resized_size(w, h) == out.size, (mode, size, w, h)
            assert pp.resize_cost(w, h) >= out.width * out.height
        refused = [(2, 60_000), (2, 3_000_000), (3_000_000, 2)] + ([(60_000, 2)] if mode != "squash" else [])
        for w, h in refused:
            with pytest.raises(ImageError, match="aspect ratio"):
                pp(Image.new("L", (w, h)))
            if max(w, h) <= 65535:
                with pytest.raises(ImageError, match="aspect ratio"):
                    pp.check(w, h, "x")
        if mode == "squash":  # a wide image squashes cheaply (horizontal pass first): accepted
            assert pp(Image.new("L", (60_000, 2))).shape == (3, *size)


def test_a_small_cap_still_admits_ordinary_aspect_ratios():
    """The resize bound never drops below 4x the model's input, so --max-pixels 100 with a 32-px model refuses
    what it decodes but not the resize of an image that fits."""
    pp = Preprocess(CFG, max_pixels=MAX_PIXELS)
    pp.check(40, 30, "x", max_pixels=100)
    pp.check(128, 32, "x", max_pixels=100)  # 4:1 -> 128x32 = 4x the input
    with pytest.raises(ImageError, match="aspect ratio"):
        pp.check(129, 32, "x", max_pixels=100)


def test_preprocess_size_is_bounded_at_load():
    """A preprocess size the pixel cap cannot hold is the artifact's fault, found at load (not a 400 per image)."""
    with pytest.raises(ArtifactError, match="preprocess.size"):
        Preprocess({**CFG, "size": 20000})
    for bad in (0, -3, 2.5, "32", [32], [32, 32, 32], True, None):
        with pytest.raises(ArtifactError, match="preprocess.size"):
            Preprocess({**CFG, "size": bad})


def test_only_known_formats_are_opened(tmp_path):
    """Formats outside FORMATS (decoders the bounds were not measured on; EPS would run Ghostscript) are refused."""
    assert "EPS" not in FORMATS
    for fmt in ("TGA", "ICO", "PCX"):
        with pytest.raises(ImageError, match="cannot decode"):
            decode_image(encode(Image.new("RGB", (16, 16)), fmt), name=fmt)


def test_rgb_images_are_not_copied_and_opened_images_are_closed():
    """An RGB decode is returned as is (``convert`` would copy it: 64 MiB more at the cap); a caller's PIL image is
    used, never closed."""
    img = decode_image(encode(Image.new("RGB", (64, 48), 3)))
    assert img.mode == "RGB" and img.size == (64, 48)
    mine = Image.new("RGB", (64, 48), 3)
    assert decode_image(mine) is mine
    Preprocess(CFG).load(mine)
    assert mine.getpixel((0, 0)) == (3, 0, 0)  # still usable
    with pytest.raises(ImageError, match="exceeds"):
        decode_image(Image.new("L", (8, 8)), max_pixels=63)


def test_decode_cost_bounds_the_formats():
    big = Image.new("RGB", (1000, 1000))
    cost = {fmt: decode_cost(Image.open(io.BytesIO(encode(big, fmt)))) for fmt in ("PNG", "WEBP", "JPEG")}
    assert cost["PNG"] == 4_000_000 and cost["WEBP"] == 16_000_000 and cost["JPEG"] == 4_000_000
    prog = Image.open(io.BytesIO(encode(big, "JPEG", progressive=True)))
    assert decode_cost(prog) == 4_000_000 + 6_000_000
    assert decode_cost(Image.open(io.BytesIO(encode(big.convert("L"), "PNG")))) == 8_000_000


def test_decode_budget_bounds_bytes_in_flight():
    """Holders never exceed the limit together; one larger than the limit still runs (alone); a wait past the
    deadline raises DeadlineExceeded."""
    budget = DecodeBudget(100)
    inside, peak, lock = [0], [0], threading.Lock()

    def work(n: int) -> None:
        with budget.hold(n):
            with lock:
                inside[0] += n
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.01)
            with lock:
                inside[0] -= n

    threads = [threading.Thread(target=work, args=(n,)) for n in [40, 40, 40, 150, 40, 60, 10] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert peak[0] <= 150 and budget.peak <= 150 and budget.used == 0
    with budget.hold(90):
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            with budget.hold(20, deadline=time.monotonic() + 0.2):
                pass
        assert 0.15 < time.monotonic() - t0 < 5
    assert budget.used == 0
