"""The TensorRT backend's own bookkeeping, with the recording stand-in for the device (no
TensorRT, no CUDA), and the runtime modules importing without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from runtimes.backend import BackendError
from tests.helpers import REPO as ROOT
from tests.runtimes.tensorrt_fakes import (
    T2I,
    TINY,
    RecordingCuda,
    engine_trt,
    recording_backend,
    t2i_recording_backend,
)


def test_runtimes_tensorrt_modules_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['tensorrt'] = None\n"
            "import runtimes, runtimes.backends.tensorrt, runtimes.backends.tensorrt_keys\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_step_bookkeeping_guided_then_replay_then_unguided():
    from runtimes.backends.tensorrt import DeviceArray

    be, cuda = recording_backend()
    row = 3 * 64 * 64 * 4
    x = DeviceArray(cuda, 5000 << 12, (3, 3, 64, 64), "float32")
    y2 = DeviceArray(cuda, 6000 << 12, (6,), "int64")
    out = be.step(x, y2, 0.2, 0.01, 3.2)
    slot = be._slots[(8, 64, 64)]  # 3 images guided -> [3 | pad 1; 3 | pad 1]
    xs, ys = slot.buffers["x_t"].ptr, slot.buffers["y"].ptr
    calls = [c for c in cuda.take_calls() if c[0] != "copy" or c[4] != "HostToDevice"]
    copies = [c[1:4] for c in calls if c[0] == "copy"]
    assert copies == [(xs, x.ptr, 3 * row), (xs + 4 * row, x.ptr, 3 * row),
                      (ys, y2.ptr, 24), (ys + 32, y2.ptr + 24, 24),
                      (slot.buffers["params"].ptr, cuda.records[(0.2, 0.01, 3.2)], 12)]
    rest = [c[:2] if c[0] == "kernel" else c for c in calls if c[0] != "copy"]
    warm = [("kernel", "fill_t"), ("execute", "dit", 8), ("execute", "decoder", 8)]
    assert rest == [*warm, ("begin_capture",), *warm, ("kernel", "euler_update"),
                    ("end_capture",), ("launch_graph", "graph1")]
    update = next(c for c in calls if c[:2] == ("kernel", "euler_update"))
    assert update[2:] == (xs, slot.buffers["v"].ptr, slot.buffers["params"].ptr,
                          4 * 3 * 64 * 64, 1)
    assert out.ptr == xs and out.shape == (3, 3, 64, 64)

    # The next guided step: the state is already in place; one parameter copy, one launch.
    again = be.step(out, y2, 0.3, 0.01, 3.2)
    calls = cuda.take_calls()
    assert [c[0] for c in calls] == ["copy", "launch_graph"] and calls[1][1] == "graph1"
    assert calls[0][2] == cuda.records[(0.3, 0.01, 3.2)]

    # Leaving the guidance interval: the state moves to the unguided slot once.
    y = DeviceArray(cuda, 7000 << 12, (3,), "int64")
    be.step(again, y, 0.05, 0.01, None)
    slot4 = be._slots[(4, 64, 64)]
    calls = [c for c in cuda.take_calls() if c[0] != "copy" or c[4] != "HostToDevice"]
    copies = [c[1:4] for c in calls if c[0] == "copy"]
    assert copies[:2] == [(slot4.buffers["x_t"].ptr, xs, 3 * row),
                          (slot4.buffers["y"].ptr, y.ptr, 24)]
    update = next(c for c in calls if c[:2] == ("kernel", "euler_update"))
    assert update[-2:] == (4 * 3 * 64 * 64, 0)
    assert calls[-1] == ("launch_graph", "graph2")


def test_graph_calls_run_the_models_then_copy_out_fresh_arrays():
    from runtimes.backends.tensorrt import DeviceArray

    be, cuda = recording_backend()
    x2 = DeviceArray(cuda, 5000 << 12, (6, 3, 64, 64), "float32")
    t2 = DeviceArray(cuda, 5100 << 12, (6,), "float32")
    y2 = DeviceArray(cuda, 5200 << 12, (6,), "int64")
    cond = be.dit(x2, t2, y2)
    slot = be._slots[(8, 64, 64)]
    calls = [c for c in cuda.take_calls() if c[0] != "copy" or c[4] != "HostToDevice"]
    assert ("execute", "dit", 8) in calls
    assert cond.shape == (6, 16, 64) and cond.ptr != slot.buffers["cond"].ptr
    assert calls[-1][1:4] == (cond.ptr, slot.buffers["cond"].ptr, 6 * 16 * 64 * 4)
    with pytest.raises(ValueError, match="32x32 is not a size these TensorRT engines run.*64x64"):
        be.decoder(DeviceArray(cuda, 1 << 30, (6, 3, 32, 32), "float32"), cond)
    with pytest.raises(ValueError, match="--batch-buckets"):
        be.dit(DeviceArray(cuda, 1 << 30, (17, 3, 64, 64), "float32"), t2, y2)


def test_engines_with_a_size_range_run_each_size_in_its_own_slot():
    """A second size gets its own buffers; the batch's contexts move to it, so a graph
    captured at the first size is captured again when that size comes back."""
    from runtimes.backends.tensorrt import DeviceArray
    from runtimes.sizes import SizeRange

    be, cuda = recording_backend(SizeRange.around((64, 64), 16))
    y = DeviceArray(cuda, 7000 << 12, (1,), "int64")
    a = be.step(DeviceArray(cuda, 5000 << 12, (1, 3, 64, 64), "float32"), y, 0.2, 0.1, None)
    b = be.step(DeviceArray(cuda, 5100 << 12, (1, 3, 32, 96), "float32"), y, 0.2, 0.1, None)
    assert set(be._slots) == {(1, 64, 64), (1, 32, 96)}
    assert be._slots[(1, 32, 96)].shapes["cond"] == (1, 12, 64) and b.shape == (1, 3, 32, 96)
    assert a.ptr != b.ptr and be._bound[1] == (32, 96)
    assert not be._slots[(1, 64, 64)].graphs  # dropped when the contexts moved
    cuda.take_calls()
    be.step(a, y, 0.3, 0.1, None)
    assert [c[0] for c in cuda.take_calls()].count("begin_capture") == 1
    cond = be.dit(DeviceArray(cuda, 1 << 30, (1, 3, 32, 96), "float32"),
                  DeviceArray(cuda, 2 << 30, (1,), "float32"), y)
    assert cond.shape == (1, 12, 64)
    with pytest.raises(ValueError, match="16x96 is not a size these TensorRT engines run"):
        be.decoder(DeviceArray(cuda, 1 << 30, (1, 3, 16, 96), "float32"), cond)


def test_device_array_views_and_arithmetic_match_the_kernel_signature():
    import re

    from runtimes.backends.cuda_device import _KERNELS, DeviceArray

    cuda = RecordingCuda()
    a = DeviceArray(cuda, 4096, (4, 3, 2, 2), "float32")
    view = a[1:3]
    assert view.ptr == 4096 + 48 and view.shape == (2, 3, 2, 2) and len(view) == 2
    assert a[3:1].shape[0] == 0
    with pytest.raises(TypeError):
        a[::2]
    b = DeviceArray(cuda, 8192, (4, 3, 2, 2), "float32")
    out = a - b * 0.5
    kernels = [c for c in cuda.calls if c[0] == "kernel"]
    assert kernels[0][1:] == ("lincomb", kernels[0][2], b.ptr, 0, 0.5, 0.0, 48)
    assert kernels[1][1:] == ("lincomb", out.ptr, a.ptr, kernels[0][2], 1.0, -1.0, 48)
    signature = re.search(r"void lincomb\(([^)]*)\)", _KERNELS).group(1)
    assert [p.split()[-1].strip("*") for p in signature.split(",")] == [
        "out", "x", "y", "a", "b", "n"]
    with pytest.raises(TypeError):
        a * b
    with pytest.raises(ValueError, match="shape mismatch"):
        a + b[0:2]


def test_t2i_engine_io_is_checked_against_the_t2i_record(tmp_path):
    from runtimes.backends.tensorrt_engine import Engine
    from runtimes.config import ModelConfig

    plan = tmp_path / "dit.plan"
    plan.write_bytes(b"plan")
    config = ModelConfig.from_dict(T2I)
    engine = Engine(*engine_trt(["x_t", "t", "text_tokens"]), plan, "dit", config)
    assert engine.inputs == ["x_t", "t", "text_tokens"] and engine.batches == (1, 2)
    with pytest.raises(BackendError,
                       match=r"inputs \['x_t', 't', 'y'\].*'text_tokens'.*rebuild it"):
        Engine(*engine_trt(["x_t", "t", "y"]), plan, "dit", config)
    # a DiT that still takes the raw text features (an older bundle) is refused too
    with pytest.raises(BackendError, match=r"'text_tokens'.*rebuild it"):
        Engine(*engine_trt(["x_t", "t", "text"]), plan, "dit", config)
    embed = Engine(*engine_trt(["text"], ("text_tokens",)), plan, "text_embed", config)
    assert embed.inputs == ["text"] and embed.outputs == ["text_tokens"]
    # a class-conditional bundle still wants labels
    with pytest.raises(BackendError, match=r"expected \['x_t', 't', 'y'\]"):
        Engine(*engine_trt(["x_t", "t", "text_tokens"]), plan, "dit",
               ModelConfig.from_dict(TINY))


def test_t2i_backend_feeds_text_token_rows_into_the_slot():
    """The DiT call copies the (B, L, D) text tokens into the slot's ``text_tokens`` buffer; a
    guided fused step lays [negative; prompts] out as [uncond | pad; cond | pad] row by row."""
    from runtimes.backends.tensorrt import DeviceArray

    be, cuda = t2i_recording_backend()
    row = 8 * 64 * 4
    x = DeviceArray(cuda, 5000 << 12, (3, 3, 64, 64), "float32")
    t = DeviceArray(cuda, 5100 << 12, (3,), "float32")
    tokens = DeviceArray(cuda, 5200 << 12, (3, 8, 64), "float32")
    cond = be.dit(x, t, tokens)
    slot = be._slots[(4, 64, 64)]
    assert "y" not in slot.buffers and slot.shapes["text_tokens"] == (4, 8, 64)
    assert slot.shapes["text"] == (4, 8, 48)  # text_embed's input, in the same slot
    assert slot.buffers["text_tokens"].dtype == "float32"
    copies = [c[1:4] for c in cuda.take_calls() if c[0] == "copy"]
    assert (slot.buffers["text_tokens"].ptr, tokens.ptr, 3 * row) in copies
    assert cond.shape == (3, 16, 64)
    with pytest.raises(TypeError, match="text_tokens must be float32"):
        be.dit(x, t, DeviceArray(cuda, 5300 << 12, (3, 8, 64), "int64"))

    both = DeviceArray(cuda, 6000 << 12, (6, 8, 64), "float32")
    be.step(x, both, 0.2, 0.01, 4.0)
    slot8 = be._slots[(8, 64, 64)]
    tb = slot8.buffers["text_tokens"].ptr
    copies = [c[1:4] for c in cuda.take_calls() if c[0] == "copy" and c[4] != "HostToDevice"]
    assert (tb, both.ptr, 3 * row) in copies
    assert (tb + 4 * row, both.ptr + 3 * row, 3 * row) in copies
    with pytest.raises(ValueError,
                       match=r"step: text_tokens must be float32 rows of shape \(8, 64\)"):
        be.step(x, DeviceArray(cuda, 7000 << 12, (6,), "int64"), 0.2, 0.01, 4.0)


def test_t2i_backend_embeds_text_into_the_slot_the_dit_reads():
    """embed_text runs the text_embed engine on the (2B, L, C) text: the text goes into the
    slot's ``text`` buffer, the engine writes ``text_tokens`` (the DiT's condition buffer) and
    the tokens come back as a copy; the next fused step copies its condition again."""
    from runtimes.backends.tensorrt import DeviceArray

    be, cuda = t2i_recording_backend()
    x = DeviceArray(cuda, 5000 << 12, (3, 3, 64, 64), "float32")
    both = DeviceArray(cuda, 6000 << 12, (6, 8, 64), "float32")
    be.step(x, both, 0.2, 0.01, 4.0)
    cuda.take_calls()
    text = DeviceArray(cuda, 6500 << 12, (6, 8, 48), "float32")
    tokens = be.embed_text(text)
    slot = be._slots[(8, 64, 64)]
    calls = cuda.take_calls()
    assert ("copy", slot.buffers["text"].ptr, text.ptr, 6 * 8 * 48 * 4) in [c[:4] for c in calls]
    assert ("execute", "text_embed", 8) in calls
    assert tokens.shape == (6, 8, 64) and tokens.dtype == "float32"
    assert slot.bound_y is None  # text_embed overwrote the DiT's condition buffer
    be.step(x, both, 0.3, 0.01, 4.0)
    copies = [c[1:4] for c in cuda.take_calls() if c[0] == "copy"]
    assert (slot.buffers["text_tokens"].ptr, both.ptr, 3 * 8 * 64 * 4) in copies


def test_distilled_backend_feeds_guidance_into_the_slot_and_has_no_fused_step():
    """A guidance-distilled DiT engine: the slot holds the record's (B,) float32 ``guidance``
    buffer, the DiT call copies w into it, and the fused CFG step is not offered."""
    from runtimes.backends.tensorrt import DeviceArray

    be, cuda = recording_backend(model=dict(TINY, guidance_distilled=True))
    assert be.takes_guidance and not be.supports_step
    x = DeviceArray(cuda, 5000 << 12, (3, 3, 64, 64), "float32")
    t = DeviceArray(cuda, 5100 << 12, (3,), "float32")
    y = DeviceArray(cuda, 5200 << 12, (3,), "int64")
    w = DeviceArray(cuda, 5300 << 12, (3,), "float32")
    cond = be.dit(x, t, y, w)
    slot = be._slots[(4, 64, 64)]
    assert slot.shapes["guidance"] == (4,) and slot.buffers["guidance"].dtype == "float32"
    copies = [c[1:4] for c in cuda.take_calls() if c[0] == "copy"]
    assert (slot.buffers["guidance"].ptr, w.ptr, 3 * 4) in copies
    assert cond.shape == (3, 16, 64)
    with pytest.raises(TypeError, match=r"dit takes 4 arrays \(x_t, t, y, guidance\)"):
        be.dit(x, t, y)
    with pytest.raises(TypeError, match="guidance must be float32"):
        be.dit(x, t, y, y)
    plain, _ = recording_backend()
    plain.dit(x, t, y)
    assert plain.supports_step and "guidance" not in plain._slots[(4, 64, 64)].buffers
