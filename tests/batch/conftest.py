"""Fixtures of the dataset-job tests: the serve tests' tiny artifact, and a directory of reference-task images with
a few hostile files among them (corrupt, not an image, over the pixel cap, over the file-size cap)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from p4q_engine.data.reference import ReferenceDataset
from p4q_engine.runtime.engine import Engine
from tests.serve.conftest import build_tiny_artifact

#: Reference images in the dataset directory; the hostile files come on top.
N_IMAGES = 300
#: name -> why it must be an error row
BAD_FILES = {
    "bad_corrupt.jpg": "cannot decode",
    "bad_text.png": "cannot decode",
    "bad_huge.png": "exceeds the",
    "bad_big_file.bmp": "-byte limit",
}
MAX_FILE_BYTES = 200_000


@pytest.fixture(scope="session")
def artifact(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("batch_artifact")
    return build_tiny_artifact(d / "tiny.p4q", d)


@pytest.fixture(scope="session")
def engine(artifact) -> Engine:
    return Engine.load(artifact, "cpu")


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("batch_images")
    raw = ReferenceDataset("test", size=N_IMAGES, transform=lambda im: im)
    for i in range(N_IMAGES):
        img, _ = raw[i]
        img.save(d / f"img_{i:04d}.{'jpg' if i % 3 == 0 else 'png'}")
    (d / "bad_corrupt.jpg").write_bytes((d / "img_0000.jpg").read_bytes()[:120])
    (d / "bad_text.png").write_text("this is not an image")
    Image.new("RGB", (5000, 4000)).save(d / "bad_huge.png")  # 20 Mpx > the 16.7 Mpx cap
    Image.new("RGB", (300, 300)).save(d / "bad_big_file.bmp")  # 270 kB > MAX_FILE_BYTES
    (d / "README.txt").write_text("ignored: not an image extension")
    return d


def expected_rows(engine: Engine, paths: list[str]) -> list:
    """``Engine.classify`` of each image on its own (the reference the jobs are checked against)."""
    return [engine.classify([p], top_k=5)[0] for p in paths]


def assert_matches(rows: list[dict], preds: list) -> None:
    """Labels exactly, probabilities to 1e-5; where the top-1 margin is a float tie (< 1e-6) the two top labels
    may swap between batchings, so only their set is compared (see p4q_engine/quant/ties.py for the idea)."""
    import pytest

    assert len(rows) == len(preds)
    for row, want in zip(rows, preds):
        assert row["error"] is None, row
        assert row["probs"] == pytest.approx(want.probs, abs=1e-5)
        if len(want.probs) > 1 and want.probs[0] - want.probs[1] < 1e-6:
            assert set(row["labels"][:2]) == set(want.labels[:2])
        else:
            assert row["labels"] == want.labels and row["indices"] == want.indices
            assert row["label"] == want.labels[0]
