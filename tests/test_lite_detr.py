"""Lite DETR's interleaved encoder against a plain loop over its documented update order."""
import pytest
import torch

from effdetr.evaluation.flops import count_flops
from effdetr.models import build_model
from effdetr.models.deformable_transformer import DeformableEncoderLayer, token_centres, valid_ratios
from effdetr.models.lite_detr import InterleavedEncoder
from tests.test_deformable import model_cfg

SHAPES = [(6, 8), (3, 4), (2, 2), (1, 1)]  # fine to coarse


def encoder(h, b, a, key_aware=False, seed=0):
    torch.manual_seed(seed)
    return InterleavedEncoder(DeformableEncoderLayer(16, 2, 4, 2, 32, 0.0, key_aware), 4, h, b, a)


def inputs():
    g = torch.Generator().manual_seed(1)
    s = sum(h * w for h, w in SHAPES)
    src, pos = torch.randn(2, s, 16, generator=g), torch.randn(2, s, 16, generator=g)
    padding = torch.zeros(2, s, dtype=torch.bool)
    ratios = valid_ratios([torch.zeros(2, h, w, dtype=torch.bool) for h, w in SHAPES])
    return src, pos, padding, ratios


def reference(enc, src, pos, padding, ratios, high_levels, blocks, high_updates):
    """Token by group: per block, A layers update the coarsest H levels, then one the rest."""
    n_low = sum(h * w for h, w in SHAPES[: len(SHAPES) - high_levels])
    refs = token_centres(SHAPES, ratios)[:, :, None] * ratios[:, None]
    x, layer = src.clone(), iter(enc.layers)
    for _ in range(blocks):
        groups = [list(range(n_low, src.shape[1]))] * high_updates + [list(range(n_low))]
        for idx in groups:
            new = next(layer)(x[:, idx], pos[:, idx], refs[:, idx], x, SHAPES, padding)
            x = x.clone()
            x[:, idx] = new
    return x


@pytest.mark.parametrize("h,b,a,kda", [(1, 1, 2, False), (3, 2, 1, False), (2, 3, 2, True)])
def test_interleaved_encoder_matches_the_update_order(h, b, a, kda):
    enc = encoder(h, b, a, kda)
    assert len(enc.layers) == b * (a + 1)
    src, pos, padding, ratios = inputs()
    got = enc(src, pos, SHAPES, padding, ratios)
    torch.testing.assert_close(got, reference(enc, src, pos, padding, ratios, h, b, a))


def test_only_high_level_tokens_change_when_the_low_update_is_skipped():
    enc = encoder(1, 1, 2)
    enc.layers = enc.layers[:2]  # the two high-level updates of block 1
    src, pos, padding, ratios = inputs()
    changed = ((enc(src, pos, SHAPES, padding, ratios) - src).abs().sum(-1) > 0)[0]
    assert changed.nonzero().flatten().tolist() == [sum(h * w for h, w in SHAPES) - 1]  # the 1x1 level


def test_bad_stacking_fails_with_a_clear_message():
    with pytest.raises(ValueError, match="high_levels must be in"):
        encoder(4, 1, 1)
    with pytest.raises(ValueError, match="blocks and high_updates"):
        encoder(1, 0, 1)


def test_lite_encoder_costs_less_than_the_dense_one_with_as_many_layers():
    images, mask = torch.randn(1, 3, 96, 96), torch.zeros(1, 96, 96, dtype=torch.bool)
    dense = build_model(model_cfg(enc_layers=3))
    lite = build_model(model_cfg(lite={"high_levels": 2, "blocks": 1, "high_updates": 2}))
    assert len(lite.encoder.layers) == len(dense.encoder.layers) == 3
    enc = {name: count_flops(m, images, mask, m.flops_parts)["encoder"] for name, m in (("d", dense), ("l", lite))}
    assert enc["l"] < 0.5 * enc["d"]
