"""The embedded reference task: a deterministic, download-free synthetic captioned-image dataset.

Each image is one coloured shape (10 shapes x 10 colours = 100 classes, ``label = shape * 10 + colour``) on a
plain, gradient or low-contrast textured background, with pixel noise, rendered at 2x and box-downsampled to
32 x 32. Every image is a pure function of ``(split, index)``: its random parameters come from a numpy
``Generator`` seeded with a BLAKE2b digest of the split name and index (never Python's ``hash()``), so pixels are
identical across runs, processes and platforms.

Twenty colour+shape combinations (:data:`HELD_OUT_CLASSES`, a Latin-square pattern: two colours per shape, two
shapes per colour) never appear in the ``train`` / ``calib`` splits. The ``test`` split draws **only** from them
and is scored as 100-way classification, so zero-shot accuracy there measures compositional generalisation of a
CLIP that saw every colour and every shape but never that pairing. ``test_seen`` draws from the 80 seen classes
with its own image seeds.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from p4q_engine.errors import ConfigError, DatasetError

__all__ = [
    "SHAPES",
    "COLOURS",
    "COLOUR_RGB",
    "BACKGROUNDS",
    "REFERENCE_CLASSNAMES",
    "REFERENCE_TEMPLATES",
    "HELD_OUT_CLASSES",
    "SEEN_CLASSES",
    "SPLITS",
    "DEFAULT_SPLIT_SIZES",
    "REFERENCE_MEAN",
    "REFERENCE_STD",
    "REFERENCE_IMAGE_SIZE",
    "RENDER_VERSION",
    "class_label",
    "class_name",
    "split_classes",
    "split_label",
    "render",
    "render_array",
    "render_tensor_batch",
    "cached_split",
    "cache_dir",
    "reference_transform",
    "normalize_uint8",
    "vocabulary_words",
    "ReferenceDataset",
]

RENDER_VERSION = "v2"  # bump when rendering changes: it is part of every image seed and of the cache key

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "cross",
    "star",
    "ring",
    "moon",
    "arrow",
    "bar",
)
COLOURS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "cyan",
    "blue",
    "purple",
    "pink",
    "brown",
    "white",
)
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (240, 135, 20),
    "yellow": (235, 215, 40),
    "green": (40, 160, 50),
    "cyan": (40, 200, 210),
    "blue": (35, 70, 215),
    "purple": (125, 45, 180),
    "pink": (245, 130, 190),
    "brown": (125, 75, 35),
    "white": (240, 240, 240),
}
# Background palette (low saturation, so the object's colour is the salient one).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (120, 120, 120),
    "silver": (180, 180, 182),
    "black": (22, 22, 24),
    "white": (232, 232, 232),
    "beige": (212, 198, 168),
    "charcoal": (58, 58, 64),
}
_MIN_BG_CONTRAST = 110.0  # euclidean RGB distance between object colour and background base colour

REFERENCE_CLASSNAMES: list[str] = [f"{c} {s}" for s in SHAPES for c in COLOURS]

# Zero-shot prompt templates (CLIP-style ensemble). Their prefixes also occur in training captions.
REFERENCE_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image showing a {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
    "a {}.",
)

# Latin square: shape s never co-occurs with colours (s + 3) % 10 and (s + 7) % 10 in train/calib.
_HELD_OUT_OFFSETS = (3, 7)
HELD_OUT_CLASSES: tuple[int, ...] = tuple(
    sorted(s * len(COLOURS) + (s + o) % len(COLOURS) for s in range(len(SHAPES)) for o in _HELD_OUT_OFFSETS)
)
SEEN_CLASSES: tuple[int, ...] = tuple(i for i in range(len(REFERENCE_CLASSNAMES)) if i not in set(HELD_OUT_CLASSES))

ALL_CLASSES: tuple[int, ...] = tuple(range(len(REFERENCE_CLASSNAMES)))
# ``adapt`` / ``adapt_test``: the P4Q (downstream adaptation) task - labelled images of all 100 classes, as
# ImageNet's train/val are for the paper. They are new splits (own seeds), so adding them changed no other image.
SPLITS: tuple[str, ...] = ("train", "calib", "test", "test_seen", "adapt", "adapt_test")
DEFAULT_SPLIT_SIZES: dict[str, int] = {
    "train": 60000,
    "calib": 1024,
    "test": 2000,
    "test_seen": 2000,
    "adapt": 2000,
    "adapt_test": 2000,
}
_SPLIT_CLASSES: dict[str, tuple[int, ...]] = {
    "train": SEEN_CLASSES,
    "calib": SEEN_CLASSES,
    "test": HELD_OUT_CLASSES,
    "test_seen": SEEN_CLASSES,
    "adapt": ALL_CLASSES,
    "adapt_test": ALL_CLASSES,
}

# open_clip's default (OpenAI) normalisation, so open_clip.create_model_and_transforms("P4Q-Ref-Tiny") gives
# exactly the same preprocessing as reference_transform().
REFERENCE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
REFERENCE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
REFERENCE_IMAGE_SIZE = 32
_SS = 2  # supersampling factor of the shape mask
_R_MIN, _R_MAX = 7.0, 13.5  # object "radius" in pixels
_MAX_ROT = 0.4  # radians

# ---------------------------------------------------------------- captions
_SIZE_WORDS = ("small", "medium", "large")
_POS_PHRASES = {
    (0, 0): "in the top left",
    (0, 1): "at the top",
    (0, 2): "in the top right",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "in the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right",
}
_CAPTION_PREFIXES = (
    "a photo of a",
    "a picture of a",
    "an image showing a",
    "a drawing of a",
    "a rendering of a",
    "a",
    "there is a",
    "this is a",
    "a close up of a",
    "",
)


def class_label(shape: int | str, colour: int | str) -> int:
    """``shape * len(COLOURS) + colour`` (indices or names)."""
    s = SHAPES.index(shape) if isinstance(shape, str) else int(shape)
    c = COLOURS.index(colour) if isinstance(colour, str) else int(colour)
    return s * len(COLOURS) + c


def class_name(label: int) -> str:
    return REFERENCE_CLASSNAMES[int(label)]


def split_classes(split: str) -> tuple[int, ...]:
    """The class indices a split draws from."""
    _check_split(split)
    return _SPLIT_CLASSES[split]


def split_label(split: str, index: int) -> int:
    """Label of image ``index`` of ``split``: the split's classes in round-robin order (balanced)."""
    classes = split_classes(split)
    return classes[int(index) % len(classes)]


def vocabulary_words() -> list[str]:
    """Sorted closed vocabulary (lowercase words and punctuation) of every caption, template and class name."""
    texts = list(REFERENCE_CLASSNAMES) + [t.replace("{}", " ") for t in REFERENCE_TEMPLATES]
    texts += list(_SIZE_WORDS) + list(_POS_PHRASES.values()) + list(_CAPTION_PREFIXES)
    texts += [f"on a {b} background" for b in BACKGROUNDS] + ["."]
    words: set[str] = set()
    for t in texts:
        words.update(split_words(t))
    return sorted(words)


def split_words(text: str) -> list[str]:
    """Lowercase and split into word / punctuation tokens (the tokenizer's pre-tokenisation)."""
    import re

    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def _caption(rng: np.random.Generator, colour: str, shape: str, size_word: str, pos: str, bg: str) -> str:
    prefix = _CAPTION_PREFIXES[int(rng.integers(len(_CAPTION_PREFIXES)))]
    parts = [prefix] if prefix else []
    if rng.random() < 0.5:
        parts.append(size_word)
    parts += [colour, shape]
    if rng.random() < 0.4:
        parts.append(pos)
    if rng.random() < 0.3:
        parts.append(f"on a {bg} background")
    text = " ".join(parts)
    return text + "." if rng.random() < 0.7 else text


# ---------------------------------------------------------------- geometry (unit coordinates, radius ~1)
def _regular(n: int, r: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _rect(w: float, h: float) -> np.ndarray:
    return np.array([[-w, -h], [w, -h], [w, h], [-w, h]], dtype=np.float64)


def _star() -> np.ndarray:
    outer, inner = _regular(5, 1.0), _regular(5, 0.42, -math.pi / 2 + math.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


_ARROW = np.array([[-1.0, -0.22], [0.15, -0.22], [0.15, -0.6], [1.0, 0.0], [0.15, 0.6], [0.15, 0.22], [-1.0, 0.22]])

# shape -> list of (polygon, fill) drawn in order onto the mask (fill 0 cuts holes)
_SHAPE_POLYS: dict[str, list[tuple[np.ndarray, int]]] = {
    "circle": [(_regular(48, 0.95), 255)],
    "square": [(_rect(0.78, 0.78), 255)],
    "triangle": [(_regular(3, 1.05, -math.pi / 2) + [0, 0.2], 255)],
    "diamond": [(np.array([[0, -1.0], [0.6, 0], [0, 1.0], [-0.6, 0]]), 255)],
    "cross": [(_rect(0.95, 0.3), 255), (_rect(0.3, 0.95), 255)],
    "star": [(_star(), 255)],
    "ring": [(_regular(48, 0.98), 255), (_regular(48, 0.55), 0)],
    "moon": [(_regular(48, 0.95), 255), (_regular(48, 0.78) + [0.5, -0.15], 0)],
    "arrow": [(_ARROW, 255)],
    "bar": [(_rect(1.0, 0.26), 255)],
}
assert tuple(_SHAPE_POLYS) == SHAPES


# ---------------------------------------------------------------- rendering
def _seed(split: str, index: int) -> int:
    d = hashlib.blake2b(f"p4q-ref|{RENDER_VERSION}|{split}|{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little")


def _check_split(split: str) -> None:
    if split not in _SPLIT_CLASSES:
        raise ConfigError(f"unknown reference split {split!r}; choose from {', '.join(SPLITS)}")


def _background(rng: np.random.Generator, base: np.ndarray, n: int) -> np.ndarray:
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / (n - 1)
    if kind == 0:  # plain
        bg = np.broadcast_to(base, (n, n, 3)).astype(np.float32)
    elif kind == 1:  # linear gradient towards a darker / lighter version of the base colour
        ang = rng.uniform(0, 2 * math.pi)
        t = (np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5)) + 0.5
        other = np.clip(base * rng.uniform(0.55, 1.35) + rng.normal(0, 12, 3), 0, 255)
        bg = base[None, None] * (1 - t[..., None]) + other[None, None] * t[..., None]
    else:  # low-contrast texture: bilinearly upsampled coarse noise, or stripes
        if rng.random() < 0.5:
            g = int(rng.integers(3, 7))
            coarse = rng.normal(0, 1, (g, g, 3)).astype(np.float32)
            img = Image.fromarray(((coarse + 4) * 32).clip(0, 255).astype(np.uint8)).resize((n, n), Image.BILINEAR)
            tex = np.asarray(img, np.float32) / 32 - 4
            bg = base[None, None] + tex * rng.uniform(10, 22)
        else:
            ang, freq = rng.uniform(0, math.pi), rng.uniform(3, 9)
            s = np.sin(2 * math.pi * freq * (np.cos(ang) * xx + np.sin(ang) * yy) + rng.uniform(0, 6.3))
            bg = base[None, None] + s[..., None] * rng.uniform(8, 20)
    return bg.astype(np.float32)


def render_array(index: int, split: str) -> tuple[np.ndarray, int, str]:
    """``(uint8 [32, 32, 3], label, caption)`` for image ``index`` of ``split`` (deterministic)."""
    _check_split(split)
    label = split_label(split, index)
    rng = np.random.default_rng(_seed(split, index))
    shape, colour = SHAPES[label // len(COLOURS)], COLOURS[label % len(COLOURS)]
    n = REFERENCE_IMAGE_SIZE

    # object colour with brightness + per-channel jitter
    rgb = np.array(COLOUR_RGB[colour], np.float32)
    rgb = np.clip(rgb * rng.uniform(0.85, 1.1) + rng.normal(0, 10, 3), 0, 255)
    # background base colour with enough contrast to the object
    names = [
        b
        for b, v in BACKGROUNDS.items()
        if np.linalg.norm(np.array(COLOUR_RGB[colour], np.float32) - v) > _MIN_BG_CONTRAST
    ]
    bg_name = names[int(rng.integers(len(names)))]
    base = np.clip(np.array(BACKGROUNDS[bg_name], np.float32) + rng.normal(0, 10, 3), 0, 255)

    # geometry: radius in pixels, centre, rotation
    r = float(rng.uniform(_R_MIN, _R_MAX))
    margin = 0.6 * r
    cx, cy = rng.uniform(margin, n - margin, 2)
    ang = rng.uniform(-_MAX_ROT, _MAX_ROT)
    aspect = rng.uniform(0.85, 1.15)
    rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])

    big = n * _SS
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for poly, fill in _SHAPE_POLYS[shape]:
        p = poly * np.array([r * aspect, r / aspect])
        p = p @ rot.T + np.array([cx, cy])
        draw.polygon([(float(x) * _SS, float(y) * _SS) for x, y in p], fill=fill)
    alpha = np.asarray(mask.resize((n, n), Image.BOX), np.float32)[..., None] / 255.0

    bg = _background(rng, base, n)
    # sparse low-contrast clutter: a few faint specks in background-ish tones
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = rng.integers(0, n - 2, 2)
        w, h = rng.integers(1, 4, 2)
        bg[y0 : y0 + h, x0 : x0 + w] += rng.normal(0, 18, 3)
    img = bg * (1 - alpha) + rgb[None, None] * alpha
    img += rng.normal(0, rng.uniform(2.0, 10.0), img.shape)
    arr = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    size_word = _SIZE_WORDS[0 if r < 9.2 else (1 if r < 11.4 else 2)]
    row, col = min(int(cy // (n / 3)), 2), min(int(cx // (n / 3)), 2)
    caption = _caption(rng, colour, shape, size_word, _POS_PHRASES[(row, col)], bg_name)
    return arr, label, caption


def render(index: int, split: str) -> tuple[Image.Image, int, str]:
    """``(PIL RGB 32 x 32, label, caption)`` for image ``index`` of ``split`` (deterministic)."""
    arr, label, caption = render_array(index, split)
    return Image.fromarray(arr, "RGB"), label, caption


def render_tensor_batch(split: str, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images ``start .. start+count-1`` of ``split`` as ``(uint8 [N, 3, 32, 32], int64 labels [N], captions)``."""
    _check_split(split)
    if count < 0 or start < 0:
        raise ConfigError("start and count must be non-negative")
    n = REFERENCE_IMAGE_SIZE
    out = np.empty((count, n, n, 3), np.uint8)
    labels = np.empty(count, np.int64)
    captions: list[str] = []
    for k in range(count):
        out[k], labels[k], cap = render_array(start + k, split)
        captions.append(cap)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels), captions


def cache_dir() -> Path:
    """``$P4Q_CACHE`` or ``~/.cache/p4q_engine``."""
    return Path(os.environ.get("P4Q_CACHE") or Path.home() / ".cache" / "p4q_engine")


def cached_split(
    split: str, count: int, use_cache: bool = True, progress: Optional[Callable[[int], None]] = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Like ``render_tensor_batch(split, 0, count)`` but cached on disk (``cache_dir()/reference``), keyed by
    render version, split and count. A corrupt cache file is re-rendered."""
    path = cache_dir() / "reference" / f"{RENDER_VERSION}_{split}_{count}.npz"
    if use_cache and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                imgs, labels, caps = z["images"], z["labels"], [str(c) for c in z["captions"]]
            if imgs.shape == (count, 3, REFERENCE_IMAGE_SIZE, REFERENCE_IMAGE_SIZE) and len(caps) == count:
                return torch.from_numpy(imgs), torch.from_numpy(labels), caps
        except Exception:  # noqa: BLE001 - any unreadable cache is simply rebuilt
            pass
    chunks, step = [], 2000
    for s in range(0, count, step):
        chunks.append(render_tensor_batch(split, s, min(step, count - s)))
        if progress is not None:
            progress(min(step, count - s))
    imgs = torch.cat([c[0] for c in chunks]) if chunks else torch.empty(0, 3, 32, 32, dtype=torch.uint8)
    labels = torch.cat([c[1] for c in chunks]) if chunks else torch.empty(0, dtype=torch.int64)
    caps = [c for ch in chunks for c in ch[2]]
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
            np.savez(tmp, images=imgs.numpy(), labels=labels.numpy(), captions=np.array(caps))
            os.replace(tmp, path)
        except OSError:
            pass
    return imgs, labels, caps


# ---------------------------------------------------------------- transforms / dataset
def reference_transform(image_size: int = REFERENCE_IMAGE_SIZE):
    """torchvision transform for PIL images: (resize to ``image_size`` if needed) + ToTensor + Normalize."""
    from torchvision import transforms as T

    steps = []
    if image_size != REFERENCE_IMAGE_SIZE:
        steps += [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    steps += [T.ToTensor(), T.Normalize(REFERENCE_MEAN, REFERENCE_STD)]
    return T.Compose(steps)


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` -> float32 normalised with the reference mean/std (same as reference_transform)."""
    mean = torch.tensor(REFERENCE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(REFERENCE_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


class ReferenceDataset(torch.utils.data.Dataset):
    """Split of the embedded reference task. ``__getitem__`` returns ``(image, label)`` (plus the caption when
    ``with_captions``); ``image`` is ``transform(pil)`` if a transform is given, else the normalised float
    tensor ``[3, 32, 32]``. ``classnames`` always lists all 100 classes (zero-shot is 100-way)."""

    def __init__(self, split: str = "test", size: Optional[int] = None, transform=None, with_captions: bool = False):
        _check_split(split)
        size = DEFAULT_SPLIT_SIZES[split] if size is None else int(size)
        if size < 0:
            raise ConfigError(f"dataset size must be >= 0, got {size}")
        self.split, self.size, self.transform, self.with_captions = split, size, transform, with_captions
        self.classnames: list[str] = list(REFERENCE_CLASSNAMES)
        self.templates: tuple[str, ...] = REFERENCE_TEMPLATES
        self.classes: tuple[int, ...] = _SPLIT_CLASSES[split]
        self._default = reference_transform()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        if not -self.size <= index < self.size:
            raise IndexError(index)
        index %= self.size
        try:
            pil, label, caption = render(index, self.split)
        except Exception as e:  # noqa: BLE001
            raise DatasetError(f"cannot render reference image {self.split}[{index}]: {e}") from e
        image = self.transform(pil) if self.transform is not None else self._default(pil)
        return (image, label, caption) if self.with_captions else (image, label)

    def __repr__(self) -> str:
        return f"ReferenceDataset(split={self.split!r}, size={self.size})"
