"""int8 settings that hold on every x86 CPU: why 7-bit weights, and how they are recorded.

ONNX Runtime's uint8 x int8 kernel on AVX2-only CPUs adds pairs of products in a saturating
int16 (``vpmaddubsw``); with VNNI or AMX the products are summed exactly. The first test shows
both facts on the CPU it runs on, through the same op the int8 graphs use (``MatMulInteger``)
at the worst-case activation (255): 7-bit weights are exact on every kernel, 8-bit weights only
where the kernel does not saturate.
"""

from __future__ import annotations

import numpy as np
import pytest

from deco_export.export.quantize import INT8_WEIGHTS, Int8Settings
from runtimes.cpu import int8_kernel
from runtimes.errors import ConfigError

EXACT_KERNELS = ("avx512_vnni", "avx_vnni", "amx")


def matmul_integer_error(weights: np.ndarray, rows: int = 16) -> int:
    """Largest difference between ONNX Runtime's MatMulInteger and the exact integer product,
    activations all 255."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = weights.shape
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w", "a_zero", "w_zero"], ["y"])], "mmi",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [None, n])],
        [numpy_helper.from_array(weights, "w"),
         numpy_helper.from_array(np.array(0, np.uint8), "a_zero"),
         numpy_helper.from_array(np.array(0, np.int8), "w_zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    a = np.full((rows, k), 255, np.uint8)
    got = session.run(None, {"a": a})[0].astype(np.int64)
    return int(np.abs(got - a.astype(np.int64) @ weights.astype(np.int64)).max())


def test_seven_bit_weights_are_exact_on_this_cpus_int8_kernel():
    rng = np.random.default_rng(0)
    for weights in (np.full((256, 32), 64, np.int8), np.full((256, 32), -64, np.int8),
                    rng.integers(-64, 65, (256, 32)).astype(np.int8)):
        assert matmul_integer_error(weights) == 0, int8_kernel()


def test_eight_bit_weights_saturate_exactly_where_the_kernel_says():
    kind = int8_kernel()
    error = matmul_integer_error(np.full((256, 32), 127, np.int8))
    if kind == "avx2":
        # 2 x 255 x 127 = 64,770 > 32,767: every pair saturates.
        assert error > 0
    elif kind in EXACT_KERNELS:
        assert error == 0
    else:
        pytest.skip(f"no claim about 8-bit weights on {kind} int8 kernels")


def test_settings_round_trip_and_refuse_what_they_do_not_know():
    for settings in (*INT8_WEIGHTS.values(), Int8Settings(per_channel=False, ops=("MatMul",))):
        assert Int8Settings.from_dict(settings.to_dict()) == settings
    assert Int8Settings().saturation_free and INT8_WEIGHTS["uint8"].saturation_free
    assert not INT8_WEIGHTS["int8"].saturation_free
    with pytest.raises(ConfigError, match="weight type 'int4'"):
        Int8Settings(weight_type="int4")
    with pytest.raises(ConfigError, match="choose from MatMul, Gemm"):
        Int8Settings(ops=("Conv",))
    with pytest.raises(ConfigError, match=r"unknown int8 settings \['bits'\]"):
        Int8Settings.from_dict({"bits": 7})


@pytest.mark.slow
@pytest.mark.parametrize("model", ["default", "default-t2i"])
def test_int8_export_of_an_embedded_default_passes_or_names_its_figure(model, tmp_path):
    """On the CPU it runs on, an int8 export either passes the 40 dB gate (and records it)
    or refuses in one line with the figure it measured, writing nothing."""
    import json

    from click.testing import CliRunner

    from deco_export.cli import main
    from deco_export.parity import END_TO_END_MIN_PSNR

    out = tmp_path / "bundle"
    result = CliRunner().invoke(main, ["export", "onnx", model, str(out), "--precision", "int8",
                                       "--parity-steps", "4"])
    if result.exit_code == 0:
        manifest = json.loads((out / "manifest.json").read_text())
        e2e = [a["parity"]["end_to_end"] for a in manifest["artifacts"]
               if a["precision"] == "int8"]
        assert e2e and all(f["psnr_db"] >= END_TO_END_MIN_PSNR["int8"] for f in e2e)
        assert all(f["cpu"]["int8_kernel"] == int8_kernel() for f in e2e)
    else:
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, result.output
        assert "end-to-end images (int8) are" in errors[0] and "below the 40 dB gate" in errors[0]
        assert "Traceback" not in result.output
        assert list(tmp_path.iterdir()) == []
