"""fast.py (the CPU speed layer) against plain model.py: the same model, two code paths.

As llama2.c's test_all.py does for its two implementations: on tiny random GQA models, tied and
untied, every output a caller reads is asserted equal between fast.load and model.load (logits,
loss, every LoRA gradient, batched prefill caches, greedy tokens); then each kernel against an
independent float64 reference, and one check on the real model."""

import pytest
import torch

import fast
import generate
import lora
import model as llama
from tokenizer import load_tokenizer

def both_paths(path):
    return llama.load(path), fast.load(path)


def close(a, b, rel=1e-5):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() <= rel


def train_lora(m, targets):
    """The same LoRA on both paths (seeded), B nonzero so that every gradient flows; train mode."""
    torch.manual_seed(0)
    lora.inject(m, targets, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for mod in lora.lora_modules(m).values():
            mod.lora_B.weight.normal_(0, 0.05)
    m.train()


def test_fast_path_is_in_use(tiny):
    """The fast model really takes the other path (else every equality below is vacuous), and
    the plain one does not: its training attention is CausalAttention, with the same weights."""
    plain, quick = both_paths(tiny[0])
    assert type(quick.model.layers[0].self_attn) is fast.FastAttention
    assert type(plain.model.layers[0].self_attn) is llama.Attention
    assert type(quick.model.layers[0].mlp.up_proj) is fast.SplitLinear and quick.head.func is fast.split_head
    assert type(plain.model.layers[0].mlp.up_proj) is torch.nn.Linear and "head" not in vars(plain)
    for name, p in plain.named_parameters():
        assert torch.equal(p, dict(quick.named_parameters())[name]), name
    calls = []
    real = fast.CausalAttention.apply
    fast.CausalAttention.apply = lambda *a: calls.append(1) or real(*a)
    try:
        lora.inject(quick, ("q_proj", "v_proj"), r=2)
        quick.train()
        idx = torch.randint(0, 300, (1, 20))
        quick.loss(idx, idx, torch.ones_like(idx, dtype=torch.bool)).backward()
    finally:
        fast.CausalAttention.apply = real
    assert len(calls) == quick.args.n_layers - 1            # the last layer runs at `at` rows only: SDPA


def test_logits_and_loss_equal(tiny):
    plain, quick = both_paths(tiny[0])
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 300, (3, 41), generator=g)
    valid = torch.ones(3, 41, dtype=torch.bool)
    valid[1, :7] = False                                        # left padding
    valid[2, 30:] = False                                       # right padding
    with torch.no_grad():
        a, b = plain.head(plain(idx, valid)), quick.head(quick(idx, valid))
    assert close(b[valid], a[valid]) and a.abs().max() > 1.0
    sup = torch.zeros(3, 41, dtype=torch.bool)
    sup[0, 20:40], sup[1, 10:12], sup[2, 25:29] = True, True, True
    targets = torch.roll(idx, -1, 1)
    with torch.no_grad():
        assert close(quick.loss(idx, targets, sup, valid), plain.loss(idx, targets, sup, valid))


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj")])
def test_lora_gradients_equal(tiny, targets):
    """Training: the loss and every LoRA gradient (CausalAttention's backward) against the plain
    path (SDPA's)."""
    models = both_paths(tiny[0])
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 300, (2, 70), generator=g)
    valid = torch.ones(2, 70, dtype=torch.bool)
    valid[1, 55:] = False
    sup = torch.zeros(2, 70, dtype=torch.bool)
    sup[0, 40:69], sup[1, 30:54] = True, True
    grads = []
    for m in models:
        train_lora(m, targets)
        loss = m.loss(idx, torch.roll(idx, -1, 1), sup, valid)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (la, ga), (lb, gb) = grads
    assert close(lb, la)
    assert ga.keys() == gb.keys() and len(ga) == 2 * len(targets) * 2
    for name in ga:
        assert ga[name].abs().max() > 0, name
        assert close(gb[name], ga[name], rel=1e-4), name


def test_own_layout_gradients_equal(tiny):
    """A packed layout (forward's pos and mask: blocks at positions of their own, readers at the
    end) through CausalAttention's masked blocks, 150 tokens (several query blocks of 64): the
    loss at the readers and every LoRA gradient against the plain path (SDPA)."""
    owner = torch.cat([torch.full((n,), k) for k, n in enumerate((40, 33, 50, 27))])   # 150 tokens
    T = len(owner)
    mask = (owner[:, None] == owner[None, :]) & (torch.arange(T)[None, :] <= torch.arange(T)[:, None])
    mask[T - 27:, :73] = True                       # the last block also reads the first two
    pos = torch.cat([torch.arange(n) for n in (40, 33, 50, 27)])
    idx = torch.randint(0, 300, (2, T), generator=torch.Generator().manual_seed(5))
    at = torch.tensor([[T - 1, 39], [T - 2, 100]])
    grads = []
    for m in both_paths(tiny[0]):
        train_lora(m, ("q_proj", "v_proj"))
        h = m(idx, pos=pos.expand(2, -1), mask=mask.expand(2, 1, -1, -1), at=at)
        loss = m.head(h).logsumexp(-1).mean()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (la, ga), (lb, gb) = grads
    assert close(lb, la)
    for name in ga:
        assert ga[name].abs().max() > 0, name
        assert close(gb[name], ga[name], rel=1e-4), name


def test_full_fine_tuning_gradients_equal(tiny):
    """Full fine-tuning (every weight requires grad): every weight's gradient, the embeddings'
    and, untied, the head's included, equals the plain path's."""
    models = both_paths(tiny[0])
    idx = torch.randint(0, 300, (2, 70), generator=torch.Generator().manual_seed(6))
    sup = torch.zeros(2, 70, dtype=torch.bool)
    sup[0, 40:69], sup[1, 3:30] = True, True
    grads = []
    for m in models:
        m.requires_grad_(True).train()
        m.loss(idx, torch.roll(idx, -1, 1), sup).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    ga, gb = grads
    assert ga.keys() == gb.keys() and "model.embed_tokens.weight" in ga
    for name in ga:
        assert gb[name] is not None and ga[name].abs().max() > 0, name
        assert close(gb[name], ga[name], rel=1e-4), name


def test_prefill_batch_caches_and_greedy_tokens_equal(tiny):
    plain, quick = both_paths(tiny[0])
    prompts = [[5, 9, 200, 17, 3, 44, 8], [7, 7, 150], list(range(20, 45))]
    (ca, la), (cb, lb) = generate.prefill_batch(plain, prompts, 4), generate.prefill_batch(quick, prompts, 4)
    assert close(lb, la) and torch.equal(ca.valid, cb.valid) and torch.equal(ca.next_pos, cb.next_pos)
    for ka, kb in zip(ca.k + ca.v, cb.k + cb.v):
        assert close(kb, ka)
    assert generate.generate(quick, prompts, 12, eos_ids=[]) == generate.generate(plain, prompts, 12, eos_ids=[])


@pytest.mark.parametrize("trick", fast.TRICKS)
def test_each_trick_can_be_left_out(tiny_untied, trick):
    """bench.py's --without: the fast model less one trick is still the same model (logits and
    the LoRA gradients of a short training loss), and the trick is really off."""
    path = tiny_untied[0]
    plain, quick = llama.load(path), fast.load(path, without=[trick])
    assert {"attention": type(quick.model.layers[0].self_attn) is llama.Attention,
            "gemv": type(quick.model.layers[0].self_attn.q_proj) is torch.nn.Linear and "head" not in vars(quick)}[trick]
    idx = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(5))
    grads = []
    for m in (plain, quick):
        train_lora(m, ("q_proj", "v_proj"))
        sup = torch.zeros_like(idx, dtype=torch.bool)
        sup[:, 10:] = True
        m.loss(idx, torch.roll(idx, -1, 1), sup).backward()
        grads.append([p.grad for p in lora.lora_parameters(m)])
    assert all(close(b, a, rel=1e-4) for a, b in zip(*grads))
    with pytest.raises(ValueError, match="unknown fast.py tricks"):
        fast.load(path, without=["nonsense"])


def test_fast_load_is_plain_off_the_fp32_cpu_path(tiny):
    m = fast.load(tiny[0], dtype=torch.bfloat16)
    assert type(m.model.layers[0].self_attn) is llama.Attention


def test_real_model_paths_agree(default_dir):
    """The default model: next-token logits of a 60-token prompt and 16 greedy tokens."""
    plain, quick = both_paths(default_dir)
    tok = load_tokenizer(default_dir, plain.args)
    ids = tok.encode("A user liked \"Toy Story (1995)\" and \"Heat (1995)\". " * 4 + "Next they watched")
    with torch.no_grad():
        a, b = plain.head(plain(torch.tensor([ids]))[0, -1]), quick.head(quick(torch.tensor([ids]))[0, -1])
    assert (a - b).abs().max() < 1e-3 and a.abs().max() > 5
    assert generate.generate(quick, [ids], 16, eos_ids=[]) == generate.generate(plain, [ids], 16, eos_ids=[])


# ----------------------------------------------------------------------------- kernels

@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("shape", [(1, 1, 48), (2, 5, 48), (64, 48), (65, 48)])
def test_split_linear_matches_float64(shape, threads):
    """split_linear against F.linear in float64, value and gradients (x and w), on the split path
    (at most SPLIT_MAX_ROWS rows, out_features divisible by the thread count) and off it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(1)
        x, w, dy = torch.randn(*shape, generator=g), torch.randn(36, 48, generator=g), torch.randn(*shape[:-1], 36, generator=g)
        x.requires_grad_(True), w.requires_grad_(True)
        y = fast.split_linear(x, w)
        y.backward(dy)
        x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
        y64 = torch.nn.functional.linear(x64, w64)
        y64.backward(dy.double())
        assert y.shape == y64.shape
        for a, b in ((y, y64), (x.grad, x64.grad), (w.grad, w64.grad)):
            assert close(a.double(), b, rel=1e-6)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("B, nh, nkv, T, hd, pads, dtype, tol", [
    (1, 9, 3, 512, 64, None, torch.float32, 2e-5),          # the default model's shapes, plain causal
    (3, 4, 2, 150, 16, "left", torch.float32, 2e-5),        # GQA, a ragged last block, left padding
    (2, 4, 4, 70, 8, "right", torch.float32, 2e-5),         # no GQA, right padding
    (2, 6, 2, 130, 32, "left", torch.bfloat16, 3e-2),
    (2, 4, 2, 300, 16, "blocks", torch.float32, 2e-5),      # a packed layout: query blocks skip keys before them
])
@pytest.mark.parametrize("keep_p", [True, False])
def test_causal_attention_matches_sdpa(B, nh, nkv, T, hd, pads, dtype, tol, keep_p, monkeypatch):
    """CausalAttention's hand-written forward and backward against autograd through torch's own
    SDPA (math kernel, float64), for the masks attention_mask makes; with P kept from the forward
    and with P recomputed in the backward."""
    monkeypatch.setattr(fast, "ATTN_KEEP_P_BYTES", 1 << 40 if keep_p else 0)
    g = torch.Generator().manual_seed(T)
    q = torch.randn(B, T, nh, hd, generator=g).transpose(1, 2)   # strided, as Attention makes it
    k, v = torch.randn(B, nkv, T, hd, generator=g), torch.randn(B, nkv, T, hd, generator=g) * 2
    dy = torch.randn(B, nh, T, hd, generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    for b in range(B):
        if pads == "left":
            valid[b, :5 * b] = False
        elif pads == "right":
            valid[b, T - 7 * b:] = False
    mask = llama.attention_mask(valid, None)
    if pads == "blocks":            # blocks of 70 see themselves; the last 20 rows read everything
        owner = torch.arange(T) // 70
        mask = ((owner[:, None] == owner[None, :]) & (torch.arange(T)[None, :] <= torch.arange(T)[:, None]))
        mask[-20:] = torch.ones(20, T, dtype=torch.bool).tril(T - 20)
        mask = mask.expand(B, 1, T, T)
    assert (mask is None) == (pads is None)
    ours = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    y_ours = fast.CausalAttention.apply(*ours, mask)
    grads = torch.autograd.grad(y_ours, ours, dy.to(dtype))
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        y = torch.nn.functional.scaled_dot_product_attention(*ref, attn_mask=mask, is_causal=mask is None,
                                                             enable_gqa=nkv != nh)
    assert y_ours.dtype == dtype and y_ours.shape == y.shape
    assert ((y_ours.double() - y).abs().max() / y.abs().max()).item() < tol / 2
    expected = torch.autograd.grad(y, ref, dy.double())
    for name, a, e in zip("qkv", grads, expected):
        assert a.dtype == dtype and a.shape == e.shape
        err = ((a.double() - e).abs().max() / e.abs().max()).item()
        assert err < tol, (name, err)
    assert expected[1].abs().max() > 0.1      # the keys do get a gradient (not a comparison of zeros)
    # keys that need no gradient (layer 0 under LoRA) are skipped; q and v are unchanged
    q2, v2 = ours[0].detach().requires_grad_(), ours[2].detach().requires_grad_()
    dq2, dv2 = torch.autograd.grad(fast.CausalAttention.apply(q2, ours[1].detach(), v2, mask), (q2, v2), dy.to(dtype))
    assert torch.equal(dq2, grads[0]) and torch.equal(dv2, grads[2])
