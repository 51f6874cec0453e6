"""Image decoding and the artifact's preprocessing, with a bounded cost per image and errors that name the input.

What an image may cost is decided from its header, before any pixel is decoded (``Image.open`` reads only the
header; ``load()`` decodes):

* Only the formats in :data:`FORMATS` are opened (their decoders are the ones the README's bounds were measured on;
  Pillow's other plugins include decoders that shell out, e.g. EPS via Ghostscript).
* A JPEG is decoded at the smallest of libjpeg's 1/1, 1/2, 1/4, 1/8 scales that still leaves both sides at least
  :data:`DRAFT_MARGIN` times the model's input side (``Image.draft``), so a 7000x7000 photo costs what an 875x875 one
  costs. The resize step downscales the result again (by 2x or more), so the preprocessed pixels stay close to a
  full decode's (measured on a 3000x2000 photo-like JPEG at 224 px: 0.4 grey levels apart on average, 6 at most).
* At most ``max_pixels`` pixels are decoded per image (:data:`MAX_PIXELS`). Formats without reduced-scale decoding
  (PNG, WebP, GIF, ...) and progressive JPEGs (libjpeg buffers their coefficients at full size whatever the scale)
  must declare at most that; a baseline JPEG may declare up to :data:`JPEG_DECLARED_FACTOR` times that as long as
  its reduced size fits.
* The resize step of the artifact's transform may allocate at most ``max_pixels`` pixels either (a 2x600000 image
  would otherwise be resized to 32x9600000), and no side may exceed :data:`MAX_SIDE`: checked by
  :class:`Preprocess` from the header, before resizing.
"""

from __future__ import annotations

import io
import struct
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from p4q_engine.errors import ImageError

ImageInput = Union[str, Path, bytes, Image.Image]

#: Most pixels decoded per image: 4096x4096 = 16.7 Mpx. CLIP models look at 224-448 px; a 12 Mpx phone photo
#: (4032x3024) fits whole and larger baseline JPEGs (24-61 Mpx cameras) fit through reduced-scale decoding. Pillow
#: stores a decoded RGB or RGBA pixel in 4 bytes, so one image at the cap is 64 MiB (128 MiB while a non-RGB mode is
#: converted to RGB).
MAX_PIXELS = 4096 * 4096
#: A baseline JPEG may declare up to this many times ``max_pixels`` (decoded at 1/2 scale or less; 8192x8192 at the
#: default cap).
JPEG_DECLARED_FACTOR = 4
#: JPEG reduced-scale decoding keeps both sides >= this many times the model's input side (antialiasing headroom).
DRAFT_MARGIN = 2
#: The resize step's bound is never below this many times the model's input pixels, so even a small
#: ``max_pixels`` admits aspect ratios up to 4:1.
RESIZE_FLOOR = 4
#: Longest side accepted (JPEG's own limit): beyond it only extreme aspect ratios remain, and Pillow's resampling
#: coefficients alone cost 32 bytes per source pixel of a side (268 MB for a 8388608x2 image squashed to 32x32).
MAX_SIDE = 65535
#: Formats that are opened at all (Pillow format names).
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")  # JPEG includes MPO (multi-picture JPEG)
#: Bytes per decoded pixel in Pillow's storage (every mode but "1", "L", "P" and "I;16" uses 4).
_PIXEL_BYTES = 4


def decode_cost(img: Image.Image) -> int:
    """Upper bound of the bytes that decoding (and converting to RGB) an opened, not yet loaded image allocates
    (measured per format with Pillow 13: RGB PNG/TIFF/BMP 4 bytes per pixel, other modes 8 with the RGB copy, WebP
    16: libwebp's RGBA frame, its copy and the image)."""
    per_pixel = _PIXEL_BYTES * (4 if img.format == "WEBP" else 1 if img.mode == "RGB" else 2)
    cost = img.width * img.height * per_pixel
    if img.format in ("JPEG", "MPO") and img.info.get("progressive"):
        w, h = getattr(img, "_p4q_declared", img.size)
        cost += w * h * 6  # full-size DCT coefficient buffers: 3 components x 2 bytes, no chroma subsampling
    return cost


def _check_size(label: str, w: int, h: int, max_pixels: int, limit: Optional[int] = None, note: str = "") -> None:
    """:class:`ImageError` unless ``w x h`` is at most ``limit`` (default ``max_pixels``) pixels, no side is over
    :data:`MAX_SIDE` and both are at least 2."""
    limit = max_pixels if limit is None else limit
    if w * h > limit:
        raise ImageError(f"{label}: {w}x{h} exceeds the {max_pixels}-pixel limit{note}")
    if max(w, h) > MAX_SIDE:
        raise ImageError(f"{label}: {w}x{h} has a side over {MAX_SIDE} px (too extreme an aspect ratio)")
    if min(w, h) < 2:
        raise ImageError(f"{label}: image is {w}x{h}; at least 2x2 pixels are needed")


def _check_declared(img: Image.Image, label: str, max_pixels: int, draft_size: Optional[tuple[int, int]]) -> None:
    """Refuse over-size images from their header; reduce a JPEG's decode scale. Nothing is decoded yet."""
    w, h = img.size
    if img.format not in ("JPEG", "MPO"):
        _check_size(label, w, h, max_pixels)
        return
    if img.info.get("progressive"):
        _check_size(label, w, h, max_pixels, note=" (progressive JPEG)")
    else:
        limit = max_pixels * JPEG_DECLARED_FACTOR
        _check_size(label, w, h, max_pixels, limit, note=f" ({limit} declared for a baseline JPEG)")
    if draft_size is not None:
        img._p4q_declared = (w, h)  # type: ignore[attr-defined]
        img.draft("RGB", draft_size)  # sets libjpeg's scale; the mode request only matters for YCbCr/L output
    if img.width * img.height > max_pixels:
        raise ImageError(
            f"{label}: {w}x{h} exceeds the {max_pixels}-pixel limit even at {img.width}x{img.height} "
            "(reduced-scale decoding)"
        )


#: What Pillow raises on bad or hostile image data (besides ImageError's own checks).
_DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    EOFError,
    MemoryError,
    IndexError,
    KeyError,
    struct.error,
    Image.DecompressionBombError,
)


def _label(src: Any, name: Optional[str]) -> str:
    return name or (str(src) if isinstance(src, (str, Path)) else type(src).__name__)


@contextmanager
def _opened(
    src: ImageInput, label: str, max_pixels: int, draft_size: Optional[tuple[int, int]]
) -> Iterator[Image.Image]:
    """``src`` opened and checked from its header alone (JPEG scale reduced); a file this opened is closed at the
    end of the block. A PIL image passes through (checked against the cap, used as given)."""
    if isinstance(src, Image.Image):
        _check_size(label, src.width, src.height, max_pixels)
        yield src
        return
    try:
        fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else open(src, "rb")
    except (OSError, TypeError, ValueError) as e:
        raise ImageError(f"{label}: cannot open ({getattr(e, 'strerror', None) or e})") from None
    with fp:
        try:
            img = Image.open(fp, formats=FORMATS)
            _check_declared(img, label, max_pixels, draft_size)
        except ImageError:
            raise
        except _DECODE_ERRORS as e:
            raise ImageError(f"{label}: cannot decode image ({e.__class__.__name__})") from None
        yield img


def _to_rgb(img: Image.Image, label: str, owned: bool) -> Image.Image:
    """Decode and convert to RGB; an RGB image is returned as is (``convert`` would make a full-size copy), an
    ``owned`` original is closed as soon as its RGB copy exists."""
    try:
        img.load()
        if img.mode == "RGB":
            return img
        out = img.convert("RGB")
    except _DECODE_ERRORS as e:
        raise ImageError(f"{label}: cannot decode image ({e.__class__.__name__})") from None
    if owned:
        img.close()
    return out


def decode_image(
    src: ImageInput, name: str | None = None, max_pixels: int = MAX_PIXELS, draft_size: Optional[tuple[int, int]] = None
) -> Image.Image:
    """Open ``src`` (path, bytes or PIL image) as RGB; raise :class:`ImageError` naming it if unusable.

    ``draft_size``: the smallest ``(width, height)`` the caller needs; a larger JPEG is decoded at a reduced scale
    that still covers it (see the module docstring for the caps)."""
    label = _label(src, name)
    with _opened(src, label, max_pixels, draft_size) as img:
        return _to_rgb(img, label, owned=img is not src)


class DeadlineExceeded(Exception):
    """A decode waited for its budget past its request's deadline (the server answers 504)."""


class DecodeBudget:
    """Bytes of decoded pixels in flight across threads (the server's decode pool): a decode waits until its bound
    fits, except that one decode may always run alone, so an image never waits forever."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit, self.used, self.peak = limit_bytes, 0, 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int, deadline: Optional[float] = None) -> Iterator[None]:
        """Reserve ``nbytes`` until the block ends; :class:`DeadlineExceeded` if ``deadline`` (monotonic) passes
        first."""
        with self._cond:
            while self.used and self.used + nbytes > self.limit:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise DeadlineExceeded("decode budget not available before the deadline")
                self._cond.wait(left)
            self.used += nbytes
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()


# ---------------------------------------------------------------- preprocessing
def _target(size: Any) -> tuple[int, int]:
    """``(height, width)`` of a preprocess ``size`` (an int or ``[h, w]``)."""
    from p4q_engine.artifact.format import ArtifactError

    hw = list(size) if isinstance(size, (list, tuple)) else [size, size]
    if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in hw):
        raise ArtifactError(f"preprocess.size must be a positive integer or [height, width], got {size!r}")
    return hw[0], hw[1]


class _ToNormalizedTensor:
    """torchvision's ``ToTensor`` then ``Normalize`` on an 8-bit RGB PIL image, in numpy: the same IEEE float32
    operations (``u8 / 255``, ``- mean``, ``/ std``, each correctly rounded), so the same bits, but no torch intra-op
    thread pool. The server decodes in many threads at once; each torch op on a 224 px image fans out to the pool
    (it exceeds torch's grain size), so N decode threads x T torch threads oversubscribe the cores. On the 2-core dev
    box the numpy tail gave 1.4x / 2.2x / 2.4x the images/s at 1x2 / 4x8 / 16x16 torch x decode threads, the 8-bit
    path (:meth:`raw`, the server's) 1.7x / 2.4x / 3.3x (benchmarks/results/preprocess_cpu.md, 2026-12-02). Other
    inputs take the torch path."""

    def __init__(self, to_tensor: Callable[[Any], torch.Tensor], normalize: Any) -> None:
        self.to_tensor, self.normalize = to_tensor, normalize
        self.mean = np.asarray(normalize.mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(normalize.std, dtype=np.float32).reshape(3, 1, 1)

    def __call__(self, img: Any) -> torch.Tensor:
        if not isinstance(img, Image.Image) or img.mode != "RGB" or self.normalize.inplace:
            return self.normalize(self.to_tensor(img))
        chw = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
        x = chw.astype(np.float32, order="C")
        x /= np.float32(255)
        x -= self.mean
        x /= self.std
        return torch.from_numpy(x)

    def raw(self, img: Any) -> Optional[torch.Tensor]:
        """The 8-bit ``[3, H, W]`` pixels this step would normalise (None where it would take the torch path): a
        quarter of the bytes to queue, pickle or copy to a GPU; :meth:`normalize` finishes them where they land."""
        if not isinstance(img, Image.Image) or img.mode != "RGB" or self.normalize.inplace:
            return None
        return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))

    def normalize_u8(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., 3, H, W]`` uint8 -> the float32 pixels of :meth:`__call__`, on ``x``'s device, bit for bit: the same
        correctly rounded divisions and subtraction. The divisors are tensors, not Python scalars - CUDA divides by a
        scalar as a multiply by its reciprocal, which is not the same rounding."""
        div, mean, std = self._constants(x.device)
        return (x.to(torch.float32) / div - mean) / std

    def __getstate__(self) -> dict:
        """Pickled (to decode processes) without the per-device constants: no CUDA tensor crosses a process."""
        return {k: v for k, v in self.__dict__.items() if k != "_on_device"}

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """255, mean and std as tensors on ``device``, made once per device (not per batch on the serving path)."""
        cache = self.__dict__.setdefault("_on_device", {})
        if device not in cache:
            cache[device] = (
                torch.full((1, 1, 1), 255.0, device=device),
                torch.from_numpy(self.mean).to(device),
                torch.from_numpy(self.std).to(device),
            )
        return cache[device]


def _fast_tail(transform: Any) -> Any:
    """``transform`` with a trailing (to-tensor, Normalize) pair replaced by :class:`_ToNormalizedTensor` where the
    pair is exactly torchvision's / open_clip's (anything else is kept as it is)."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    steps = list(getattr(transform, "transforms", []))
    if (
        len(steps) >= 2
        and isinstance(steps[-2], ToTensor)
        and type(steps[-1]) is Normalize
        and len(steps[-1].mean) == len(steps[-1].std) == 3
    ):
        return Compose([*steps[:-2], _ToNormalizedTensor(steps[-2], steps[-1])])
    return transform


class Preprocess:
    """The eval transform recorded in an artifact (open_clip's ``image_transform`` of its preprocess config), with
    the resize step's allocation checked before it happens. Call it on a decoded PIL image, or :meth:`load` any
    image input (decoded at a reduced scale where the format allows)."""

    def __init__(self, cfg: dict[str, Any], max_pixels: int = MAX_PIXELS) -> None:
        from open_clip import image_transform

        from p4q_engine.artifact.format import ArtifactError

        self.size = _target(cfg.get("size"))
        self.resize_mode = cfg.get("resize_mode", "shortest")
        self.max_pixels = max_pixels
        if self.size[0] * self.size[1] > max_pixels:
            raise ArtifactError(f"preprocess.size {list(self.size)} exceeds the {max_pixels}-pixel image limit")
        side = DRAFT_MARGIN * max(self.size)
        #: ``(width, height)`` a JPEG must still cover after reduced-scale decoding.
        self.draft_size = (side, side)
        size = cfg["size"]
        #: open_clip's eval transform: the reference (tests compare the fast one against it bit for bit)
        self.reference_transform = image_transform(
            tuple(size) if isinstance(size, list) else size,
            is_train=False,
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            resize_mode=self.resize_mode,
            interpolation=cfg.get("interpolation", "bicubic"),
        )
        self.transform = _fast_tail(self.reference_transform)
        steps = getattr(self.transform, "transforms", [])
        self._tail = steps[-1] if steps and isinstance(steps[-1], _ToNormalizedTensor) else None
        #: whether :meth:`load` can return 8-bit pixels (``raw=True``) for :meth:`normalize` to finish elsewhere
        self.raw_ok = self._tail is not None and not self._tail.normalize.inplace

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """8-bit pixels from ``load(..., raw=True)`` (``[3, H, W]`` or a batch) -> the float32 pixels ``load`` would
        have returned, bit for bit, computed on ``x``'s device (e.g. after a 4x smaller copy to the GPU)."""
        if not self.raw_ok:
            raise ImageError("this preprocess has no 8-bit path (its transform does not end in ToTensor, Normalize)")
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() < 3 or x.shape[-3] != 3:
            # float pixels would be normalised twice, [1, H, W] broadcast to three channels: refuse, do not guess
            what = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ImageError(f"normalize takes uint8 pixels [..., 3, H, W] from load(raw=True), got {what}")
        return self._tail.normalize_u8(x)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` the resize step produces from a ``width x height`` image (as torchvision and
        open_clip compute it)."""
        th, tw = self.size
        if self.resize_mode == "squash":
            return tw, th
        if self.resize_mode == "shortest" and th == tw:  # torchvision Resize(int): short side -> size
            if width <= height:
                return th, int(th * height / width)
            return int(th * width / height), th
        rh, rw = height / th, width / tw  # open_clip ResizeKeepRatio
        ratio = max(rh, rw) if self.resize_mode == "longest" else min(rh, rw)
        return round(width / ratio), round(height / ratio)

    def resize_cost(self, width: int, height: int) -> int:
        """Pixels the resize step allocates: its output, and the intermediate of Pillow's two-pass resampling
        (new width x old height)."""
        w, h = self.resized_size(width, height)
        return max(w * h, w * height)

    def check(self, width: int, height: int, label: str, max_pixels: Optional[int] = None) -> None:
        """:class:`ImageError` if resizing a ``width x height`` image would be degenerate or too large."""
        cap = max(self.max_pixels if max_pixels is None else max_pixels, RESIZE_FLOOR * self.size[0] * self.size[1])
        w, h = self.resized_size(width, height)
        if w < 1 or h < 1 or self.resize_cost(width, height) > cap:
            raise ImageError(
                f"{label}: {width}x{height} has too extreme an aspect ratio (resizing it to {w}x{h} "
                f"would exceed the {cap}-pixel limit)"
            )

    def __call__(self, img: Image.Image) -> torch.Tensor:
        label = type(img).__name__
        _check_size(label, img.width, img.height, max(self.max_pixels, img.width * img.height))  # sides only
        self.check(img.width, img.height, label)
        return self.transform(img)

    def load(
        self,
        src: ImageInput,
        name: Optional[str] = None,
        max_pixels: Optional[int] = None,
        reserve: Optional[Callable[[int], ContextManager[Any]]] = None,
        raw: bool = False,
    ) -> torch.Tensor:
        """Decode ``src`` (reduced-scale where possible), check the resize, transform -> ``[3, H, W]``; every
        failure is an :class:`ImageError` naming the input. ``reserve(nbytes)`` is entered with the decode's memory
        bound from the header, before decoding, until the decoded image is freed (the server's decode budget).
        Images this call decodes are closed before it returns, so their pixel memory is freed at once. ``raw``
        (with :attr:`raw_ok`): uint8 pixels before normalisation, finished by :meth:`normalize` (the engines do it
        themselves); float32 otherwise."""
        cap = self.max_pixels if max_pixels is None else max_pixels
        label = _label(src, name)
        with ExitStack() as stack:
            img = stack.enter_context(_opened(src, label, cap, self.draft_size))
            owned = img is not src
            self.check(img.width, img.height, label, cap)  # from the header (reduced size): nothing decoded yet
            if reserve is not None and owned:  # decoded image + the resize's intermediate and output
                stack.enter_context(reserve(decode_cost(img) + 2 * _PIXEL_BYTES * self.resize_cost(*img.size)))
            rgb = _to_rgb(img, label, owned)
            try:
                try:
                    if raw and self.raw_ok:  # resize and crop, then the 8-bit pixels
                        img8 = rgb
                        for step in self.transform.transforms[:-1]:
                            img8 = step(img8)
                        out = self._tail.raw(img8)  # None only for a non-RGB step output: convert, stay 8-bit
                        return out if out is not None else self._tail.raw(img8.convert("RGB"))
                    return self.transform(rgb)
                except _DECODE_ERRORS as e:
                    raise ImageError(f"{label}: cannot preprocess image ({e.__class__.__name__})") from None
            finally:
                if rgb is not src:
                    rgb.close()


def build_transform(cfg: dict[str, Any], max_pixels: int = MAX_PIXELS) -> Preprocess:
    """The artifact's eval transform (a :class:`Preprocess`; callable on PIL images like open_clip's)."""
    return Preprocess(cfg, max_pixels)
