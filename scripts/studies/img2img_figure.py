"""docs/img/img2img.png: image-to-image and inpainting with the embedded default model (the
README's "Image-to-image and inpainting" figure).

One row per start image (the default model's own samples of Animals & Nature and Flags):
the image, image-to-image towards Smileys & Emotion at strength 0.4, 0.6 and 0.8, the mask
(white: generate) and the inpainted image. 100 Euler steps, CFG 3.2, seed 0; on a CPU in
seconds:

    PYTHONPATH=. python scripts/studies/img2img_figure.py [OUT.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from deco_export.sampling import open_pipeline
from runtimes.image import make_grid, save_image, to_uint8

SMILEYS, ANIMALS, FLAGS = 0, 2, 8
STRENGTHS = (0.4, 0.6, 0.8)


def main(out: Path) -> None:
    pipe = open_pipeline("default")
    h, w = pipe.model_config.image_size
    starts = pipe.generate([ANIMALS, FLAGS], seed=0, output_type="np").images
    mask = np.zeros((h, w), np.float32)
    mask[:, w // 2:] = 1.0  # generate the right half
    tiles = []
    for start in starts:
        row = [start]
        for strength in STRENGTHS:
            row.append(pipe.generate([SMILEYS], image=start, strength=strength, seed=0,
                                     output_type="np").images[0])
        row.append(np.repeat(mask[None] * 2 - 1, 3, axis=0))
        row.append(pipe.generate([SMILEYS], image=start, mask_image=mask, seed=0,
                                 output_type="np").images[0])
        tiles.extend(row)
    grid = make_grid(to_uint8(np.stack(tiles)), cols=len(STRENGTHS) + 3, padding=4,
                     pad_value=128, scale=4)
    save_image(grid, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/img/img2img.png"))
