"""Deformable DETR / Sparse DETR: every shipped variant builds, returns its output contract,
has sane losses on empty and one-box ground truth, and learns; Sparse DETR's parts against
plain reference code."""
import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss as tv_focal

from effdetr import config as C
from effdetr.evaluation.flops import count_flops
from effdetr.models import build_model
from effdetr.models.criterion import build_criterion
from effdetr.models.deformable_transformer import (DeformableEncoder, DeformableEncoderLayer, inverse_sigmoid,
                                                   token_proposals, valid_ratios)
from effdetr.models.focal_criterion import sigmoid_focal_loss
from effdetr.models.matcher import HungarianMatcher
from effdetr.models.sparse_detr import ScoringNetwork, attention_map, dam_loss, dam_target, keep_counts, select_tokens

VARIANTS = {
    "plain": {},
    "topk_bbr": {"deformable": {"two_stage": True, "box_refine": True}},
    "topk_bbr_sparse_variant": {"deformable": {"two_stage": True, "box_refine": True,
                                               "two_stage_variant": "sparse_detr"}},
    "two_stage_only": {"deformable": {"two_stage": True}},
    "two_stage_only_sparse_variant": {"deformable": {"two_stage": True, "two_stage_variant": "sparse_detr"}},
    "sparse_dam": {"deformable": {"two_stage": True, "box_refine": True, "two_stage_variant": "sparse_detr"},
                   "sparse": {"rho": 0.3}},
    "sparse_objectness": {"deformable": {"two_stage": True, "box_refine": True, "two_stage_variant": "sparse_detr"},
                          "sparse": {"rho": 0.3, "saliency": "objectness"}},
    "sparse_no_aux_no_topk": {"sparse": {"rho": 0.3, "enc_aux_loss": False}},
    "lite_h2_kda": {"deformable": {"two_stage": True, "box_refine": True},
                    "lite": {"high_levels": 2, "blocks": 2, "high_updates": 1, "key_aware": True}},
    "lite_h3_separate_low_ffn": {"lite": {"high_levels": 3, "blocks": 1, "high_updates": 2,
                                          "low_update": "separate", "low_ffn_dim": 16}},
    "three_scale": {"deformable": {"two_stage": True, "box_refine": True, "num_levels": 3, "skip_finest": 1}},
}


def model_cfg(**over):
    base = {"arch": "deformable", "backbone": {"name": "tiny", "pretrained": "none", "dilation": False,
                                               "freeze_bn": False, "channels": [8, 16, 32, 64]},
            "hidden_dim": 32, "nheads": 4, "enc_layers": 3, "dec_layers": 2, "ffn_dim": 64, "dropout": 0.0,
            "num_queries": 10, "num_classes": 5, "deformable": {"num_points": 2}}
    return C.build(C.ModelConfig, C.deep_merge(base, over), "test", "model")


def loss_cfg():
    return C.build(C.LossConfig, {"ce": 2.0, "cost_class": 2.0}, "test", "loss")


def batch():
    images = torch.randn(2, 3, 64, 80)
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 60:] = True
    mask[1, 50:, :] = True
    return images, mask


def targets(n_boxes):
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.2, 0.3, 0.1, 0.2]])[:n_boxes]
    labels = torch.tensor([1, 3])[:n_boxes]
    return [{"labels": labels, "boxes": boxes}, {"labels": labels, "boxes": boxes}]


# Trainable parameters that legitimately get no gradient from the training loss, per variant
# (every other variant: none). Each entry says why; the test asserts the set exactly, so an
# entry that starts to get a gradient must be removed here too.
NO_GRADIENT = {
    # ``separate`` schedule with low_ffn_dim, 3 layers = [high, high, low]: layer 2 takes only
    # low-level queries, which all go through its LowLevelFFN; its own FFN and norm2 (the
    # high-level half of run_layer) see zero tokens.
    "lite_h3_separate_low_ffn": {f"encoder.layers.2.{p}" for p in (
        "ffn.lin1.weight", "ffn.lin1.bias", "ffn.lin2.weight", "ffn.lin2.bias", "norm2.weight", "norm2.bias")},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_output_contract_and_loss_signs(variant):
    """Outputs, loss signs, and every trainable parameter reached by the loss's gradient:
    catches a branch cut off from training (a stray ``.detach()``, a head built but never
    used) -- except the named NO_GRADIENT entries."""
    torch.manual_seed(0)
    cfg = model_cfg(**VARIANTS[variant])
    model, crit = build_model(cfg), build_criterion(cfg, loss_cfg())
    with torch.no_grad():  # off the official zero inits (sampling offsets, last box layer, zero-init
        for p in model.parameters():  # residual BN), which give connected parameters an exactly-zero first gradient
            p.add_(torch.randn_like(p) * 0.1)
    images, mask = batch()
    model.train()
    out = model(images, mask)
    assert out["pred_logits"].shape == (2, 10, 5) and out["pred_boxes"].shape == (2, 10, 4)
    assert len(out["aux_outputs"]) == 1
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    sparse = "sparse" in VARIANTS[variant]
    assert ("saliency" in out) == sparse
    if sparse:
        expected = keep_counts(out["saliency"]["padding"], 0.3).float().mean()
        assert out["kept_tokens"] == expected
        assert ("target" in out["saliency"]) == (VARIANTS[variant]["sparse"].get("saliency", "dam") == "dam")
        assert len(out.get("enc_aux_outputs", [])) == (2 if VARIANTS[variant]["sparse"].get("enc_aux_loss", True) else 0)
    assert ("enc_outputs" in out) == ("deformable" in VARIANTS[variant])
    empty = crit(out, targets(0))
    one = crit(out, targets(1))
    for losses, has_box in ((empty, False), (one, True)):
        for k, v in losses.items():
            assert torch.isfinite(v), k
            if k.startswith("loss_ce"):
                assert v > 0, k
            if k.startswith(("loss_bbox", "loss_giou")):
                assert (v > 0) == has_box, k
    crit.total(one).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert [n for n, p in trainable.items() if p.grad is not None and not torch.isfinite(p.grad).all()] == []
    no_grad = {n for n, p in trainable.items() if p.grad is None or not p.grad.any()}
    assert no_grad == NO_GRADIENT.get(variant, set())
    model.eval()
    res = model.postprocess(model(images, mask), torch.tensor([[64, 80], [50, 60]]))
    assert res[0]["boxes"].shape == (50, 4) and res[0]["labels"].max() < 5
    eval_out = model(images, mask)
    assert "enc_aux_outputs" not in eval_out and "backbone_outputs" not in eval_out  # training-only heads


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    cfg = model_cfg(deformable={"two_stage": True, "box_refine": True}, sparse={"rho": 0.3})
    model, crit = build_model(cfg), build_criterion(cfg, loss_cfg())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, mask = batch()
    first = None
    for _ in range(25):
        loss = crit.total(crit(model(images, mask), targets(2)))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def sparse_encoder_case(layers: int):
    """A sparse encoder over two levels (4x5, 2x3) and the second image keeping only 2 of 3
    slots -> (encoder, src, pos, shapes, padding, ratios, keep, keep_valid)."""
    torch.manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    enc = DeformableEncoder(DeformableEncoderLayer(16, 2, 2, 2, 32, 0.0), layers)
    src, pos = torch.randn(2, 26, 16), torch.randn(2, 26, 16)
    padding = torch.zeros(2, 26, dtype=torch.bool)
    ratios = valid_ratios([torch.zeros(2, 4, 5, dtype=torch.bool), torch.zeros(2, 2, 3, dtype=torch.bool)])
    keep = torch.tensor([[0, 7, 21], [3, 4, 25]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    return enc, src, pos, shapes, padding, ratios, keep, valid


def test_sparse_encoder_updates_only_kept_tokens():
    enc, src, pos, shapes, padding, ratios, keep, valid = sparse_encoder_case(layers=2)
    out = enc(src, pos, shapes, padding, ratios, keep, valid)
    changed = (out - src).abs().sum(-1) > 0
    expected = torch.zeros(2, 26, dtype=torch.bool)
    expected[0, [0, 7, 21]] = True
    expected[1, [3, 4]] = True
    assert torch.equal(changed, expected)


def test_keep_counts_and_selection_follow_the_official_rule():
    padding = torch.zeros(2, 50, dtype=torch.bool)
    padding[1, 30:] = True
    assert keep_counts(padding, 0.1).tolist() == [6, 4]  # floor(0.1 * 50) + 1, floor(0.1 * 30) + 1
    scores = torch.randn(2, 50)
    index, valid = select_tokens(scores, padding, 0.1)
    assert index.shape == (2, 6) and valid.sum(1).tolist() == [6, 4]
    assert set(index[0].tolist()) == set(scores[0].topk(6).indices.tolist())
    assert (index[1, :4] < 30).all()


def attention_map_loop(sampling, shapes):
    b = sampling[0][0].shape[0]
    total = sum(h * w for h, w in shapes)
    out = torch.zeros(b, total, dtype=torch.float64)
    starts = [0, shapes[0][0] * shapes[0][1]]
    for loc, weight in sampling:
        for idx in torch.cartesian_prod(*[torch.arange(n) for n in weight.shape]).tolist():
            bi, qi, mi, li, ki = idx
            h, w = shapes[li]
            x = float(loc[bi, qi, mi, li, ki, 0]) * w - 0.5
            y = float(loc[bi, qi, mi, li, ki, 1]) * h - 0.5
            for xi in (math.floor(x), math.floor(x) + 1):
                for yi in (math.floor(y), math.floor(y) + 1):
                    if 0 <= xi < w and 0 <= yi < h:
                        out[bi, starts[li] + yi * w + xi] += float(weight[bi, qi, mi, li, ki]) * \
                            (1 - abs(x - xi)) * (1 - abs(y - yi))
    return out


def test_attention_map_matches_a_per_sample_loop():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (2, 2)]
    sampling = [(torch.rand(2, 3, 2, 2, 2, 2, generator=g) * 1.3 - 0.15, torch.rand(2, 3, 2, 2, 2, generator=g))
                for _ in range(2)]
    torch.testing.assert_close(attention_map(sampling, shapes).double(), attention_map_loop(sampling, shapes),
                               rtol=1e-5, atol=1e-6)


def test_dam_target_marks_the_top_tokens_of_each_image():
    dam = torch.tensor([[0.1, 0.9, 0.3, 0.0, 0.5, 0.2, 0.05, 0.4, 0.6, 0.7],
                        [5.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[1, 0] = True  # the largest value sits on padding: never a target
    target = dam_target(dam, padding, 0.2)  # floor(0.2 * v) + 1 = 3 and 2
    assert target[0].nonzero().flatten().tolist() == [1, 8, 9]
    assert target[1].nonzero().flatten().tolist() == [2, 3]


def test_focal_loss_and_matcher_cost_against_references():
    torch.manual_seed(0)
    logits, tgt = torch.randn(3, 7, 4), (torch.rand(3, 7, 4) > 0.7).float()
    torch.testing.assert_close(sigmoid_focal_loss(logits, tgt, 0.25, 2.0), tv_focal(logits, tgt, 0.25, 2.0))
    m = HungarianMatcher(2.0, 5.0, 2.0, focal_alpha=0.25)
    labels = torch.tensor([2, 0])
    cost = m.class_cost(logits[0], labels)
    # FL(p, 1) - FL(p, 0) for the target class, per prediction
    for j, c in enumerate(labels.tolist()):
        pos = tv_focal(logits[0, :, c], torch.ones(7), 0.25, 2.0)
        neg = tv_focal(logits[0, :, c], torch.zeros(7), 0.25, 2.0)
        torch.testing.assert_close(cost[:, j], pos - neg, rtol=1e-4, atol=1e-5)


def test_sparse_encoder_flops_grow_with_rho():
    torch.manual_seed(0)
    images, mask = torch.randn(1, 3, 96, 96), torch.zeros(1, 96, 96, dtype=torch.bool)
    enc = {}
    for rho in (0.1, 0.5, None):
        model = build_model(model_cfg(deformable={"two_stage": True, "box_refine": True}, sparse={"rho": rho}))
        enc[rho] = count_flops(model, images, mask, model.flops_parts)["encoder"]
    assert enc[0.1] < enc[0.5] < enc[None]


@pytest.mark.parametrize("over,key", [
    ({"sparse": {"rho": 0.0}}, "model.sparse.rho"),
    ({"sparse": {"rho": 1.5}}, "model.sparse.rho"),
    ({"sparse": {"saliency": "random"}}, "model.sparse.saliency"),
    ({"deformable": {"num_points": 0}}, "model.deformable.num_points"),
    ({"deformable": {"bogus": 1}}, "model.deformable.bogus"),
])
def test_bad_deformable_params_name_the_key(over, key):
    with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
        model_cfg(**over)


# -- the official forward, written from fundamentalvision/Deformable-DETR and kakaobrain/sparse-detr

def capture_decoder(model):
    """Wrap the decoder to record (hs, references) of the last forward."""
    seen, forward = {}, model.decoder.forward

    def wrapped(*args, **kwargs):
        hs, refs, samplings = forward(*args, **kwargs)
        seen.update(hs=hs, refs=refs)
        return hs, refs, samplings
    model.decoder.forward = wrapped
    return seen


@torch.no_grad()
def test_box_refinement_turns_points_into_boxes_after_the_first_layer():
    """One-stage refinement: after layer 1 the 2-d reference becomes the 4-d box
    sigmoid([dxy + logit(ref), dwh]); later layers move that box as a whole."""
    torch.manual_seed(0)
    model = build_model(model_cfg(deformable={"box_refine": True})).eval()
    for p in model.bbox_embed.parameters():
        p.normal_(0, 0.3)
    seen = capture_decoder(model)
    out = model(*batch())
    hs, refs = seen["hs"], seen["refs"]
    assert refs[0].shape[-1] == 2 and refs[1].shape[-1] == 4
    delta = model.bbox_embed[0](hs[0])
    expected = torch.cat([delta[..., :2] + inverse_sigmoid(refs[0]), delta[..., 2:]], -1).sigmoid()
    torch.testing.assert_close(refs[1], expected)
    torch.testing.assert_close(out["pred_boxes"], (model.bbox_embed[1](hs[1]) + inverse_sigmoid(refs[1])).sigmoid())


def official_proposals(shapes, padding):
    """gen_encoder_output_proposals: centres (i + 0.5) / valid cells, side 0.05 * 2^lvl."""
    b, out, start = padding.shape[0], [], 0
    for lvl, (h, w) in enumerate(shapes):
        m = padding[:, start:start + h * w].view(b, h, w, 1)
        valid_h, valid_w = (~m[:, :, 0, 0]).sum(1), (~m[:, 0, :, 0]).sum(1)
        gy, gx = torch.meshgrid(torch.linspace(0, h - 1, h), torch.linspace(0, w - 1, w), indexing="ij")
        grid = torch.cat([gx[..., None], gy[..., None]], -1)
        scale = torch.cat([valid_w[:, None], valid_h[:, None]], 1).view(b, 1, 1, 2)
        grid = (grid[None].expand(b, -1, -1, -1) + 0.5) / scale
        out.append(torch.cat([grid, torch.ones_like(grid) * 0.05 * 2.0 ** lvl], -1).view(b, -1, 4))
        start += h * w
    props = torch.cat(out, 1)
    ok = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
    props = torch.log(props / (1 - props)).masked_fill(padding[..., None], float("inf")).masked_fill(~ok, float("inf"))
    return props, ok[..., 0]


def official_sine(coords_unact, dim):
    """get_proposal_pos_embed (num_pos_feats = C / 2, 128 at C = 256)."""
    feats = dim // 2
    dim_t = 10000 ** (2 * (torch.arange(feats, dtype=torch.float32) // 2) / feats)
    pos = coords_unact.sigmoid()[..., None] * (2 * math.pi) / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)


def test_token_proposals_are_the_official_ones():
    _, mask = batch()
    shapes = [(8, 10), (4, 5), (2, 3), (1, 2)]
    masks = [torch.nn.functional.interpolate(mask[None].float(), size=s)[0].bool() for s in shapes]
    padding = torch.cat([m.flatten(1) for m in masks], 1)
    anchors, usable = token_proposals(shapes, padding)
    ref, ok = official_proposals(shapes, padding)
    assert torch.equal(usable, ok & ~padding) and torch.equal(anchors, ref)


@pytest.mark.parametrize("variant", ["deformable_detr", "sparse_detr"])
def test_two_stage_queries_follow_the_official_code(variant):
    torch.manual_seed(0)
    model = build_model(model_cfg(deformable={"two_stage": True, "box_refine": True,
                                              "two_stage_variant": variant})).eval()
    for p in list(model.class_embed.parameters()) + list(model.bbox_embed.parameters()):
        p.data.normal_(0, 0.5)  # a proposal head with opinions, so that the ranking matters
    with torch.no_grad():
        out = model(*batch())
    memory = out["memory"].detach().requires_grad_()
    padding, shapes = out["padding"], out["context"]["shapes"]
    anchors, usable = token_proposals(shapes, padding)
    tgt, query_pos, reference = model.decoder_queries(memory, {}, anchors, usable)

    props, ok = official_proposals(shapes, padding)
    feats = model.enc_output_norm(model.enc_output(memory.masked_fill(padding[..., None], 0).masked_fill(
        ~ok[..., None], 0)))
    cls = model.class_embed[model.dec_layers](feats)
    coords = model.bbox_embed[model.dec_layers](feats) + props
    score = cls.topk(1, dim=2).values[..., 0] if variant == "sparse_detr" else cls[..., 0]
    top = torch.topk(score, model.num_queries, dim=1)[1]
    top_coords = torch.gather(coords, 1, top[..., None].repeat(1, 1, 4)).detach()
    pos = model.pos_trans_norm(model.pos_trans(official_sine(top_coords, model.dim)))
    torch.testing.assert_close(reference, top_coords.sigmoid())
    if variant == "sparse_detr":
        assert model.pos_trans.out_features == model.dim
        torch.testing.assert_close(query_pos, pos)
        torch.testing.assert_close(tgt, torch.gather(memory, 1, top[..., None].repeat(1, 1, memory.shape[-1])))
        tgt.sum().backward()  # the content is the memory itself, not detached
        assert memory.grad is not None and memory.grad.abs().sum() > 0
    else:
        assert model.pos_trans.out_features == 2 * model.dim
        torch.testing.assert_close(query_pos, pos[..., :model.dim])
        torch.testing.assert_close(tgt, pos[..., model.dim:])
    # the proposals are scored over every token, padded ones included (no masking)
    torch.testing.assert_close(out["enc_outputs"]["pred_logits"], cls.detach())
    assert (out["enc_outputs"]["pred_boxes"][padding] == 1).all()


@pytest.mark.parametrize("variant", ["deformable_detr", "sparse_detr"])
@torch.no_grad()
def test_two_stage_without_box_refine_refines_with_the_shared_heads(variant):
    """Sparse DETR's fork (Deformable DETR's code fails on --two_stage alone)."""
    torch.manual_seed(0)
    model = build_model(model_cfg(deformable={"two_stage": True, "two_stage_variant": variant})).eval()
    for p in model.bbox_embed.parameters():
        p.normal_(0, 0.3)
    assert model.class_embed[0] is model.class_embed[-1]  # shared heads, the proposal head included
    seen = capture_decoder(model)
    model(*batch())
    delta = model.bbox_embed[0](seen["hs"][0])
    torch.testing.assert_close(seen["refs"][1], (delta + inverse_sigmoid(seen["refs"][0])).sigmoid())


def test_head_sharing_and_init_follow_the_official_code():
    one_stage = build_model(model_cfg(deformable={"box_refine": True}))
    assert (one_stage.bbox_embed[0].layers[-1].bias[2:] == -2).all()
    assert (one_stage.bbox_embed[1].layers[-1].bias == 0).all()
    plain = build_model(model_cfg())
    assert plain.class_embed[0] is plain.class_embed[1] and (plain.bbox_embed[1].layers[-1].bias[2:] == -2).all()
    # Sparse DETR clones the heads when it has encoder aux heads, even without box refinement
    sparse = build_model(model_cfg(deformable={"two_stage": True, "two_stage_variant": "sparse_detr"},
                                   sparse={"rho": 0.3}))
    assert len(sparse.class_embed) == 3 and sparse.class_embed[0] is not sparse.class_embed[1]
    assert all((b.layers[-1].bias == 0).all() for b in sparse.bbox_embed)


def test_scorer_reads_the_two_stage_projection():
    torch.manual_seed(0)
    model = build_model(model_cfg(deformable={"two_stage": True, "box_refine": True,
                                              "two_stage_variant": "sparse_detr"}, sparse={"rho": 0.3})).eval()
    seen = {}
    model.scorer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    images, mask = batch()
    with torch.no_grad():
        out = model(images, mask)
        src, pos, padding, shapes, _ = model.multiscale_inputs(images, mask)
        _, ok = official_proposals(shapes, padding)
        x = (src + pos).masked_fill(padding[..., None], 0).masked_fill(~ok[..., None], 0)
        torch.testing.assert_close(seen["x"], model.enc_output_norm(model.enc_output(x)))
    torch.testing.assert_close(out["saliency"]["logits"], seen["out"])


def test_scoring_network_is_sparse_detrs_mask_predictor():
    """MaskPredictor: the mean runs over every token of the padded map; the official
    forward then fills padding with the batch minimum."""
    torch.manual_seed(0)
    net = ScoringNetwork(16)
    x, padding = torch.randn(2, 7, 16), torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    z = net.layer1(x)
    z_local, z_global = torch.split(z, 8, dim=-1)
    z = torch.cat([z_local, z_global.mean(dim=1, keepdim=True).expand(-1, 7, -1)], -1)
    ref = net.layer2(z).squeeze(-1)
    ref = ref.masked_fill(padding, ref.min())
    torch.testing.assert_close(net(x, padding), ref)
    target = (torch.rand(2, 7) > 0.5).float() * ~padding
    official_loss = torch.nn.functional.multilabel_soft_margin_loss(ref, target)
    torch.testing.assert_close(dam_loss(ref, target, padding), official_loss)


def test_sparse_encoder_carries_the_kept_queries_from_layer_to_layer():
    """Slots past an image's keep count are never written back, but (as the official
    ``tgt``) go on through the layers, and feed the aux heads as they are."""
    enc, src, pos, shapes, padding, ratios, keep, valid = sparse_encoder_case(layers=3)
    seen = []
    enc(src, pos, shapes, padding, ratios, keep, valid, after_layer=lambda i, q: seen.append(q))
    assert len(seen) == 2 and not torch.equal(seen[0][1, 2], seen[1][1, 2])
