"""Shared fixtures for the artifact and runtime tests: a tiny open_clip ViT, calibrated fake-quant models and folded
``.p4q`` artifacts built from them.

Everything expensive is cached per session (the model, each calibrated bit configuration, each saved artifact) so the
whole artifact/runtime suite builds each configuration once. ``tests/runtime`` imports these fixtures explicitly
(a conftest in a sibling directory is not visible to it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import open_clip
import pytest
import torch
import torch.nn.functional as F

from p4q_engine.artifact.fold import fold
from p4q_engine.artifact.format import Artifact, save
from p4q_engine.clip.calibrate import calibrate
from p4q_engine.clip.qmodel import QuantCLIP, quantize_clip
from p4q_engine.clip.recipe import QuantRecipe
from p4q_engine.p4q.adapter import QAdapter

TINY_NAME = "P4Q-Test-Tiny-ViT"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2},
}
EOT_ID = 99  # the largest id, so argmax pooling finds it
NUM_CLASSES = 10
CLASSNAMES = [f"class {i}" for i in range(NUM_CLASSES)]
#: The bit configurations / scopes the runtime parity tests cover.
BIT_CONFIGS = ("fp32", "8-8-8", "4-4-8", "3-3-8", "2-2-8")
SCOPES = ("full", "release")
#: minmax keeps calibration at a fraction of a second; the engine executes whatever qparams were frozen.
OBSERVER = "minmax"


def make_tokens(n: int, context_length: int = 16, seed: int = 0) -> torch.Tensor:
    """Random token ids 1..97, then the EOT id 99 at a per-row position, then zeros."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.zeros(n, context_length, dtype=torch.long)
    for i in range(n):
        length = 2 + i % (context_length - 3)
        tok[i, :length] = torch.randint(1, 98, (length,), generator=g)
        tok[i, length] = EOT_ID
    return tok


def make_images(n: int, seed: int) -> torch.Tensor:
    """Random 'preprocessed' pixels ``[n, 3, 32, 32]`` (roughly the range of normalised images)."""
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@dataclass
class Folded:
    """A calibrated fake-quant model, its adapter, the folded artifact and where it was saved."""

    bits: str
    scope: str
    qmodel: QuantCLIP
    adapter: Optional[QAdapter]
    text_features: torch.Tensor
    artifact: Artifact
    path: Path

    @torch.no_grad()
    def reference_logits(self, images: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
        """Fake-quant reference logits against the (dequantized 8-bit) class features the engine holds."""
        z = self.qmodel.encode_image(images)
        if self.adapter is not None:
            z = self.adapter(z)
        return F.normalize(z, dim=-1) @ text.T * logit_scale


def _single_thread() -> Callable:
    @pytest.fixture(scope="module", autouse=True)
    def single_torch_thread():
        """The tiny model is far faster single-threaded, and CI boxes are shared: avoid oversubscription."""
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(before)

    return single_torch_thread


single_torch_thread = _single_thread()


@pytest.fixture(scope="session")
def tiny_model_name(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("model_configs")
    (d / f"{TINY_NAME}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(d)
    return TINY_NAME


@pytest.fixture(scope="session")
def tiny_model(tiny_model_name):
    torch.manual_seed(0)
    return open_clip.create_model(tiny_model_name).eval()


@pytest.fixture(scope="session")
def tiny_preprocess_cfg(tiny_model) -> dict:
    return dict(open_clip.get_model_preprocess_cfg(tiny_model))


@pytest.fixture(scope="session")
def class_tokens() -> torch.Tensor:
    return make_tokens(NUM_CLASSES, TINY_CFG["text_cfg"]["context_length"], seed=1)


@pytest.fixture(scope="session")
def calib_images() -> torch.Tensor:
    return make_images(96, seed=2)


@pytest.fixture(scope="session")
def quant_clip(tiny_model, class_tokens, calib_images) -> Callable[[str, str], QuantCLIP]:
    """Factory ``quant_clip(bits, scope)``: a calibrated :class:`QuantCLIP` of the tiny model (cached)."""
    cache: dict[tuple[str, str], QuantCLIP] = {}

    def get(bits: str, scope: str = "full") -> QuantCLIP:
        key = (bits, scope)
        if key not in cache:
            q = quantize_clip(tiny_model, QuantRecipe(bits, scope=scope, observer=OBSERVER))
            if not q.is_float:
                calibrate(q, [calib_images[:32]], class_tokens, progress=False)
            cache[key] = q
        return cache[key]

    return get


def calibrated_adapter(q: QuantCLIP, images: torch.Tensor, dim: int = 32) -> QAdapter:
    ad = QAdapter(dim, seed=0)
    ad.in_quant.start_calibration()
    ad.fc2.input_quant.start_calibration()
    with torch.no_grad():
        ad(q.encode_image(images))
    ad.in_quant.freeze()
    ad.fc2.input_quant.freeze()
    return ad.eval()


@pytest.fixture(scope="session")
def folded(quant_clip, class_tokens, calib_images, tiny_preprocess_cfg, tmp_path_factory) -> Callable[..., Folded]:
    """Factory ``folded(bits, scope, adapter=True)``: a folded artifact saved to a session temp dir (cached)."""
    cache: dict[tuple[str, str, bool], Folded] = {}
    root = tmp_path_factory.mktemp("artifacts")

    def get(bits: str = "3-3-8", scope: str = "full", adapter: bool = True) -> Folded:
        key = (bits, scope, adapter)
        if key not in cache:
            q = quant_clip(bits, scope)
            ad = calibrated_adapter(q, calib_images) if adapter else None
            with torch.no_grad():
                tf = F.normalize(q.encode_text(class_tokens), dim=-1)
            art = fold(q, tf, CLASSNAMES, tiny_preprocess_cfg, adapter=ad, meta={"name": TINY_NAME})
            path = root / f"tiny_{bits}_{scope}_{'ad' if adapter else 'noad'}.p4q"
            save(art, path)
            cache[key] = Folded(bits, scope, q, ad, tf, art, path)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def artifact_path(folded) -> Path:
    """A real saved artifact (3-3-8, full scope, with QAdapter): two bit planes per packed weight."""
    return folded("3-3-8", "full").path


@pytest.fixture(scope="module")
def artifact_bytes(artifact_path) -> bytes:
    return artifact_path.read_bytes()
