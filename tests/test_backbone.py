"""The backbone's frozen batch norm and which trunk parameters train (DETR's rule: the stem
and layer1 stay frozen unless ``train_stem_and_layer1``; nothing trains without
``train_backbone``)."""
import pytest
import torch
from torch import nn

from effdetr.config import BackboneConfig
from effdetr.models.backbone import Backbone, FrozenBatchNorm2d

C = 3


def batchnorm_with_stats(seed=0) -> nn.BatchNorm2d:
    """An eval-mode BatchNorm2d with random affine parameters and running stats; one channel
    has a variance of the order of eps, so a misplaced eps shows."""
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(C)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(C, generator=g))
        bn.bias.copy_(torch.randn(C, generator=g))
        bn.running_mean.copy_(torch.randn(C, generator=g))
        bn.running_var.copy_(torch.tensor([0.5, 2.0, 3e-5]))
    bn.num_batches_tracked.fill_(7)
    return bn.eval()


def frozen_from(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    """Loaded the way pretrained weights arrive: a BatchNorm2d state dict, which also holds
    ``num_batches_tracked`` (a key FrozenBatchNorm2d has no place for)."""
    frozen = FrozenBatchNorm2d(C)
    frozen.load_state_dict(bn.state_dict())
    return frozen


def test_frozen_batchnorm_equals_eval_batchnorm_with_the_same_statistics():
    """(x - mean) / sqrt(var + eps) * weight + bias, as nn.BatchNorm2d computes in eval mode.
    Catches eps outside the square root, a missing shift, swapped mean/var, and a state dict
    from a BatchNorm2d that no longer loads."""
    bn = batchnorm_with_stats()
    x = torch.randn(2, C, 4, 5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(frozen_from(bn)(x), bn(x))
    # one hand value: weight 2, bias 1, mean 3, var 4 (eps 1e-5) at x = 5
    one = FrozenBatchNorm2d(1)
    one.weight.fill_(2.0), one.bias.fill_(1.0), one.running_mean.fill_(3.0), one.running_var.fill_(4.0)
    assert one(torch.full((1, 1, 1, 1), 5.0)).item() == pytest.approx(2 * 2 / (4 + 1e-5) ** 0.5 + 1, rel=1e-6)


def test_frozen_batchnorm_has_no_trainable_parameters_and_train_mode_changes_nothing():
    """Weight, bias and stats are buffers: no parameters for an optimiser to update, and in
    train mode a forward/backward pass neither uses batch statistics nor moves the running
    ones. Catches weight/bias registered as parameters, and a forward that falls back to
    batch norm's training behaviour."""
    bn = batchnorm_with_stats(2)
    frozen = frozen_from(bn)
    assert list(frozen.parameters()) == []
    assert {n for n, _ in frozen.named_buffers()} == {"weight", "bias", "running_mean", "running_var"}
    before = {n: b.clone() for n, b in frozen.named_buffers()}
    frozen.train()
    x = (torch.randn(4, C, 3, 3, generator=torch.Generator().manual_seed(3)) * 5 + 2).requires_grad_()
    out = frozen(x)
    out.sum().backward()
    torch.testing.assert_close(out, bn(x))  # eval-mode BN: the stored statistics
    for n, b in frozen.named_buffers():
        torch.testing.assert_close(b, before[n], rtol=0, atol=0, msg=n)
    assert x.grad is not None


def tiny_cfg(**kw) -> BackboneConfig:
    base = {"name": "tiny", "pretrained": "none", "dilation": False, "channels": [8, 16, 16, 32]}
    return BackboneConfig(**(base | kw))


STEM_AND_LAYER1 = ("conv1.", "bn1.", "layer1.")


@pytest.mark.parametrize("train_stem_and_layer1", [False, True])
def test_requires_grad_follows_detrs_freezing_rule(train_stem_and_layer1):
    """With ``train_stem_and_layer1`` off, exactly the stem (conv1, bn1) and layer1 are
    frozen and layer2-4 train (DETR's rule, here with trainable batch norm so the norms'
    parameters are covered); with it on, everything trains. A backward pass gives the
    frozen parameters no gradient and every trainable one a gradient."""
    bb = Backbone(tiny_cfg(freeze_bn=False, train_stem_and_layer1=train_stem_and_layer1))
    params = dict(bb.body.named_parameters())
    for name in ("conv1.weight", "bn1.weight", "bn1.bias", "layer1.0.conv1.weight", "layer1.0.bn2.bias",
                 "layer2.0.conv1.weight", "layer3.0.bn1.weight", "layer4.0.conv2.weight"):
        assert name in params, name  # the names the rule is written against exist
    frozen = {n for n, p in params.items() if not p.requires_grad}
    expected = set() if train_stem_and_layer1 else {n for n in params if n.startswith(STEM_AND_LAYER1)}
    assert frozen == expected
    images, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    bb(images, mask)[0].square().mean().backward()
    assert {n for n, p in params.items() if p.grad is None} == expected


def test_train_backbone_false_freezes_everything():
    """``train_backbone=False`` overrides ``train_stem_and_layer1``: no trunk parameter trains."""
    bb = Backbone(tiny_cfg(freeze_bn=False, train_stem_and_layer1=True), train_backbone=False)
    assert [n for n, p in bb.body.named_parameters() if p.requires_grad] == []


def test_freeze_bn_uses_frozen_batchnorm_everywhere():
    """``freeze_bn`` puts FrozenBatchNorm2d in every norm slot (none left as BatchNorm2d), so
    no norm has a parameter even where the rest of its stage trains."""
    bb = Backbone(tiny_cfg(freeze_bn=True, train_stem_and_layer1=True))
    norms = [m for m in bb.body.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    assert [n for n, _ in bb.body.named_parameters() if ".bn" in f".{n}"] == []
    assert "layer2.0.bn1.running_var" in dict(bb.body.named_buffers())
