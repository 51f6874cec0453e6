"""Offline batch classification of datasets: ``p4q classify --input ... --output results.parquet [--ray]``.

:mod:`~p4q_engine.batch.sources` (what is read, in bounded work units), :mod:`~p4q_engine.batch.classify` (the
local job and the output rows) and :mod:`~p4q_engine.batch.ray_job` (the same job as a Ray Data pipeline).
"""
