"""The exporters' shared settings: one `ExportOptions` (also taken as keywords), one set of
flags on every ``deco export`` verb with one meaning of ``--force``, and ``--gpu`` for the
TensorRT build's GPU index (``--device``, which names the device a model runs on in every other
verb, still works there with a one-line deprecation)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from deco_export.cli import main
from deco_export.export.options import ExportOptions


def test_keywords_fill_the_options_and_a_misspelt_one_is_refused():
    base = ExportOptions(parity_steps=4, seed=3)
    opts = ExportOptions.of(base, {"force": True, "seed": 5}, "export_onnx")
    assert (opts.parity_steps, opts.seed, opts.force) == (4, 5, True)
    assert ExportOptions.of(None, {}, "export_onnx") == ExportOptions()
    with pytest.raises(TypeError, match="export_onnx.*parity_stepz"):
        ExportOptions.of(None, {"parity_stepz": 2}, "export_onnx")
    said = []
    ExportOptions(progress=said.append).say("exporting dit.onnx")
    ExportOptions().say("nobody listens")
    assert said == ["exporting dit.onnx"]


def test_exporters_refuse_an_unknown_keyword_before_any_work(tmp_path, golden_model):
    from deco_export.export.onnx import export_onnx

    with pytest.raises(TypeError, match="parity_stepz"):
        export_onnx(golden_model, tmp_path / "bundle", parity_stepz=2)
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("verb", ["onnx", "coreml", "tensorrt"])
def test_every_export_verb_has_the_shared_flags(verb):
    from deco_export.commands.options import FORCE_HELP

    result = CliRunner().invoke(main, ["export", verb, "--help"], terminal_width=10_000)
    assert result.exit_code == 0, result.output
    assert "--parity-steps" in result.output
    assert FORCE_HELP.split(" (")[0] in " ".join(result.output.split())


def test_tensorrt_takes_gpu_and_still_reads_device_with_a_deprecation(tmp_path):
    help_text = CliRunner().invoke(main, ["export", "tensorrt", "--help"]).output
    assert "--gpu" in help_text and "--device" not in help_text
    missing = tmp_path / "nothing"
    result = CliRunner().invoke(main, ["export", "tensorrt", str(missing), "--device", "1"])
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert "`deco export tensorrt --device N` is deprecated, use --gpu N" in lines[0]
    assert len(lines) == 2 and str(missing) in lines[1]
