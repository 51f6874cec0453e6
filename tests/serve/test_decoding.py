"""Decoding off the serving process's critical path: ``--decode-processes`` (spawned workers) answers exactly
what the thread pool answers, with the same errors and deadline; ``--decode-device`` options are validated."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from p4q_engine.errors import ConfigError
from p4q_engine.serve.config import ServeConfig
from p4q_engine.serve.decoding import DeviceDecodePool, ProcessDecodePool, make_decoder
from p4q_engine.serve.errors import ServeError
from p4q_engine.serve.inputs import DecodePool, ParsedRequest
from tests.serve.conftest import png


@pytest.fixture(scope="module")
def process_pool(engine):
    pool = ProcessDecodePool(1, engine.transform)
    yield pool
    pool.shutdown()


def _prepare(pool, engine, images, deadline_s=30.0, max_pixels=4096):
    req = ParsedRequest(images, names=[f"images[{i}]" for i in range(len(images))])
    return asyncio.run(pool.prepare(engine, req, max_pixels, time.monotonic() + deadline_s, deadline_s))


def test_process_pool_pixels_equal_thread_pool_pixels(process_pool, engine, good_images):
    threads = DecodePool(1, 2**30)
    try:
        assert torch.equal(_prepare(process_pool, engine, good_images), _prepare(threads, engine, good_images))
    finally:
        threads.shutdown()


def test_process_pool_errors_keep_kind_and_index(process_pool, engine, good_images):
    with pytest.raises(ServeError) as e:
        _prepare(process_pool, engine, [good_images[0], b"junk"])
    assert e.value.kind == "bad_image" and e.value.index == 1 and "images[1]" in e.value.message
    with pytest.raises(ServeError) as e:
        _prepare(process_pool, engine, [png(100, 100)])  # over the 4096-px cap
    assert e.value.kind == "bad_image" and "exceeds" in e.value.message


def test_process_pool_deadline(process_pool, engine, good_images):
    with pytest.raises(ServeError) as e:
        _prepare(process_pool, engine, good_images * 50, deadline_s=0.0)
    assert e.value.kind == "timeout"


def test_make_decoder_picks_the_configured_pool(engine):
    assert type(make_decoder(ServeConfig(), engine)) is DecodePool
    pool = make_decoder(ServeConfig(decode_processes=1), engine)
    assert isinstance(pool, ProcessDecodePool)
    pool.shutdown()


def test_device_pool_on_cpu_decodes_like_pillow(engine, good_images):
    pool = DeviceDecodePool(1, 2**30, "cpu")
    threads = DecodePool(1, 2**30)
    try:
        got, want = _prepare(pool, engine, good_images), _prepare(threads, engine, good_images)
        assert got.dtype == torch.float32 and want.dtype == torch.uint8  # Pillow threads queue 8-bit pixels
        want = engine.transform.normalize(want)
        assert got.shape == want.shape and (got - want).abs().mean() < 0.1
    finally:
        pool.shutdown()
        threads.shutdown()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"decode_processes": 0}, "--decode-processes"),
        ({"decode_device": "gpu"}, "--decode-device"),
        ({"decode_device": "cuda", "decode_processes": 2}, "cannot be combined"),
    ],
)
def test_decode_options_are_validated(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ServeConfig(**kwargs)
