"""Resident memory of a text-to-image generation with the bundle's text encoder kept loaded
and with ``reduce_memory=True`` (unloaded once the prompts are encoded); produced the
README's figures in "Where the text encoder runs, and for how long".

Each mode runs in a fresh process: open the bundle (ONNX Runtime, CPU), generate one image
from a prompt twice, and read VmRSS (resident now) and VmHWM (the peak) from
/proc/self/status after each generation. Linux only.

    PYTHONPATH=. python scripts/studies/text_encoder_memory.py BUNDLE [--steps 25]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys
import runtimes

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}

bundle, reduce, steps = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
pipe = runtimes.load(bundle, reduce_memory=reduce, intra_op_threads=1)
rows = {"opened": status()}
for n in (1, 2):
    pipe.generate(prompt="a red heart", steps=steps, seed=0, output_type="np")
    rows[f"after generation {n}"] = status()
print(json.dumps(rows))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    for reduce in (False, True):
        out = subprocess.run([sys.executable, "-c", CHILD, args.bundle, str(int(reduce)),
                              str(args.steps)], capture_output=True, text=True, check=True)
        rows = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"reduce_memory={reduce}")
        for name, row in rows.items():
            print(f"  {name:20s} resident {row['VmRSS']:7.1f} MiB  peak {row['VmHWM']:7.1f} MiB")


if __name__ == "__main__":
    main()
