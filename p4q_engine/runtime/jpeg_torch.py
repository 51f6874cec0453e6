"""Baseline JPEGs decoded and preprocessed by torchvision on a device (nvJPEG with ``device="cuda"``), under the same
limits as the Pillow path of :mod:`p4q_engine.runtime.images`.

Why: at high request rates the serving process's CPU, not the GPU, is the limit - Pillow decoding of a 224 px JPEG
costs about as much CPU as the engine's share of it. :class:`TorchJpegLoader` has :meth:`Preprocess.load`'s
signature, so the server's request path (``inputs.prepare_images``) uses it unchanged.

Limits, checked from the header with Pillow before any pixel is decoded (exactly the checks of ``images._opened``):
only the accepted formats, the ``max_pixels`` cap on the *full* size (nvJPEG has no reduced-scale decoding: a
baseline JPEG declaring more goes to the Pillow path, which decodes it reduced or refuses it as before), sides
2..65535, and the resize bound of :meth:`Preprocess.check`. The decoded bytes are reserved in the caller's budget
(``reserve``) like a Pillow decode.
Everything else - PNG and the other formats, progressive JPEGs, CMYK/YCCK JPEGs and ``longest`` resize mode - goes
through the Pillow path, so every input gets an answer.

Pixels differ slightly from Pillow's (libjpeg vs nvJPEG IDCT, torchvision's antialiased bicubic vs Pillow's): a
few grey levels, see tests/runtime/test_jpeg_torch.py. The result is returned on the CPU so it batches with
Pillow-decoded images.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable, ContextManager, Optional

import torch

from p4q_engine.errors import ConfigError, ImageError
from p4q_engine.runtime.images import _PIXEL_BYTES, ImageInput, Preprocess, _label, _opened

#: JPEG colour modes nvJPEG turns into RGB the way libjpeg does (CMYK/YCCK go through Pillow).
_MODES = ("RGB", "L")


def check_decode_device(device: str) -> torch.device:
    """The decode device, or a :class:`ConfigError` (one CLI line) if it cannot decode here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown --decode-device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--decode-device {device}: no CUDA GPU is available here (use --decode-device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--decode-device must be cpu or cuda[:N], got {device!r}")
    return dev


class TorchJpegLoader:
    """:meth:`Preprocess.load` with torchvision's decoder for baseline JPEG bytes (see the module docstring)."""

    def __init__(self, preprocess: Preprocess, device: str = "cuda") -> None:
        self.preprocess = preprocess
        self.device = check_decode_device(device)
        self.size = preprocess.size
        self.max_pixels = preprocess.max_pixels
        steps = preprocess.reference_transform.transforms  # open_clip's: Resize, [CenterCrop], ..., Normalize
        norm = steps[-1]
        self.interpolation = steps[0].interpolation
        self.mean = torch.tensor(norm.mean, dtype=torch.float32, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(norm.std, dtype=torch.float32, device=self.device).view(3, 1, 1)
        #: Images decoded by torchvision / handed to Pillow (for tests and metrics).
        self.decoded = self.fallbacks = 0
        #: no 8-bit path: its pixels are normalised on the decode device already (not the Preprocess's attribute)
        self.raw_ok = False

    def __getattr__(self, name: str) -> Any:  # resized_size, check, draft_size ...: the Pillow transform's
        return getattr(self.preprocess, name)

    def _torch_path(self, src: ImageInput) -> bool:
        return isinstance(src, (bytes, bytearray, memoryview)) and self.preprocess.resize_mode != "longest"

    def load(
        self,
        src: ImageInput,
        name: Optional[str] = None,
        max_pixels: Optional[int] = None,
        reserve: Optional[Callable[[int], ContextManager[Any]]] = None,
    ) -> torch.Tensor:
        """``[3, H, W]`` float32 on the CPU, like :meth:`Preprocess.load`; every failure an :class:`ImageError`."""
        if not self._torch_path(src):
            self.fallbacks += 1
            return self.preprocess.load(src, name=name, max_pixels=max_pixels, reserve=reserve)
        cap = self.max_pixels if max_pixels is None else max_pixels
        label = _label(src, name)
        with ExitStack() as stack:
            if not self._fits(src, cap):  # over the cap at full size: Pillow decides (reduced decode, or refuse)
                stack.close()
                self.fallbacks += 1
                return self.preprocess.load(src, name=name, max_pixels=max_pixels, reserve=reserve)
            img = stack.enter_context(_opened(src, label, cap, None))  # header checks; draft None: full-size cap
            if img.format != "JPEG" or img.info.get("progressive") or img.mode not in _MODES:
                self.fallbacks += 1
                stack.close()
                return self.preprocess.load(src, name=name, max_pixels=max_pixels, reserve=reserve)
            w, h = img.size
            self.preprocess.check(w, h, label, cap)
            if reserve is not None:  # decoded RGB + the resize's output, as the Pillow path reserves
                stack.enter_context(reserve(w * h * 3 + 2 * _PIXEL_BYTES * self.preprocess.resize_cost(w, h)))
            rgb = self._decode(bytes(src), label)
            self.decoded += 1
            return self._transform(rgb, label).cpu()

    @staticmethod
    def _fits(src: bytes, cap: int) -> bool:
        """Whether the header's full size is within ``cap`` (unreadable headers: let the Pillow path say why)."""
        import io

        from PIL import Image

        try:
            with Image.open(io.BytesIO(src)) as img:
                return img.width * img.height <= cap
        except Exception:  # noqa: BLE001 - any header Pillow cannot read is the Pillow path's error to report
            return False

    def _decode(self, data: bytes, label: str) -> torch.Tensor:
        import warnings

        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; decode_jpeg works as before
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_jpeg(
                    torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB, device=self.device
                )
        except (RuntimeError, ValueError) as e:
            raise ImageError(f"{label}: cannot decode image ({e.__class__.__name__})") from None

    def _transform(self, rgb: torch.Tensor, label: str) -> torch.Tensor:
        """Resize (antialiased bicubic, the Pillow path's size rule), centre crop, scale to [0, 1], normalize."""
        from torchvision.transforms.v2 import functional as F

        h, w = int(rgb.shape[-2]), int(rgb.shape[-1])
        if min(w, h) < 2:
            raise ImageError(f"{label}: decoded to an unusable {w}x{h} image")
        rw, rh = self.preprocess.resized_size(w, h)
        out = F.resize(rgb, [rh, rw], interpolation=self.interpolation, antialias=True)
        out = F.center_crop(out, list(self.size))
        return (out.float() / 255.0 - self.mean) / self.std
