"""The emitters' shared fp32 conversion cache (compiler/emitters/base.py: ConversionCache): one
conversion per model and key, independent copies, and a failed conversion not run again."""

from __future__ import annotations

import pytest

from edgeship.compiler.emitters.base import ConversionCache, convert_fp32
from edgeship.errors import UsageError


def _counting(calls, content=b"fp32 model"):
    def make(path):
        calls.append(path)
        path.write_bytes(content)

    return make


def test_a_conversion_is_made_once_and_every_variant_gets_its_own_copy(tmp_path):
    cache, calls = ConversionCache(tmp_path / "cache"), []
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    cache.fp32("onnx", first, _counting(calls))
    first.write_bytes(b"edited by the first variant")  # emitters edit their fp32 file in place
    cache.fp32("onnx", second, _counting(calls))
    assert len(calls) == 1 and second.read_bytes() == b"fp32 model"
    assert cache.made == {"onnx": 1} and cache.reused == {"onnx": 1}
    # Another key is another conversion.
    cache.fp32("tflite-android-arm64", tmp_path / "c.tflite", _counting(calls, b"tflite"))
    assert len(calls) == 2 and (tmp_path / "c.tflite").read_bytes() == b"tflite"


def test_a_failed_conversion_raises_again_without_converting_again(tmp_path):
    cache, calls = ConversionCache(tmp_path / "cache"), []

    def fail(path):
        calls.append(path)
        raise UsageError("torch.onnx cannot export the model: op foo")

    for _ in range(3):
        with pytest.raises(UsageError, match="op foo"):
            cache.fp32("onnx", tmp_path / "x.onnx", fail)
    assert len(calls) == 1


def test_an_interrupted_conversion_is_not_remembered_as_the_models_fault(tmp_path):
    cache, calls = ConversionCache(tmp_path / "cache"), []

    def interrupted(path):
        calls.append(path)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.fp32("onnx", tmp_path / "x.onnx", interrupted)
    cache.fp32("onnx", tmp_path / "x.onnx", _counting(calls))
    assert len(calls) == 2 and (tmp_path / "x.onnx").read_bytes() == b"fp32 model"


def test_without_a_cache_the_conversion_runs_every_time(tmp_path):
    calls = []
    for _ in range(2):
        convert_fp32(None, "onnx", tmp_path / "x.onnx", _counting(calls))
    assert len(calls) == 2


def test_reference_outputs_are_computed_once_per_distinct_list_of_feeds(tmp_path):
    import numpy as np

    cache, calls = ConversionCache(tmp_path / "cache"), []

    def compute(feed):
        calls.append(feed)
        return {"y": feed["x"] * 2}

    feeds = [{"x": np.arange(3, dtype=np.float32) + i} for i in range(4)]
    first = cache.references(feeds, compute)
    # The next candidate builds its feeds again from the same data: new dicts, same contents.
    again = cache.references([{"x": f["x"].copy()} for f in feeds], compute)
    assert len(calls) == 4 and again is first and np.array_equal(first[3]["y"], feeds[3]["x"] * 2)
    other = cache.references([{"x": feeds[0]["x"] + 1}], compute)
    assert len(calls) == 5 and np.array_equal(other[0]["y"], (feeds[0]["x"] + 1) * 2)
    # Same bytes, another dtype or shape, is another list of feeds.
    cache.references([{"x": f["x"].view(np.int32)} for f in feeds], lambda feed: {"y": feed["x"]})
    assert cache.made["references"] == 3 and cache.reused["references"] == 1
