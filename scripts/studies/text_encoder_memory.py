"""Resident memory of a text-to-image generation with the bundle's text encoder kept loaded
and with ``reduce_memory=True`` (unloaded once the prompts are encoded), for each precision of
the encoder the bundle holds (fp32, and fp16/int8 where the export wrote them), and the
encoder's own time; produced the README's figures in
"Where the text encoder runs, and for how long".

Each mode runs in a fresh process: open the bundle (ONNX Runtime, CPU), generate one image
from a prompt twice, and read VmRSS (resident now) and VmHWM (the peak) from
/proc/self/status after each generation; then time the encoder alone on the same prompt,
cold (``unload()`` first: the session is created and the files checked again) and warm
(median of 5). Linux only.

    PYTHONPATH=. python scripts/studies/text_encoder_memory.py BUNDLE [--steps 25] \
        [--precision fp16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, statistics, sys, time
import runtimes

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}

bundle, reduce, steps, precision = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4]
pipe = runtimes.load(bundle, reduce_memory=reduce, intra_op_threads=1,
                     text_encoder_precision=precision)
pipe.text_encoder.intra_op_threads = 1
rows = {"opened": status()}
for n in (1, 2):
    pipe.generate(prompt="a red heart", steps=steps, seed=0, output_type="np")
    rows[f"after generation {n}"] = status()
encoder = pipe.text_encoder
encoder.unload()
started = time.perf_counter()
encoder.encode(["a red heart"])
cold = time.perf_counter() - started
warm = []
for _ in range(5):
    started = time.perf_counter()
    encoder.encode(["a red heart"])
    warm.append(time.perf_counter() - started)
rows["encoder"] = {"cold_ms": cold * 1e3, "warm_ms": statistics.median(warm) * 1e3}
print(json.dumps(rows))
"""


def bundle_precisions(bundle: str) -> list[str]:
    from runtimes.bundle import read_manifest

    have = {a.precision for a in read_manifest(bundle).artifacts
            if (a.runtime, a.graph) == ("onnx", "text_encoder")}
    return [p for p in ("fp32", "fp16", "int8") if p in have]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--precision", action="append", default=None,
                        help="the encoder's precision (repeat) [every one the bundle has]")
    args = parser.parse_args()
    from runtimes.cpu import cpu_model

    print(f"CPU: {cpu_model()}, ONNX Runtime on one thread, {args.steps} steps")
    for precision in args.precision or bundle_precisions(args.bundle):
        for reduce in (False, True):
            out = subprocess.run([sys.executable, "-c", CHILD, args.bundle, str(int(reduce)),
                                  str(args.steps), precision],
                                 capture_output=True, text=True, check=True)
            rows = json.loads(out.stdout.strip().splitlines()[-1])
            timing = rows.pop("encoder")
            print(f"encoder {precision}, reduce_memory={reduce}: encode cold "
                  f"{timing['cold_ms']:.1f} ms, warm {timing['warm_ms']:.1f} ms")
            for name, row in rows.items():
                print(f"  {name:20s} resident {row['VmRSS']:7.1f} MiB  "
                      f"peak {row['VmHWM']:7.1f} MiB")


if __name__ == "__main__":
    main()
