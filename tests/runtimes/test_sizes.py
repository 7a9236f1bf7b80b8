"""The size range a bundle serves: the record, its manifest section, the pipeline's check."""

from __future__ import annotations

import json

import pytest

import runtimes
from runtimes.bundle import Artifact, BundleError, Manifest, read_manifest, write_manifest
from runtimes.errors import ConfigError, DecoError
from runtimes.sizes import SizeError, SizeRange, parse_size_range
from tests.helpers import GaussianFlowBackend


def test_around_spans_half_to_twice_and_checks_multiples():
    sizes = SizeRange.around((64, 64), 16)
    assert (sizes.min_size, sizes.max_size, sizes.default) == ((32, 32), (128, 128), (64, 64))
    assert sizes.contains(32, 128) and sizes.contains(128, 48)
    assert not sizes.contains(16, 64) and not sizes.contains(64, 144)
    assert not sizes.contains(64, 40)  # inside the range, not a multiple of 16
    assert SizeRange.around((16, 32), 16).min_size == (16, 16)  # never below one patch


@pytest.mark.parametrize("size", [(256, 64), (64, 40), (16, 16)])
def test_check_is_one_line_naming_the_range(size):
    with pytest.raises(SizeError) as err:
        SizeRange.around((64, 64), 16).check(*size)
    text = str(err.value)
    assert isinstance(err.value, DecoError) and isinstance(err.value, ValueError)
    assert "\n" not in text and f"{size[0]}x{size[1]}" in text
    assert "32x32 to 128x128 in steps of 16" in text and "default 64x64" in text


def test_parity_sizes_are_the_default_and_a_non_square_one():
    sizes = SizeRange.around((64, 64), 16)
    first, second = sizes.parity_sizes()
    assert first == (64, 64)
    assert second[0] != second[1] and sizes.contains(*second)
    assert second[0] * second[1] == 64 * 64 // 2  # half the area: the cheap one
    assert SizeRange.fixed((64, 64), 16).parity_sizes() == [(64, 64)]
    listed = sizes.with_enumerated([(64, 64), (32, 96)])
    assert listed.parity_sizes() == [(64, 64), (32, 96)]


def test_enumerated_sizes_narrow_the_range():
    sizes = SizeRange.around((64, 64), 16).with_enumerated([(64, 64), (48, 80)])
    assert sizes.contains(48, 80) and not sizes.contains(48, 64)
    with pytest.raises(SizeError, match="one of 64x64, 48x80 .*--sizes listing it"):
        sizes.check(48, 64)
    with pytest.raises(ConfigError, match="inside"):
        SizeRange.around((64, 64), 16).with_enumerated([(256, 256)])


def test_round_trip_and_malformed_records():
    sizes = SizeRange((32, 48), (96, 128), (64, 64), 16, ((64, 64), (32, 128)))
    assert SizeRange.from_dict(json.loads(json.dumps(sizes.to_dict()))) == sizes
    with pytest.raises(ConfigError, match="lacks 'multiple'"):
        SizeRange.from_dict({"min": [32, 32], "max": [64, 64], "default": [64, 64]})
    with pytest.raises(ConfigError, match="outside"):
        SizeRange((32, 32), (64, 64), (128, 128), 16)
    with pytest.raises(ConfigError, match="not a multiple of 16"):
        SizeRange((30, 32), (64, 64), (64, 64), 16)


def test_parse_size_range():
    assert parse_size_range("32:128", (64, 64), 16) == SizeRange.around((64, 64), 16)
    r = parse_size_range("32x64:128x256", (64, 128), 16)
    assert (r.min_size, r.max_size, r.default) == ((32, 64), (128, 256), (64, 128))
    with pytest.raises(ConfigError, match="MIN:MAX"):
        parse_size_range("32-128", (64, 64), 16)
    with pytest.raises(ConfigError, match="outside"):
        parse_size_range("128:256", (64, 64), 16)


def _manifest(**kw) -> Manifest:
    return Manifest(model=GaussianFlowBackend().model_config(), **kw)


def _dit(shape, details=None) -> Artifact:
    return Artifact(runtime="onnx", graph="dit", precision="fp32", file="dit.onnx", sha256="0" * 64,
                    bytes=1, inputs=[{"name": "x_t", "shape": shape, "dtype": "float32"}],
                    details=details or {})


def test_manifest_records_the_range_and_reads_old_bundles(tmp_path):
    sizes = SizeRange.around((8, 8), 4)
    write_manifest(tmp_path, _manifest(sizes=sizes,
                                       artifacts=[_dit(["batch", 3, "height", "width"])]))
    back = read_manifest(tmp_path)
    assert back.sizes == sizes and back.size_range("onnx") == sizes
    assert json.loads((tmp_path / "manifest.json").read_text())["sizes"]["max"] == [16, 16]
    # A bundle written when graphs had one size: no "sizes", the x_t shape names the size.
    old = _manifest(artifacts=[_dit(["batch", 3, 8, 8])])
    assert "sizes" not in old.to_dict()
    assert old.size_range("onnx") == SizeRange.fixed((8, 8), 4)
    assert old.size_range("coreml") is None  # nothing of that runtime limits the size
    # A compiled runtime's own list wins over the manifest's range.
    listed = sizes.with_enumerated([(8, 8), (4, 12)])
    narrowed = _manifest(sizes=sizes, artifacts=[_dit(["batch", 3, "height", "width"],
                                                      {"sizes": listed.to_dict()})])
    assert narrowed.size_range("onnx") == listed


def test_malformed_sizes_section_is_a_bundle_error(tmp_path):
    d = _manifest().to_dict()
    d["sizes"] = {"min": [8, 8], "max": [4, 4], "default": [8, 8], "multiple": 4}
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match="manifest.json: sizes.*re-export"):
        read_manifest(tmp_path)


def test_pipeline_refuses_sizes_outside_the_range_in_one_line():
    be = GaussianFlowBackend()
    sizes = SizeRange((8, 4), (8, 12), (8, 8), 4)
    pipe = runtimes.DeCoPipeline(be, be.model_config(), {"steps": 2},
                                 manifest=_manifest(sizes=sizes))
    assert pipe.size_range() == sizes
    assert pipe.generate([0], output_type="np").images.shape == (1, 3, 8, 8)
    for h, w in ((12, 8), (8, 6), (8, 16)):
        with pytest.raises(SizeError, match="8x4 to 8x12 in steps of 4") as err:
            pipe.generate([0], height=h, width=w)
        assert "\n" not in str(err.value)
    with pytest.raises(SizeError, match="integer"):
        pipe.generate([0], height=8.5, width=8)
    # Without a bundle the model runs any multiple of the patch size.
    free = runtimes.DeCoPipeline(be, be.model_config(), {"steps": 2})
    with pytest.raises(SizeError, match="multiple of the patch size 4"):
        free.generate([0], height=8, width=6)


def test_parse_size_is_the_one_size_reader():
    from runtimes.errors import ConfigError
    from runtimes.sizes import parse_size

    assert parse_size("64") == (64, 64) and parse_size("64x32") == parse_size("64*32") == (64, 32)
    for bad in ("64x", "0x64", "a", "1x2x3"):
        with pytest.raises(ConfigError, match="write HEIGHTxWIDTH"):
            parse_size(bad)
