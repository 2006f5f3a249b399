"""Lite DETR's interleaved encoder against a plain loop over its documented update order."""
import pytest
import torch

from effdetr.evaluation.flops import count_flops
from effdetr.models import build_model
from effdetr.models.deformable_transformer import DeformableEncoderLayer, valid_ratios
from effdetr.models.lite_detr import InterleavedEncoder
from tests.test_deformable import model_cfg

SHAPES = [(6, 8), (3, 4), (2, 2), (1, 1)]  # fine to coarse


def encoder(h, b, a, key_aware=False, seed=0, low_update="joint", low_ffn_dim=None):
    torch.manual_seed(seed)
    layer = DeformableEncoderLayer(16, 2, 4, 2, 32, 0.0, key_aware)
    return InterleavedEncoder(layer, 4, h, b, a, low_update, low_ffn_dim)


# (rows, cols) of unpadded cells per level: image 0 fills its maps, image 1 is padded on
# the right and at the bottom, with different width and height fractions on each level
VALID = [[(6, 8), (3, 4), (2, 2), (1, 1)],
         [(4, 6), (2, 3), (1, 2), (1, 1)]]
# the same as valid (width, height) fractions, written out
RATIOS = torch.tensor([[[1.0, 1.0]] * 4,
                       [[6 / 8, 4 / 6], [3 / 4, 2 / 3], [2 / 2, 1 / 2], [1.0, 1.0]]])


def inputs():
    g = torch.Generator().manual_seed(1)
    s = sum(h * w for h, w in SHAPES)
    src, pos = torch.randn(2, s, 16, generator=g), torch.randn(2, s, 16, generator=g)
    masks = []
    for lvl, (h, w) in enumerate(SHAPES):
        m = torch.ones(2, h, w, dtype=torch.bool)
        for b, valid in enumerate(VALID):
            rows, cols = valid[lvl]
            m[b, :rows, :cols] = False
        masks.append(m)
    padding = torch.cat([m.flatten(1) for m in masks], 1)
    torch.testing.assert_close(valid_ratios(masks), RATIOS)
    return src, pos, padding, RATIOS.clone()


def hand_reference_points():
    """Deformable DETR's encoder reference points, by hand (independent of ``token_centres``):
    token (i, j) of level l in image b sits at x = (j + 0.5) / cols_l, y = (i + 0.5) / rows_l
    of the image's unpadded extent, and on level l' at (x * cols_l' / W_l', y * rows_l' / H_l')
    (the official ``reference_points * valid_ratios``) -> [B, S, L, 2]."""
    s = sum(h * w for h, w in SHAPES)
    out = torch.zeros(2, s, len(SHAPES), 2)
    for b, valid in enumerate(VALID):
        t = 0
        for lvl, (h, w) in enumerate(SHAPES):
            rows, cols = valid[lvl]
            for i in range(h):
                for j in range(w):
                    x, y = (j + 0.5) / cols, (i + 0.5) / rows
                    for l2, (h2, w2) in enumerate(SHAPES):
                        rows2, cols2 = valid[l2]
                        out[b, t, l2, 0], out[b, t, l2, 1] = x * cols2 / w2, y * rows2 / h2
                    t += 1
    return out


def reference(enc, src, pos, padding, high_levels, blocks, high_updates, low_update):
    """Written from the description, with hand-computed reference points on padded maps: per block, the high-level (coarsest H levels) tokens are
    queries A times and the low-level ones once -- jointly with the A-th high-level update
    ("joint") or in a layer of their own after it ("separate"); every query: attention over
    the current map, residual + norm, then its FFN (low-level queries: the low-level FFN if
    the encoder has one), residual + norm."""
    n_low = sum(h * w for h, w in SHAPES[: len(SHAPES) - high_levels])
    high, low = list(range(n_low, src.shape[1])), list(range(n_low))
    refs = hand_reference_points()
    if low_update == "joint":
        order = ([high] * (high_updates - 1) + [low + high]) * blocks
    else:
        order = ([high] * high_updates + [low]) * blocks
    x = src.clone()
    for i, idx in enumerate(order):
        layer, low_ffn = enc.layers[i], enc.low_ffns[str(i)] if str(i) in enc.low_ffns else None
        q = x[:, idx]
        a = layer.norm1(q + layer.self_attn(q + pos[:, idx], refs[:, idx], x, SHAPES, padding))
        new = torch.empty_like(a)
        for j, t in enumerate(idx):
            v = a[:, j: j + 1]
            if t < n_low and low_ffn is not None:
                new[:, j: j + 1] = low_ffn.norm(v + low_ffn.ffn(v))
            else:
                new[:, j: j + 1] = layer.norm2(v + layer.ffn(v))
        x = x.clone()
        x[:, idx] = new
    return x


@pytest.mark.parametrize("h,b,a,kda,mode,low_ffn", [
    (1, 1, 2, False, "joint", None), (3, 2, 3, False, "joint", 8), (2, 3, 2, True, "joint", 8),
    (1, 1, 2, False, "separate", None), (3, 2, 1, False, "separate", 8), (2, 3, 2, True, "separate", None)])
def test_interleaved_encoder_matches_the_update_order(h, b, a, kda, mode, low_ffn):
    """The encoder against the loop over its documented update order, on a batch with one
    padded image. Catches a wrong update order or FFN choice, and (the loop's reference points
    are computed by hand) wrong reference points: (W, H) ratios swapped, ratios not applied."""
    enc = encoder(h, b, a, kda, low_update=mode, low_ffn_dim=low_ffn)
    assert len(enc.layers) == (a * b if mode == "joint" else b * (a + 1))
    assert len(enc.low_ffns) == (b if low_ffn else 0)
    src, pos, padding, ratios = inputs()
    got = enc(src, pos, SHAPES, padding, ratios)
    torch.testing.assert_close(got, reference(enc, src, pos, padding, h, b, a, mode))


def test_only_high_level_tokens_change_when_the_low_update_is_skipped():
    enc = encoder(1, 1, 2, low_update="separate")
    enc.schedule = lambda: ["high", "high"]  # the two high-level updates of block 1 only
    src, pos, padding, ratios = inputs()
    changed = ((enc(src, pos, SHAPES, padding, ratios) - src).abs().sum(-1) > 0)[0]
    assert changed.nonzero().flatten().tolist() == [sum(h * w for h, w in SHAPES) - 1]  # the 1x1 level


def test_bad_stacking_fails_with_a_clear_message():
    with pytest.raises(ValueError, match="high_levels must be in"):
        encoder(4, 1, 1)
    with pytest.raises(ValueError, match="blocks and high_updates"):
        encoder(1, 0, 1)


def test_lite_encoder_flops_follow_the_token_counts():
    """A high-level-only layer projects values over the whole map but runs everything else
    on the high-level queries only: joint (3+1)x1 = 2 such layers + 1 full layer."""
    images, mask = torch.randn(1, 3, 96, 96), torch.zeros(1, 96, 96, dtype=torch.bool)
    dense = build_model(model_cfg(enc_layers=1))
    lite = build_model(model_cfg(lite={"high_levels": 2, "blocks": 1, "high_updates": 3}))
    assert len(lite.encoder.layers) == 3
    out: dict = {}
    full = count_flops(dense, images, mask, dense.flops_parts, out)["encoder"] * 1e9
    tokens = out["level_tokens"]
    s, n_high, dim = float(tokens.sum()), float(tokens[-2:].sum()), dense.dim
    value_proj = s * dim * dim
    per_query = (full - value_proj) / s
    expected = full + 2 * (value_proj + per_query * n_high)
    got = count_flops(lite, images, mask, lite.flops_parts)["encoder"] * 1e9
    assert got == pytest.approx(expected, rel=1e-6)
    assert got < 0.6 * 3 * full  # three dense layers


def test_three_scale_model_drops_the_finest_map_and_reports_token_shares():
    """skip_finest: 1 with 3 levels = C4, C5 + one extra (Lite DETR's 3-scale model); the
    token shares are percentages by nominal stride."""
    from effdetr.evaluation.flops import token_shares
    images, mask = torch.randn(1, 3, 96, 128), torch.zeros(1, 96, 128, dtype=torch.bool)
    four = build_model(model_cfg())
    three = build_model(model_cfg(deformable={"num_levels": 3, "skip_finest": 1}))
    assert three.level_strides == [16, 32, 64] and four.level_strides == [8, 16, 32, 64]
    o4, o3 = {}, {}
    count_flops(four, images, mask, four.flops_parts, o4)
    count_flops(three, images, mask, three.flops_parts, o3)
    assert o4["level_tokens"].tolist() == [12 * 16, 6 * 8, 3 * 4, 2 * 2]
    assert o3["level_tokens"].tolist() == [6 * 8, 3 * 4, 2 * 2]
    shares = token_shares(four, o4)
    assert list(shares) == ["token_share_s8", "token_share_s16", "token_share_s32", "token_share_s64"]
    assert shares["token_share_s8"] == pytest.approx(100 * 192 / 256)
    assert sum(shares.values()) == pytest.approx(100)
