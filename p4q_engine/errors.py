"""Typed errors. Every user-facing failure raises a subclass of :class:`P4QError` so the CLI can print one line
and exit 2 instead of a traceback, and library users can catch one base class."""


class P4QError(Exception):
    """Base class of every error p4q-engine raises on bad input or configuration."""


class ConfigError(P4QError, ValueError):
    """A bad option: unknown bit config, observer, scope, model name ..."""


class DatasetError(P4QError):
    """A dataset is missing, has the wrong layout, or an image cannot be decoded."""


class ModelLoadError(P4QError):
    """A model config, pretrained tag or checkpoint file cannot be loaded."""


class CalibrationError(P4QError, RuntimeError):
    """Quantization parameters were requested before calibration, or calibration saw non-finite values."""


class ImageError(P4QError):
    """An input image cannot be decoded or is unusable (empty, 1 pixel, too large); the message names it."""
