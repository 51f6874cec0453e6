"""Image decoding and the artifact's preprocessing, with errors that name the offending input."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable, Union

import torch
from PIL import Image, UnidentifiedImageError

from p4q_engine.errors import ImageError

ImageInput = Union[str, Path, bytes, Image.Image]

#: Refuse images with more pixels than this (decompression bombs); PIL's own limit is only a warning below 2x.
MAX_PIXELS = 50_000_000


def decode_image(src: ImageInput, name: str | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open ``src`` (path, bytes or PIL image) as RGB; raise :class:`ImageError` naming it if unusable."""
    label = name or (str(src) if isinstance(src, (str, Path)) else type(src).__name__)
    if isinstance(src, Image.Image):
        img = src
    else:
        try:
            fp = io.BytesIO(src) if isinstance(src, bytes) else open(src, "rb")
        except OSError as e:
            raise ImageError(f"{label}: cannot open ({e.strerror or e})") from None
        try:
            with fp:
                img = Image.open(fp)
                if img.width * img.height > max_pixels:
                    raise ImageError(f"{label}: {img.width}x{img.height} exceeds the {max_pixels}-pixel limit")
                img.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ImageError(f"{label}: cannot decode image ({e.__class__.__name__})") from None
    if img.width < 2 or img.height < 2:
        raise ImageError(f"{label}: image is {img.width}x{img.height}; at least 2x2 pixels are needed")
    return img.convert("RGB")


def build_transform(cfg: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """The eval transform recorded in an artifact (open_clip's ``image_transform`` from its preprocess config)."""
    from open_clip import image_transform

    size = cfg["size"]
    return image_transform(
        tuple(size) if isinstance(size, list) else size,
        is_train=False,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        resize_mode=cfg.get("resize_mode", "shortest"),
        interpolation=cfg.get("interpolation", "bicubic"),
    )
