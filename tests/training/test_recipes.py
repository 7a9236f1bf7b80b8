"""The reference recipes against a transcription of the reference configs' values."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from deco_export.config import get_preset
from training.cli import train
from training.recipes import RECIPES, get_recipe
from training.trainer import TrainConfig

# The reference YAML (configs_c2i/*.yaml, configs_t2i/*.yaml) and its trainer defaults, by the
# reference's own names: optimizer lr / betas / weight_decay, gradient_clip_val,
# null_condition_p, timeshift, encoder align layer, feat_loss_weight, freq_loss_weight,
# freq_quality, ema decay, train_batch_size, accumulate_grad_batches, resolution.
REFERENCE = {
    "DeCo_XL": dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, gradient_clip_val=None,
                    null_condition_p=0.2, timeshift=1.0, align_layer=8, feat_loss_weight=0.5,
                    freq_loss_weight=1.0, freq_quality=85, ema_decay=0.9999,
                    train_batch_size=32, accumulate_grad_batches=1, resolution=256),
    "DeCo_XL_512": dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, gradient_clip_val=None,
                        null_condition_p=0.2, timeshift=1.0, align_layer=8,
                        feat_loss_weight=0.5, freq_loss_weight=1.0, freq_quality=85,
                        ema_decay=0.9999, train_batch_size=16, accumulate_grad_batches=2,
                        resolution=512),
    "DeCo_large": dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, gradient_clip_val=None,
                       null_condition_p=0.1, timeshift=1.0, align_layer=8, feat_loss_weight=0.5,
                       freq_loss_weight=1.0, freq_quality=85, ema_decay=0.9999,
                       train_batch_size=32, accumulate_grad_batches=1, resolution=256),
    "Baseline_DiT_large": dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0,
                               gradient_clip_val=None, null_condition_p=0.1, timeshift=1.0,
                               align_layer=8, feat_loss_weight=0.5, freq_loss_weight=0.0,
                               freq_quality=85, ema_decay=0.9999, train_batch_size=32,
                               accumulate_grad_batches=1, resolution=256),
    "Baseline_DiT_XL": dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0,
                            gradient_clip_val=None, null_condition_p=0.2, timeshift=1.0,
                            align_layer=8, feat_loss_weight=0.5, freq_loss_weight=0.0,
                            freq_quality=85, ema_decay=0.9999, train_batch_size=32,
                            accumulate_grad_batches=1, resolution=256),
    "pretraining_res256": dict(lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0,
                               gradient_clip_val=1.0, null_condition_p=0.1, timeshift=2.0,
                               align_layer=6, feat_loss_weight=0.5, freq_loss_weight=1.0,
                               freq_quality=85, ema_decay=0.9999, train_batch_size=64,
                               accumulate_grad_batches=3, resolution=256),
    "pretraining_res512": dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0,
                               gradient_clip_val=1.0, null_condition_p=0.1, timeshift=4.0,
                               align_layer=6, feat_loss_weight=0.5, freq_loss_weight=1.0,
                               freq_quality=85, ema_decay=0.9999, train_batch_size=16,
                               accumulate_grad_batches=4, resolution=512),
    "sft_res512": dict(lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0, gradient_clip_val=1.0,
                       null_condition_p=0.1, timeshift=4.0, align_layer=6,
                       feat_loss_weight=0.5, freq_loss_weight=1.0, freq_quality=85,
                       ema_decay=0.9999, train_batch_size=16, accumulate_grad_batches=4,
                       resolution=512),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_each_recipe_is_the_reference_config(name):
    ref, recipe = REFERENCE[name], get_recipe(name)
    s = recipe.settings
    ours = dict(lr=s["lr"], betas=tuple(s["betas"]), weight_decay=s["weight_decay"],
                gradient_clip_val=s["grad_clip"] or None, null_condition_p=s["label_dropout"],
                timeshift=s["time_shift"], align_layer=s["repa_layer"],
                feat_loss_weight=s["repa_weight"], freq_loss_weight=s["freq_weight"],
                freq_quality=s["freq_quality"], ema_decay=s["ema_decay"],
                train_batch_size=s["batch_size"] // s["grad_accum"],
                accumulate_grad_batches=s["grad_accum"],
                resolution=s.get("image_size", get_preset(recipe.preset).image_size)[0])
    assert ours == ref
    assert s["warmup_steps"] == 0  # no schedule, no warm-up in any reference config
    preset = get_preset(recipe.preset)
    assert preset.has_decoder == (not name.startswith("Baseline"))
    assert preset.is_text_to_image == (name in ("pretraining_res256", "pretraining_res512",
                                                "sft_res512"))
    TrainConfig(preset=recipe.preset, **{k: v for k, v in s.items()})  # every value is valid


def test_every_recipe_is_tested():
    assert set(RECIPES) == set(REFERENCE)


def test_cli_prints_the_table_and_a_flag_wins():
    result = CliRunner().invoke(train, ["--recipe", "sft_res512", "--lr", "3e-5",
                                        "--out", "unused", "--steps", "0"])
    # --steps 0 is refused before any data or model is built, after the table is printed.
    assert result.exit_code == 1 and "--steps must be a positive integer" in result.output
    assert "recipe sft_res512" in result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[1:]
             if line.startswith("  ")}
    assert "3e-05" in lines["lr"] and "(flag)" in lines["lr"]
    assert "(0.9, 0.999)" in lines["betas"] and "(flag)" not in lines["betas"]
    assert "'DeCo-T2I'" in lines["preset"] and "1.0" in lines["grad_clip"]
    unknown = CliRunner().invoke(train, ["--recipe", "DeCo_XXL", "--out", "unused"])
    assert unknown.exit_code == 1 and "unknown recipe 'DeCo_XXL'" in unknown.output


# ------------------------------------------------------------------------------------------------
# Fine-tuning from a release (--init-from)
# ------------------------------------------------------------------------------------------------


def _caption_folder(root):
    import numpy as np
    from PIL import Image

    folder = root / "captioned"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"{['red', 'blue'][i % 2]} square {i}\n")
    return folder


def test_init_from_the_golden_t2i_checkpoint_fine_tunes_and_reloads_strictly(
        golden_t2i_ckpt, golden_t2i_model, tmp_path):
    import json

    import torch

    from deco_export.model import DeCo
    from tests.training.test_t2i import ByteEncoder
    from training.trainer import train as run

    cfg = TrainConfig(
        preset="DeCo-T2I-tiny/16", image_size=(32, 32), data=str(_caption_folder(tmp_path)),
        out=str(tmp_path / "run"), steps=6, batch_size=4, lr=1e-3, ema_decay=0.5,
        label_dropout=0.0, log_every=1, sample_every=0, ckpt_every=3, threads=1,
        progress=False, device="cpu", cache_dir=str(tmp_path / "cache"), freq_weight=0.0,
        init_from=str(golden_t2i_ckpt))
    exported = run(cfg, text_encoder=ByteEncoder())
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "log.jsonl").read_text()
              .splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]
    model = DeCo.from_pretrained(exported)  # strict load of the fine-tuned weights
    assert model.config.same_weights_as(golden_t2i_model.config)
    start = golden_t2i_model.state_dict()
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, start[k])]
    assert moved  # trained from the release, not from scratch: the rest stays close to it
    assert all((model.state_dict()[k] - start[k]).abs().max() < 0.1 for k in start)


def test_init_from_refuses_another_model(golden_ckpt, tmp_path):
    from training.trainer import Trainer

    cfg = TrainConfig(preset="DeCo-T2I-tiny/16", image_size=(32, 32),
                      data=str(_caption_folder(tmp_path)), out=str(tmp_path / "run"),
                      steps=1, batch_size=4, threads=1, progress=False, device="cpu",
                      cache_dir=str(tmp_path / "cache"), init_from=str(golden_ckpt))
    from tests.training.test_t2i import ByteEncoder

    with pytest.raises(ValueError, match="pass the matching --preset"):
        Trainer(cfg, text_encoder=ByteEncoder())
