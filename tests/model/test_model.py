"""LFM2ForCausalLM: shapes, causality, packed == unpacked (attention AND conv), padding, attention backends
(eager / sdpa / a naive stand-in for flash-attn to check the cu_seqlens wiring), BatchLayout, MoE routing
and expert-bias balancing, initialisation and weight tying."""

from __future__ import annotations

import sys
import threading
import types

import pytest
import torch
import torch.nn.functional as F

from lfm2_train.model import (
    ATTENTION,
    CONV,
    BatchLayout,
    LFM2Config,
    LFM2ForCausalLM,
    doc_ids_from_position_ids,
    get_preset,
    position_ids_from_doc_ids,
)
from lfm2_train.model import attention as attention_mod
from lfm2_train.model.attention import Attention
from lfm2_train.model.moe import MoEFeedForward

ATOL = 1e-5


def build(name: str = "tiny", seed: int = 0, **changes) -> LFM2ForCausalLM:
    cfg = get_preset(name)
    if changes:
        cfg = cfg.replace(**changes)
    torch.manual_seed(seed)
    return LFM2ForCausalLM(cfg).eval()


def build_like(model: LFM2ForCausalLM, **changes) -> LFM2ForCausalLM:
    """Same weights (and expert biases), another config (e.g. another attention backend)."""
    other = LFM2ForCausalLM(model.config.replace(**changes)).eval()
    other.load_state_dict(model.state_dict())
    return other


def randomise_expert_bias(model: LFM2ForCausalLM, seed: int = 1, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.moe_layers():
        m.expert_bias.copy_(torch.randn(m.expert_bias.shape, generator=g) * scale)


def conv_only_config(**changes) -> LFM2Config:
    kw = dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, layer_types=[CONV] * 3, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=128, block_auto_adjust_ff_dim=False)
    kw.update(changes)
    return LFM2Config(**kw)


# Two rows of three documents each; includes docs of length 1 and 2 (shorter than the conv kernel k=3).
DOC_LENGTHS = [[7, 1, 4], [2, 9, 1]]


def packed_batch(vocab: int, seed: int = 0, lengths=DOC_LENGTHS):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths[0])
    assert all(sum(r) == T for r in lengths)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=g)
    pos = torch.zeros_like(ids)
    doc = torch.zeros_like(ids)
    for b, row in enumerate(lengths):
        s = 0
        for j, n in enumerate(row):
            pos[b, s:s + n] = torch.arange(n)
            doc[b, s:s + n] = j
            s += n
    return ids, pos, doc


def per_doc_reference(model: LFM2ForCausalLM, ids: torch.Tensor, lengths=DOC_LENGTHS) -> torch.Tensor:
    out = torch.empty(*ids.shape, model.config.vocab_size)
    for b, row in enumerate(lengths):
        s = 0
        for n in row:
            out[b, s:s + n] = model(ids[b:b + 1, s:s + n])[0]
            s += n
    return out


# ---------------------------------------------------------------------------------------------- basics
@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_output_shape_and_logits_to_keep(name: str) -> None:
    model = build(name)
    ids = torch.randint(0, 512, (3, 11))
    with torch.no_grad():
        logits = model(ids)
        last = model(ids, logits_to_keep=2)
    assert logits.shape == (3, 11, 512)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert last.shape == (3, 2, 512)
    torch.testing.assert_close(last, logits[:, -2:], atol=ATOL, rtol=0)


def test_backbone_returns_hidden_states() -> None:
    model = build()
    ids = torch.randint(0, 512, (2, 5))
    with torch.no_grad():
        h = model.model(ids)
        logits = model(ids)
    assert h.shape == (2, 5, 64)
    torch.testing.assert_close(logits, h @ model.model.embed_tokens.weight.T, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("t", [0, 5, 11])
def test_causality(name: str, t: int) -> None:
    model = build(name)
    if model.config.is_moe:
        randomise_expert_bias(model)
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (2, 12))
    changed = ids.clone()
    changed[:, t] = (changed[:, t] + 1 + torch.arange(2) * 17) % 512
    with torch.no_grad():
        a, b = model(ids), model(changed)
    if t > 0:
        torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    # the changed token (and, through the mixers, later ones) does change the output
    assert (a[:, t:] - b[:, t:]).abs().amax(-1).min() > 1e-4


def test_gradients_flow_to_all_parameters() -> None:
    model = build("tiny-moe").train()
    ids = torch.randint(0, 512, (2, 16))
    logits = model(ids)
    F.cross_entropy(logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if "experts" not in name:
            assert p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("how", ["position_ids", "doc_ids"])
def test_packed_equals_unpacked(name: str, backend: str, how: str) -> None:
    model = build(name, attn_implementation=backend)
    if model.config.is_moe:
        randomise_expert_bias(model)
    ids, pos, doc = packed_batch(512)
    with torch.no_grad():
        ref = per_doc_reference(model, ids)
        packed = model(ids, position_ids=pos) if how == "position_ids" else model(ids, doc_ids=doc)
    assert (packed - ref).abs().max().item() <= ATOL


def test_packed_with_both_doc_ids_and_position_ids() -> None:
    model = build()
    ids, pos, doc = packed_batch(512)
    with torch.no_grad():
        ref = per_doc_reference(model, ids)
        packed = model(ids, position_ids=pos, doc_ids=doc)
    assert (packed - ref).abs().max().item() <= ATOL


@pytest.mark.parametrize("kind", [CONV, ATTENTION])
def test_single_mixer_model_does_not_leak_across_documents(kind: str) -> None:
    """A model made only of one mixer kind: packed == separate, and without boundaries it DOES leak,
    so this test would catch a mixer that ignored document boundaries."""
    torch.manual_seed(0)
    # a larger init than the default 0.02 makes the cross-document signal large compared with ATOL
    model = LFM2ForCausalLM(conv_only_config(layer_types=[kind] * 3, initializer_range=0.1)).eval()
    ids, pos, doc = packed_batch(512, seed=3)
    with torch.no_grad():
        ref = per_doc_reference(model, ids)
        by_pos = model(ids, position_ids=pos)
        by_doc = model(ids, doc_ids=doc)
        unbounded = model(ids)
    assert (by_pos - ref).abs().max().item() <= ATOL
    assert (by_doc - ref).abs().max().item() <= ATOL
    # Without boundaries, the first token of every later document sees the previous document.
    for b, row in enumerate(DOC_LENGTHS):
        first = row[0]
        assert (unbounded[b, :first] - ref[b, :first]).abs().max() <= ATOL  # first doc is unaffected
        assert (unbounded[b, first] - ref[b, first]).abs().max() > 100 * ATOL
        assert (unbounded[b, first + row[1]] - ref[b, first + row[1]]).abs().max() > 100 * ATOL


def test_conv_only_model_leak_depends_only_on_kernel_window() -> None:
    """A conv-only stack of L layers sees at most L*(k-1) tokens back: a doc starting far enough after an
    unrelated prefix computes the same thing even without boundaries. Guards the test above from a
    model that ignores its input entirely."""
    torch.manual_seed(0)
    model = LFM2ForCausalLM(conv_only_config(initializer_range=0.1)).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (1, 20), generator=g)
    other = ids.clone()
    other[0, :4] = (other[0, :4] + 1) % 512
    with torch.no_grad():
        a, b = model(ids), model(other)
    reach = 3 * (3 - 1)
    assert (a[0, 4 + reach:] - b[0, 4 + reach:]).abs().max() <= ATOL
    assert (a[0, 4:6] - b[0, 4:6]).abs().amax(-1).min() > 100 * ATOL  # but the next tokens do see it


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_match_unpadded(name: str, side: str) -> None:
    model = build(name)
    g = torch.Generator().manual_seed(5)
    lengths = [9, 1, 2, 5]
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    prompts = [torch.randint(1, 512, (n,), generator=g) for n in lengths]
    for i, p in enumerate(prompts):
        sl = slice(T - len(p), T) if side == "left" else slice(0, len(p))
        ids[i, sl], mask[i, sl] = p, 1
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        assert torch.isfinite(out).all()
        for i, p in enumerate(prompts):
            alone = model(p[None])[0]
            sl = slice(T - len(p), T) if side == "left" else slice(0, len(p))
            assert (out[i, sl] - alone).abs().max().item() <= ATOL


# ---------------------------------------------------------------------------------------------- layout
def test_doc_ids_position_ids_conversions() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 0, 1], [0, 1, 2, 3, 4, 5], [3, 4, 0, 1, 7, 8]])
    assert doc_ids_from_position_ids(pos).tolist() == [[0, 0, 0, 1, 2, 2], [0] * 6, [0, 0, 1, 1, 2, 2]]
    doc = torch.tensor([[0, 0, 0, 1, 2, 2], [-1, -1, 0, 0, 0, 0], [0, 0, 1, 1, -1, -1]])
    assert position_ids_from_doc_ids(doc).tolist() == [[0, 1, 2, 0, 0, 1], [0, 0, 0, 1, 2, 3], [0, 1, 0, 1, 0, 0]]


def test_varlen_cu_seqlens_for_known_layout() -> None:
    doc = torch.tensor([[0, 0, 0, 1, 2, 2], [0, 0, 1, 1, 1, 1], [-1, -1, 0, 0, 0, 0]])
    layout = BatchLayout(position_ids=position_ids_from_doc_ids(doc), doc_ids=doc)
    cu, max_len = layout.varlen()
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 4, 6, 8, 12, 14, 18]
    assert max_len == 4


def test_varlen_row_boundaries_split_equal_doc_ids() -> None:
    # row 0 ends with doc 0 and row 1 starts with doc 0: still two segments
    doc = torch.zeros(2, 4, dtype=torch.long)
    cu, max_len = BatchLayout(position_ids=position_ids_from_doc_ids(doc), doc_ids=doc).varlen()
    assert cu.tolist() == [0, 4, 8] and max_len == 4


def test_varlen_without_docs() -> None:
    layout = BatchLayout(position_ids=torch.arange(5).expand(3, 5))
    cu, max_len = layout.varlen()
    assert cu.tolist() == [0, 5, 10, 15] and max_len == 5
    assert layout.is_simple and layout.attention_mask() is None and layout.conv_history_masks(3) is None


def test_attention_mask_is_block_diagonal_causal() -> None:
    doc = torch.tensor([[0, 0, 1, 1, 1]])
    mask = BatchLayout(position_ids=position_ids_from_doc_ids(doc), doc_ids=doc).attention_mask()
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert mask.shape == (1, 1, 5, 5)
    assert mask[0, 0].long().tolist() == expected.tolist()


def test_conv_history_masks_for_known_layout() -> None:
    doc = torch.tensor([[0, 0, 0, 1, 2, 2]])
    masks = BatchLayout(position_ids=position_ids_from_doc_ids(doc), doc_ids=doc).conv_history_masks(3)
    assert len(masks) == 2
    assert masks[0][0, :, 0].long().tolist() == [0, 1, 1, 0, 0, 1]  # lag 1
    assert masks[1][0, :, 0].long().tolist() == [0, 0, 1, 0, 0, 0]  # lag 2


# ---------------------------------------------------------------------------------------------- backends
def _padded_batch(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 512, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :1] = 0
    return ids, mask


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_eager_and_sdpa_agree(name: str) -> None:
    sdpa = build(name, attn_implementation="sdpa")
    eager = build_like(sdpa, attn_implementation="eager")
    assert all(m.backend == "eager" for m in eager.modules() if isinstance(m, Attention))
    ids, pos, doc = packed_batch(512)
    pids, pmask = _padded_batch()
    with torch.no_grad():
        for kwargs in ({}, {"position_ids": pos}, {"doc_ids": doc}):
            a, b = sdpa(ids, **kwargs), eager(ids, **kwargs)
            assert (a - b).abs().max().item() <= ATOL, kwargs
        a, b = sdpa(pids, attention_mask=pmask), eager(pids, attention_mask=pmask)
        valid = pmask.bool()
        assert (a[valid] - b[valid]).abs().max().item() <= ATOL


def test_eager_and_sdpa_agree_with_cache() -> None:
    sdpa = build(attn_implementation="sdpa")
    eager = build_like(sdpa, attn_implementation="eager")
    pids, pmask = _padded_batch()
    with torch.no_grad():
        outs = []
        for model in (sdpa, eager):
            cache = model.new_cache(3, 12)
            first = model(pids, attention_mask=pmask, cache=cache)[:, -1]
            steps = [model(torch.full((3, 1), 5 + i), cache=cache)[:, -1] for i in range(3)]
            outs.append(torch.stack([first, *steps]))
    assert (outs[0] - outs[1]).abs().max().item() <= ATOL


# ---------------------------------------------------------------------------------------------- flash-attn
def _naive_flash_attn_func(q, k, v, softmax_scale=None, causal=False):
    """(B, Tq, H, D), (B, Tk, G, D) -> (B, Tq, H, D); flash-attn's GQA and bottom-right causal alignment."""
    B, Tq, H, D = q.shape
    Tk, G = k.shape[1], k.shape[2]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    rep = H // G
    kk = k.repeat_interleave(rep, dim=2)
    vv = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk.double()) * scale
    if causal:
        allowed = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vv.double())
    return out.to(q.dtype).contiguous()


def _naive_flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
    """(total, H, D) with int32 cu_seqlens: attention independently inside every segment."""
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32
    assert int(cu_q[-1]) == q.shape[0] and int(cu_k[-1]) == k.shape[0]
    lengths = (cu_q[1:] - cu_q[:-1]).tolist()
    assert max_q == max(lengths) and max_k == max((cu_k[1:] - cu_k[:-1]).tolist())
    outs = []
    for i in range(len(lengths)):
        qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        outs.append(_naive_flash_attn_func(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], softmax_scale, causal)[0])
    return torch.cat(outs, dim=0)


class FakeFlash(types.SimpleNamespace):
    def __init__(self) -> None:
        super().__init__(calls=[])

    def flash_attn_func(self, *args, **kwargs):
        self.calls.append("dense")
        return _naive_flash_attn_func(*args, **kwargs)

    def flash_attn_varlen_func(self, *args, **kwargs):
        self.calls.append("varlen")
        return _naive_flash_attn_varlen_func(*args, **kwargs)


def test_flash_attn_without_package_raises_helpful_import_error(monkeypatch) -> None:
    monkeypatch.setattr(attention_mod, "_flash_module", None)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # make the import fail even if it is installed
    with pytest.raises(ImportError, match=r"lfm2_train\[gpu\]"):
        LFM2ForCausalLM(get_preset("tiny").replace(attn_implementation="flash_attn"))


def test_naive_flash_reference_matches_sdpa() -> None:
    """Sanity check of the test double itself against torch's kernel (GQA, causal)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 4, 16), torch.randn(2, 6, 2, 16), torch.randn(2, 6, 2, 16)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(_naive_flash_attn_func(q, k, v, causal=True), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout_kind", ["plain", "packed", "padded"])
def test_flash_backend_wiring_matches_sdpa_direct(monkeypatch, layout_kind: str) -> None:
    fake = FakeFlash()
    monkeypatch.setattr(attention_mod, "_flash_module", fake)
    cfg = get_preset("tiny").replace(attn_implementation="flash_attn")
    torch.manual_seed(0)
    attn = Attention(cfg, layer_idx=1)
    B, T, H, G, D = 2, 12, 4, 2, 16
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, G, T, D), torch.randn(B, G, T, D)
    if layout_kind == "plain":
        layout = BatchLayout(position_ids=torch.arange(T).expand(B, T))
    elif layout_kind == "packed":
        _, pos, doc = packed_batch(512)
        layout = BatchLayout(position_ids=pos, doc_ids=doc)
    else:
        doc = torch.zeros(B, T, dtype=torch.long)
        doc[0, :5] = -1
        layout = BatchLayout(position_ids=position_ids_from_doc_ids(doc), doc_ids=doc)
    flash = attn._flash(q, k, v, layout)
    sdpa = attn._sdpa(q, k, v, layout)
    assert fake.calls == (["dense"] if layout_kind == "plain" else ["varlen"])
    assert flash.shape == (B, H, T, D)
    if layout_kind == "padded":
        valid = layout.doc_ids >= 0  # (B, T)
        assert (flash.transpose(1, 2)[valid] - sdpa.transpose(1, 2)[valid]).abs().max().item() <= ATOL
    else:
        assert (flash - sdpa).abs().max().item() <= ATOL


@pytest.fixture
def flash_on_cpu(monkeypatch):
    """Install the naive flash module and route the flash backend's CPU dispatch through `_flash`."""
    fake = FakeFlash()
    monkeypatch.setattr(attention_mod, "_flash_module", fake)
    original_sdpa = Attention._sdpa
    inside = threading.local()

    def routed(self, q, k, v, layout):
        if self.backend == "flash_attn" and not getattr(inside, "active", False):
            inside.active = True
            try:
                return Attention._flash(self, q, k, v, layout)
            finally:
                inside.active = False
        return original_sdpa(self, q, k, v, layout)

    monkeypatch.setattr(Attention, "_sdpa", routed)
    return fake


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_flash_backend_model_matches_sdpa(flash_on_cpu, name: str) -> None:
    sdpa = build(name)
    flash = build_like(sdpa, attn_implementation="flash_attn")
    ids, pos, doc = packed_batch(512)
    with torch.no_grad():
        a, b = sdpa(ids), flash(ids)
        assert flash_on_cpu.calls and set(flash_on_cpu.calls) == {"dense"}
        assert (a - b).abs().max().item() <= ATOL
        flash_on_cpu.calls.clear()
        for kwargs in ({"position_ids": pos}, {"doc_ids": doc}):
            a, b = sdpa(ids, **kwargs), flash(ids, **kwargs)
            assert (a - b).abs().max().item() <= ATOL
        assert set(flash_on_cpu.calls) == {"varlen"}
        ref = per_doc_reference(sdpa, ids)
        assert (flash(ids, doc_ids=doc) - ref).abs().max().item() <= ATOL


def test_flash_backend_decode_matches_sdpa(flash_on_cpu) -> None:
    sdpa = build()
    flash = build_like(sdpa, attn_implementation="flash_attn")
    ids = torch.randint(0, 512, (2, 6))
    pids, pmask = _padded_batch()
    with torch.no_grad():
        for prompt, mask in ((ids, None), (pids, pmask)):
            outs = []
            for model in (sdpa, flash):
                cache = model.new_cache(prompt.shape[0], prompt.shape[1] + 8)
                first = model(prompt, attention_mask=mask, cache=cache)[:, -1]
                chunk = model(torch.full((prompt.shape[0], 2), 3), cache=cache)[:, -1]  # chunked prefill
                steps = [model(torch.full((prompt.shape[0], 1), 9 + i), cache=cache)[:, -1] for i in range(3)]
                outs.append(torch.stack([first, chunk, *steps]))
            assert (outs[0] - outs[1]).abs().max().item() <= ATOL
    assert "dense" in flash_on_cpu.calls


# ---------------------------------------------------------------------------------------------- MoE
def _moe_block(seed: int = 0, **changes) -> MoEFeedForward:
    cfg = get_preset("tiny-moe").replace(**changes)
    torch.manual_seed(seed)
    block = MoEFeedForward(cfg)
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.3)
        for p in (block.experts.w1, block.experts.w3, block.experts.w2):
            p.normal_(0, 0.1)
    return block.eval()


@torch.no_grad()
def _naive_moe(block: MoEFeedForward, x: torch.Tensor, k: int, scaling: float, use_bias: bool = True,
               norm: bool = True) -> torch.Tensor:
    """Per-token float64 loop of the LFM2-MoE routing formula."""
    W = block.gate.weight.double()
    w1, w3, w2 = (p.double() for p in (block.experts.w1, block.experts.w3, block.experts.w2))
    bias = block.expert_bias.double()
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for n, tok in enumerate(x.double()):
        s = torch.sigmoid(W @ tok)
        sel = s + bias if use_bias else s
        chosen = sorted(range(len(s)), key=lambda e: -float(sel[e]))[:k]
        weights = s[chosen] / (s[chosen].sum() + 1e-6) if norm else s[chosen]
        for w, e in zip(weights * scaling, chosen):
            out[n] += w * (w2[e] @ (F.silu(w1[e] @ tok) * (w3[e] @ tok)))
    return out


@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_moe_matches_naive_float64_loop(scaling: float) -> None:
    block = _moe_block(routed_scaling_factor=scaling)
    with torch.no_grad():
        block.expert_bias.copy_(torch.tensor([0.4, -0.3, 0.1, 0.0]))
    torch.manual_seed(1)
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        out = block(x).reshape(-1, 64)
    ref = _naive_moe(block, x.reshape(-1, 64), k=2, scaling=scaling)
    assert (out.double() - ref).abs().max().item() <= 1e-5
    assert ref.abs().max() > 1e-3


@pytest.mark.parametrize("changes", [{"use_expert_bias": False}, {"norm_topk_prob": False}])
def test_moe_variants_match_naive_loop(changes: dict) -> None:
    block = _moe_block(**changes)
    with torch.no_grad():
        block.expert_bias.copy_(torch.tensor([5.0, -5.0, 0.0, 0.0]))  # ignored when use_expert_bias=False
    x = torch.randn(20, 64)
    with torch.no_grad():
        out = block(x[None])[0]
    ref = _naive_moe(block, x, k=2, scaling=1.0, use_bias=changes.get("use_expert_bias", True),
                     norm=changes.get("norm_topk_prob", True))
    assert (out.double() - ref).abs().max().item() <= 1e-5


def test_expert_bias_changes_selection_not_combine_weights() -> None:
    block = _moe_block(routed_scaling_factor=1.7)
    x = torch.randn(64, 64)
    with torch.no_grad():
        scores0, chosen0, _ = block.route(x)
        block.expert_bias.copy_(torch.tensor([10.0, 0.0, 0.0, -10.0]))
        scores, chosen, weights = block.route(x)
    torch.testing.assert_close(scores, scores0)  # the bias never touches the scores
    assert (chosen == 0).any(-1).all()  # forced in
    assert not (chosen == 3).any()  # forced out
    assert not torch.equal(chosen.sort(-1).values, chosen0.sort(-1).values)
    picked = scores.gather(-1, chosen)
    expected = picked / (picked.sum(-1, keepdim=True) + 1e-6) * 1.7
    torch.testing.assert_close(weights, expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.full((64,), 1.7), atol=1e-5, rtol=0)


def test_expert_bias_changes_model_output() -> None:
    model = build("tiny-moe")
    ids = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        a = model(ids)
        randomise_expert_bias(model, scale=1.0)
        b = model(ids)
    assert (a - b).abs().max() > 1e-4


def test_update_expert_bias_sign_rule() -> None:
    block = _moe_block(expert_bias_update_rate=0.01)
    bias0 = torch.tensor([0.1, -0.2, 0.3, 0.0])
    block.expert_bias.copy_(bias0)
    block.expert_load.copy_(torch.tensor([10.0, 0.0, 5.0, 5.0]))  # mean 5
    load = block.update_expert_bias()
    assert load.tolist() == [10.0, 0.0, 5.0, 5.0]
    torch.testing.assert_close(block.expert_bias, bias0 + 0.01 * torch.tensor([-1.0, 1.0, 0.0, 0.0]), atol=0, rtol=0)
    assert block.expert_load.tolist() == [0.0] * 4
    assert block.expert_bias.dtype == torch.float32
    # no load recorded: nothing moves
    block.update_expert_bias()
    torch.testing.assert_close(block.expert_bias, bias0 + 0.01 * torch.tensor([-1.0, 1.0, 0.0, 0.0]), atol=0, rtol=0)


def test_update_expert_bias_none_leaves_bias() -> None:
    block = _moe_block(expert_bias_update="none")
    block.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    block.expert_load.copy_(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    block.update_expert_bias()
    assert block.expert_bias.tolist() == pytest.approx([0.1, -0.2, 0.3, 0.0])
    assert block.expert_load.sum() == 0


def test_training_forward_counts_expert_load_and_model_update() -> None:
    model = build("tiny-moe", expert_bias_update_rate=0.5)
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        model(ids)  # eval mode: no bookkeeping
    assert all(m.expert_load.sum() == 0 for m in model.moe_layers())
    model.train()
    with torch.no_grad():
        model(ids)  # train mode without autograd (sampling, validation): still no bookkeeping
    assert all(m.expert_load.sum() == 0 for m in model.moe_layers())
    model(ids)  # a training forward
    layers = model.moe_layers()
    assert len(layers) == 3  # 4 layers, first dense
    for m in layers:
        assert m.expert_load.sum().item() == 2 * 9 * 2  # tokens x top-k
    before = [m.expert_load.clone() for m in layers]
    loads = model.update_expert_biases()
    for m, load, b in zip(layers, loads, before):
        assert torch.equal(load, b)
        assert torch.equal(m.expert_bias, 0.5 * torch.sign(b.mean() - b))
        assert m.expert_load.sum() == 0


# ---------------------------------------------------------------------------------------------- init / tying
def test_tied_head_shares_storage() -> None:
    model = build()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.reset_parameters()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        model.model.embed_tokens.weight[3, 0] = 42.0
    assert model.lm_head.weight[3, 0] == 42.0
    assert "lm_head.weight" not in {n for n, _ in model.named_parameters()}


def test_untied_head_is_separate() -> None:
    model = build(tie_word_embeddings=False)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize("std", [0.02, 0.05])
def test_reset_parameters_std(std: float) -> None:
    model = build("tiny-moe", initializer_range=std)
    with torch.no_grad():
        for m in model.moe_layers():
            m.expert_bias.fill_(1.0)
            m.expert_load.fill_(3.0)
    model.reset_parameters()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif p.numel() >= 1000:
            assert abs(p.std().item() - std) < 0.15 * std, name
            assert abs(p.mean().item()) < 0.1 * std, name
    for m in model.moe_layers():
        assert m.expert_bias.abs().sum() == 0 and m.expert_load.abs().sum() == 0


def test_conv_bias_is_zero_initialised() -> None:
    model = build(conv_bias=True)
    conv = model.model.layers[0].conv
    assert conv.conv.bias is not None and conv.in_proj.bias is not None
    assert conv.conv.bias.abs().sum() == 0 and conv.out_proj.bias.abs().sum() == 0


def test_seeded_init_is_deterministic() -> None:
    a, b = build(seed=3), build(seed=3)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert not torch.equal(build(seed=4).model.embed_tokens.weight, a.model.embed_tokens.weight)


def test_state_dict_keys_are_checkpoint_names() -> None:
    keys = set(build().state_dict())
    for key in ("model.embed_tokens.weight", "model.embedding_norm.weight", "model.layers.0.conv.in_proj.weight",
                "model.layers.0.conv.conv.weight", "model.layers.0.conv.out_proj.weight",
                "model.layers.1.self_attn.q_layernorm.weight", "model.layers.1.self_attn.k_layernorm.weight",
                "model.layers.1.self_attn.out_proj.weight", "model.layers.2.feed_forward.w1.weight",
                "model.layers.2.operator_norm.weight", "model.layers.2.ffn_norm.weight"):
        assert key in keys
    assert build().model.layers[0].conv.conv.weight.shape == (64, 1, 3)
    assert not any("inv_freq" in k for k in keys)
