"""TensorRT batch buckets, engine batches and optimisation profiles (no TensorRT needed)."""

from __future__ import annotations

import pytest

from runtimes.backends import tensorrt_profiles as tp
from tests.runtimes.tensorrt_fakes import T2I, TINY


def test_engine_batches_count_the_cfg_doubling():
    assert tp.engine_batches((1, 2, 4, 8)) == (1, 2, 4, 8, 16)
    assert tp.engine_batches((1, 2, 4, 8), cfg=False) == (1, 2, 4, 8)
    assert tp.engine_batches((3,)) == (3, 6)
    assert tp.engine_batches([8, 1, 1, 2]) == (1, 2, 4, 8, 16)


@pytest.mark.parametrize("text, expected", [("1,2,4,8", (1, 2, 4, 8)), ("8, 1,1", (1, 8)),
                                            ("3", (3,))])
def test_parse_buckets(text, expected):
    assert tp.parse_buckets(text) == expected


@pytest.mark.parametrize("text", ["", "0", "1,a", "-2", "1.5"])
def test_parse_buckets_rejects_nonsense(text):
    with pytest.raises(ValueError, match="batch buckets"):
        tp.parse_buckets(text)


def test_engine_batch_choice_pads_up_to_the_next_bucket():
    batches = tp.engine_batches((1, 2, 4, 8))
    assert [tp.unguided_engine_batch(r, batches) for r in (1, 2, 3, 4, 5, 9, 16)] == [
        1, 2, 4, 4, 8, 16, 16]
    # A guided batch of b images runs [uncond | pad; cond | pad] in an even engine batch >= 2b.
    assert [tp.guided_engine_batch(b, batches) for b in (1, 2, 3, 4, 5, 8)] == [
        2, 4, 8, 8, 16, 16]
    assert tp.guided_engine_batch(2, (3, 6)) == 6


def test_engine_batch_choice_says_how_to_rebuild():
    batches = tp.engine_batches((1, 2, 4, 8))
    with pytest.raises(ValueError, match=r"--batch-buckets 1,2,4,8,16,32"):
        tp.unguided_engine_batch(17, batches)
    with pytest.raises(ValueError, match=r"needs an engine batch of at least 18"):
        tp.guided_engine_batch(9, batches)
    with pytest.raises(ValueError, match="at least one"):
        tp.guided_engine_batch(0, batches)


def test_profiles_are_static_per_engine_batch():
    profiles = tp.profiles_for("dit", TINY, (64, 64), (1, 2, 4))
    assert [p.batch for p in profiles] == [1, 2, 4]
    assert profiles[2].shapes == {"x_t": (4, 3, 64, 64), "t": (4,), "y": (4,)}
    dec = tp.profiles_for("decoder", TINY, (64, 64), (2,))[0]
    assert dec.shapes == {"x_t": (2, 3, 64, 64), "cond": (2, 16, 64)}
    ref = tp.profiles_for("refresh", TINY, (32, 64), (8,))[0]
    assert ref.shapes == {"hidden": (8, 8, 64), "t": (8,)}
    assert ref.to_dict() == {"batch": 8, "shapes": {"hidden": [8, 8, 64], "t": [8]}}
    with pytest.raises(ValueError, match="patch size"):
        tp.profiles_for("dit", TINY, (60, 64), (1,))
    with pytest.raises(ValueError, match="unknown graph"):
        tp.profiles_for("vae", TINY, (64, 64), (1,))


def test_profiles_span_the_size_range_with_the_optimum_at_the_default():
    from runtimes.sizes import SizeRange

    sizes = SizeRange((32, 48), (128, 96), (64, 64), 16)
    dit = tp.profiles_for("dit", TINY, (64, 64), (1, 4), sizes)
    assert [p.batch for p in dit] == [1, 4]
    assert dit[1].bounds("x_t") == ((4, 3, 32, 48), (4, 3, 64, 64), (4, 3, 128, 96))
    assert dit[1].bounds("t") == ((4,), (4,), (4,))  # the batch stays static per profile
    dec = tp.profiles_for("decoder", TINY, (64, 64), (2,), sizes)[0]
    assert dec.bounds("cond") == ((2, 6, 64), (2, 16, 64), (2, 48, 64))  # tokens follow H, W
    ref = tp.profiles_for("refresh", TINY, (64, 64), (8,), sizes)[0]
    assert ref.bounds("hidden") == ((8, 6, 64), (8, 16, 64), (8, 48, 64))
    assert ref.to_dict()["min_shapes"] == {"hidden": [8, 6, 64], "t": [8]}
    # one size: the static profiles of a fixed-size bundle
    fixed = tp.profiles_for("dit", TINY, (64, 64), (2,), SizeRange.fixed((64, 64), 16))[0]
    assert fixed.bounds("x_t") == ((2, 3, 64, 64),) * 3 and "min_shapes" not in fixed.to_dict()


def test_t2i_profiles_fix_the_text_shape_and_follow_the_batch():
    from runtimes.sizes import SizeRange

    static = tp.profiles_for("dit", T2I, (64, 64), (1, 4))
    assert static[1].shapes == {"x_t": (4, 3, 64, 64), "t": (4,), "text_tokens": (4, 8, 64)}
    sizes = SizeRange((32, 48), (128, 96), (64, 64), 16)
    ranged = tp.profiles_for("dit", T2I, (64, 64), (2,), sizes)[0]
    assert ranged.bounds("x_t") == ((2, 3, 32, 48), (2, 3, 64, 64), (2, 3, 128, 96))
    assert ranged.bounds("text_tokens") == ((2, 8, 64),) * 3  # text_len, hidden fixed
    embed = tp.profiles_for("text_embed", T2I, (64, 64), (2,), sizes)[0]
    assert embed.bounds("text") == ((2, 8, 48),) * 3  # no image axis: one shape per batch
    assert tp.profiles_for("decoder", T2I, (64, 64), (2,))[0].shapes == {
        "x_t": (2, 3, 64, 64), "cond": (2, 16, 64)}
