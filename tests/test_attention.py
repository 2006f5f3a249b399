"""effdetr's attention and DETR transformer layers against PyTorch's ``nn.MultiheadAttention``
with the same weights, and against the official DETR layer formulas written out with it
(facebookresearch/detr, models/transformer.py: forward_post / forward_pre)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effdetr.models.transformer import DecoderLayer, EncoderLayer, Transformer
from effdetr.ops.attention import MultiHeadAttention

DIM, HEADS = 12, 3


def torch_mha(ours: MultiHeadAttention, dropout: float = 0.0) -> nn.MultiheadAttention:
    """A batch-first ``nn.MultiheadAttention`` holding ``ours``' weights: in_proj is the
    stacked [q; k; v] matrix, out_proj the output projection."""
    ref = nn.MultiheadAttention(DIM, HEADS, dropout=dropout, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    return ref


def randomise(module: nn.Module, seed: int) -> None:
    """Random values in every parameter (zero-initialised biases would hide a bias mix-up)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def padding_mask(b: int, n: int, valid: list[int]) -> torch.Tensor:
    """[B, N] True on the last N - valid[b] keys of image b."""
    return torch.arange(n)[None, :] >= torch.tensor(valid)[:, None]


@pytest.mark.parametrize("use_mask", [False, True])
def test_multihead_attention_matches_torch_with_copied_weights(use_mask):
    """Distinct query, key and value inputs and a key padding mask (True = ignore, as in
    PyTorch), eval mode with attention dropout configured: the outputs equal PyTorch's.
    Catches swapped k/v projections, a wrong head split, a missing 1/sqrt(d) scale, an
    inverted or ignored padding mask, and attention dropout applied in eval mode."""
    torch.manual_seed(0)
    ours = MultiHeadAttention(DIM, HEADS, dropout=0.5)
    randomise(ours, 1)
    ref = torch_mha(ours, dropout=0.5)
    ours.eval(), ref.eval()
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, n, DIM, generator=g) for n in (4, 7, 7))
    mask = padding_mask(2, 7, [7, 3]) if use_mask else None
    expected, _ = ref(q, k, v, key_padding_mask=mask, need_weights=False)
    torch.testing.assert_close(ours(q, k, v, key_padding_mask=mask), expected, rtol=1e-5, atol=1e-6)


def test_padded_keys_do_not_change_the_output():
    """Changing the key/value vectors at padded positions leaves every output unchanged
    (independent of PyTorch: a mask that is read the wrong way round changes them)."""
    torch.manual_seed(0)
    ours = MultiHeadAttention(DIM, HEADS).eval()
    randomise(ours, 3)
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 4, DIM, generator=g), torch.randn(2, 6, DIM, generator=g)
    mask = padding_mask(2, 6, [6, 2])
    k2 = k.clone()
    k2[1, 2:] = torch.randn(4, DIM, generator=g) * 10
    with torch.no_grad():
        a, b = ours(q, k, k, mask), ours(q, k2, k2, mask)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[1], ours(q, k2, k2)[1])  # the padded keys do matter unmasked


class OfficialEncoderLayer(nn.Module):
    """DETR's TransformerEncoderLayer, transcribed (batch-first), with effdetr's weights."""

    def __init__(self, ours: EncoderLayer, pre_norm: bool):
        super().__init__()
        self.self_attn = torch_mha(ours.self_attn)
        self.linear1, self.linear2 = ours.ffn.lin1, ours.ffn.lin2
        self.norm1, self.norm2 = ours.norm1, ours.norm2
        self.pre_norm = pre_norm

    def forward(self, src, pos, mask):
        if not self.pre_norm:  # forward_post
            q = k = src + pos
            src2 = self.self_attn(q, k, value=src, key_padding_mask=mask)[0]
            src = self.norm1(src + src2)
            src2 = self.linear2(F.relu(self.linear1(src)))
            return self.norm2(src + src2)
        src2 = self.norm1(src)  # forward_pre
        q = k = src2 + pos
        src2 = self.self_attn(q, k, value=src2, key_padding_mask=mask)[0]
        src = src + src2
        src2 = self.norm2(src)
        src2 = self.linear2(F.relu(self.linear1(src2)))
        return src + src2


class OfficialDecoderLayer(nn.Module):
    """DETR's TransformerDecoderLayer, transcribed (batch-first), with effdetr's weights."""

    def __init__(self, ours: DecoderLayer, pre_norm: bool):
        super().__init__()
        self.self_attn, self.multihead_attn = torch_mha(ours.self_attn), torch_mha(ours.cross_attn)
        self.linear1, self.linear2 = ours.ffn.lin1, ours.ffn.lin2
        self.norm1, self.norm2, self.norm3 = ours.norm1, ours.norm2, ours.norm3
        self.pre_norm = pre_norm

    def forward(self, tgt, memory, pos, query_pos, memory_mask):
        if not self.pre_norm:  # forward_post
            q = k = tgt + query_pos
            tgt = self.norm1(tgt + self.self_attn(q, k, value=tgt)[0])
            tgt2 = self.multihead_attn(tgt + query_pos, memory + pos, value=memory,
                                       key_padding_mask=memory_mask)[0]
            tgt = self.norm2(tgt + tgt2)
            return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))
        tgt2 = self.norm1(tgt)  # forward_pre
        q = k = tgt2 + query_pos
        tgt = tgt + self.self_attn(q, k, value=tgt2)[0]
        tgt2 = self.norm2(tgt)
        tgt = tgt + self.multihead_attn(tgt2 + query_pos, memory + pos, value=memory,
                                        key_padding_mask=memory_mask)[0]
        tgt2 = self.norm3(tgt)
        return tgt + self.linear2(F.relu(self.linear1(tgt2)))


def layer_inputs(seed=5):
    g = torch.Generator().manual_seed(seed)
    src, pos = torch.randn(2, 7, DIM, generator=g), torch.randn(2, 7, DIM, generator=g)
    tgt, query_pos = torch.randn(2, 4, DIM, generator=g), torch.randn(2, 4, DIM, generator=g)
    return src, pos, tgt, query_pos, padding_mask(2, 7, [7, 4])


@pytest.mark.parametrize("pre_norm", [False, True])
def test_encoder_layer_matches_detrs_layer(pre_norm):
    """The encoder layer (post-norm and pre-norm) equals DETR's forward_post / forward_pre in
    eval mode with a padded image. Catches pre-norm bugs such as attending to the raw
    instead of the normalised input, a norm after the residual, or the position embedding
    added to the values."""
    torch.manual_seed(0)
    ours = EncoderLayer(DIM, HEADS, 20, 0.1, pre_norm)
    randomise(ours, 6)
    ours.eval()
    src, pos, _, _, mask = layer_inputs()
    with torch.no_grad():
        expected = OfficialEncoderLayer(ours, pre_norm).eval()(src, pos, mask)
        torch.testing.assert_close(ours(src, pos, mask), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_decoder_layer_matches_detrs_layer(pre_norm):
    """The decoder layer (post-norm and pre-norm) equals DETR's forward_post / forward_pre in
    eval mode, cross-attending to a padded memory."""
    torch.manual_seed(0)
    ours = DecoderLayer(DIM, HEADS, 20, 0.1, pre_norm)
    randomise(ours, 7)
    ours.eval()
    memory, pos, tgt, query_pos, mask = layer_inputs(8)
    with torch.no_grad():
        expected = OfficialDecoderLayer(ours, pre_norm).eval()(tgt, memory, pos, query_pos, mask)
        torch.testing.assert_close(ours(tgt, memory, pos, query_pos, mask), expected, rtol=1e-5, atol=1e-5)


def test_pre_norm_encoder_ends_with_a_layer_norm_and_post_norm_does_not():
    """DETR's encoder has a final LayerNorm only with pre-norm (``encoder_norm = LayerNorm if
    normalize_before else None``); the decoder always normalises its outputs."""
    torch.manual_seed(0)
    src, pos, _, _, mask = layer_inputs(9)
    for pre_norm in (False, True):
        tr = Transformer(DIM, HEADS, enc_layers=2, dec_layers=1, ffn_dim=20, dropout=0.0, pre_norm=pre_norm).eval()
        randomise(tr, 10)
        with torch.no_grad():
            x = src
            for layer in tr.encoder:
                x = layer(x, pos, mask)
            if pre_norm:
                x = F.layer_norm(x, (DIM,), tr.enc_norm.weight, tr.enc_norm.bias)
            torch.testing.assert_close(tr.encode(src, mask, pos), x)
