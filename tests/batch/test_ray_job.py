"""``p4q classify --ray`` on a local Ray cluster (``ray.init(num_cpus=2)``): the Ray Data pipeline's rows equal the
local job's and ``Engine.classify``'s, image for image, with the same error rows - for a directory of a few hundred
reference images with hostile files among them, and for a Parquet file of image bytes."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from p4q_engine.batch.classify import JobOptions, run_local  # noqa: E402
from p4q_engine.batch.ray_job import RayJobOptions, run_ray  # noqa: E402
from tests.batch.conftest import BAD_FILES, MAX_FILE_BYTES, N_IMAGES, assert_matches, expected_rows  # noqa: E402

OPTIONS = JobOptions(max_file_bytes=MAX_FILE_BYTES, batch_size=32)
#: One decoder and one engine actor: both fit the 2-CPU cluster with room for Ray Data's own tasks.
PLACEMENT = RayJobOptions(actors=1, cpus_per_actor=0.5, decoders=1, device="cpu")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_rows_equal_local_rows_and_engine_classify(cluster, artifact, engine, dataset, tmp_path):
    res = run_ray(str(artifact), str(dataset), str(tmp_path / "ray.parquet"), OPTIONS, PLACEMENT, progress=False)
    rows = pq.read_table(tmp_path / "ray.parquet").to_pylist()
    assert res.images == len(rows) == N_IMAGES + len(BAD_FILES) and res.errors == len(BAD_FILES)
    local = run_local(engine, str(dataset), str(tmp_path / "local.parquet"), OPTIONS, progress=False)
    assert local.images == res.images
    local_rows = pq.read_table(tmp_path / "local.parquet").to_pylist()
    assert [r["index"] for r in rows] == [r["index"] for r in local_rows] == list(range(len(rows)))
    assert [(r["source"], r["error"]) for r in rows] == [(r["source"], r["error"]) for r in local_rows]
    good = [r for r in rows if r["error"] is None]
    assert_matches(good, expected_rows(engine, [r["source"] for r in good]))


def test_ray_parquet_bytes_with_bad_cells(cluster, artifact, engine, dataset, tmp_path):
    blobs = [f.read_bytes() for f in sorted(dataset.glob("img_*.png"))[:60]]
    cells = blobs[:30] + [b"\xff\xd8 not really a jpeg"] + blobs[30:]
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"image": pa.array(cells, pa.binary())}), src, row_group_size=16)
    run_ray(str(artifact), str(src), str(tmp_path / "out.parquet"), OPTIONS, PLACEMENT, progress=False)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["source"] for r in rows] == [f"{src}#{i}" for i in range(len(cells))]
    assert rows[30]["error"] and "cannot decode" in rows[30]["error"]
    assert_matches(rows[:30] + rows[31:], expected_rows(engine, blobs))
