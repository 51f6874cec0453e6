"""Class names and zero-shot prompt templates of the public benchmarks.

CIFAR-100 names are the 100 fine labels in torchvision's label order (alphabetical, as stored in the dataset's
``meta`` file) with ``_`` replaced by a space, as in OpenAI CLIP's prompt-engineering notebook; the templates are
that notebook's 18 CIFAR templates. Accuracy numbers are only comparable to published CLIP numbers if both match.

ImageNet names/templates come from open_clip (``IMAGENET_CLASSNAMES``, ``OPENAI_IMAGENET_TEMPLATES``). They are
resolved lazily (module ``__getattr__``) so importing this module - and the CLI's argument parser, which imports
:mod:`p4q_engine.data.datasets` - does not import open_clip. open_clip stores the OpenAI templates as lambdas;
:data:`IMAGENET_TEMPLATES` converts them to ``"... {} ..."`` format strings like every other template here.
"""

from __future__ import annotations

__all__ = [
    "CIFAR100_CLASSNAMES",
    "CIFAR_TEMPLATES",
    "IMAGENET_CLASSNAMES",
    "IMAGENET_TEMPLATES",
    "OPENAI_IMAGENET_TEMPLATES",
]

CIFAR100_CLASSNAMES: tuple[str, ...] = (
    "apple",
    "aquarium fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak tree",
    "orange",
    "orchid",
    "otter",
    "palm tree",
    "pear",
    "pickup truck",
    "pine tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow tree",
    "wolf",
    "woman",
    "worm",
)

CIFAR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)


def _imagenet_classnames() -> tuple[str, ...]:
    from open_clip import IMAGENET_CLASSNAMES as names

    return tuple(names)


def _imagenet_templates() -> tuple[str, ...]:
    """open_clip >= 2.24 stores the templates as ``lambda c: f"..."``; render them with ``"{}"`` so they are
    ``str.format`` templates (older releases stored strings already)."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES as templates

    return tuple(t("{}") if callable(t) else str(t) for t in templates)


_LAZY = {
    "IMAGENET_CLASSNAMES": _imagenet_classnames,
    "IMAGENET_TEMPLATES": _imagenet_templates,
    "OPENAI_IMAGENET_TEMPLATES": _imagenet_templates,
}


def __getattr__(name: str):
    if name in _LAZY:
        value = _LAZY[name]()
        globals()[name] = value  # cache: later look-ups bypass __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
