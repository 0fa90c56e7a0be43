"""lora.py: the four LoRA invariants, merge, what an optimizer step touches, and interop with
peft on top of transformers (the independent reference) in both directions."""
import json

import pytest
import torch

import lora
import generate
import model as llama


def logits(m, idx):
    with torch.no_grad():
        return m.head(m(idx))


def randomize_B(m, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in lora.lora_modules(m).values():
            mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * std)


IDX = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(0))


def test_zero_B_and_disabled_give_base_outputs(tiny_untied):
    path, _ = tiny_untied
    m = llama.load(path)
    base = logits(m, IDX)
    lora.inject(m, ("q_proj", "v_proj", "down_proj"), r=4, alpha=8, dropout=0.0)
    fresh = logits(m, IDX)
    lora.set_enabled(m, False)
    disabled = logits(m, IDX)
    assert torch.equal(fresh, disabled)                       # B = 0: exactly the base computation
    assert torch.allclose(fresh, base, atol=1e-5, rtol=0)     # LoRA's addmm rounds in its own order
    lora.set_enabled(m, True)
    randomize_B(m)
    changed = logits(m, IDX)
    assert (changed - base).abs().max() > 1e-3
    lora.set_enabled(m, False)
    assert torch.equal(logits(m, IDX), disabled)


def test_lora_formula_by_hand(tiny_untied):
    path, _ = tiny_untied
    m = llama.load(path)
    lora.inject(m, ("o_proj",), r=3, alpha=6, dropout=0.0)
    randomize_B(m)
    mod = m.model.layers[0].self_attn.o_proj
    x = torch.randn(5, 64)
    W, A, B = mod.base_layer.weight, mod.lora_A.weight, mod.lora_B.weight
    assert A.dtype == W.dtype and A.shape == (3, 64) and B.shape == (64, 3)
    with torch.no_grad():
        assert torch.allclose(mod(x), x @ W.T + x @ A.T @ B.T * 2.0, atol=1e-6)


def test_inject_twice_and_bad_targets_are_errors(tiny_untied):
    path, _ = tiny_untied
    m = llama.load(path)
    with pytest.raises(ValueError, match="among"):
        lora.inject(m, ("qkv",))
    lora.inject(m)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.inject(m)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.1)])
def test_merge_equals_unmerged_and_is_idempotent(tiny_untied, dtype, tol):
    """fp32: 1e-5 absolute. bf16: merged weights are rounded to bf16 once (W + BA), the unmerged
    path rounds W x and (B A x) separately. bf16's spacing at |x| = 4 is 0.03; stated tolerance
    0.1 absolute on logits of magnitude up to ~4 (measured 0.06)."""
    path, _ = tiny_untied
    m = llama.load(path, dtype=dtype)
    lora.inject(m, lora.PROJECTIONS, r=4, alpha=8, dropout=0.0)
    randomize_B(m)
    unmerged = logits(m, IDX)
    w0 = m.model.layers[1].mlp.up_proj.base_layer.weight.clone()
    lora.merge(m)
    merged = logits(m, IDX)
    w1 = m.model.layers[1].mlp.up_proj.base_layer.weight.clone()
    lora.merge(m)                                                # second merge: no-op
    assert torch.equal(m.model.layers[1].mlp.up_proj.base_layer.weight, w1)
    assert not torch.equal(w0, w1)
    assert (merged - unmerged).abs().max().item() < tol
    lora.unmerge(m)
    assert (m.model.layers[1].mlp.up_proj.base_layer.weight.float() - w0.float()).abs().max() < (1e-6 if dtype == torch.float32 else 1e-2)
    assert (logits(m, IDX) - unmerged).abs().max().item() < tol


def test_train_eval_never_change_weights(tiny_untied):
    path, _ = tiny_untied
    m = llama.load(path)
    lora.inject(m, dropout=0.1)
    randomize_B(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.train(); m.eval(); m.train(); m.eval()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_optimizer_step_changes_only_A_and_B(tiny_untied):
    path, _ = tiny_untied
    m = llama.load(path)
    lora.inject(m, ("q_proj", "v_proj"), r=4, alpha=8, dropout=0.0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW(lora.lora_parameters(m), lr=1e-2, weight_decay=0.1)
    sup = torch.ones_like(IDX, dtype=torch.bool)
    sup[:, -1] = False
    for _ in range(2):     # step 1 moves B (A's gradient is 0 while B = 0), step 2 moves A too
        opt.zero_grad()
        m.loss(IDX, torch.roll(IDX, -1, 1), sup).backward()
        opt.step()
    changed = {k for k, v in m.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed)
    assert any(".lora_A." in k for k in changed) and any(".lora_B." in k for k in changed)
    assert all(not p.requires_grad for n, p in m.named_parameters() if "lora_" not in n)


def test_save_load_round_trip(tiny_untied, tmp_path):
    path, _ = tiny_untied
    m = llama.load(path)
    lora.inject(m, ("k_proj", "gate_proj"), r=2, alpha=4, dropout=0.0)
    randomize_B(m, seed=3)
    out = logits(m, IDX)
    lora.save_adapter(m, str(tmp_path / "ad"), base_model="tiny")
    cfg = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 4 and cfg["target_modules"] == ["gate_proj", "k_proj"]
    m2 = llama.load(path)
    lora.load_adapter(m2, str(tmp_path / "ad"))
    assert torch.equal(logits(m2, IDX), out)


def test_bad_adapters_are_refused(tiny_untied, tmp_path):
    path, _ = tiny_untied
    m = llama.load(path)
    lora.inject(m, ("q_proj",), r=4, alpha=8)
    lora.save_adapter(m, str(tmp_path / "ad"))
    m2 = llama.load(path)
    lora.inject(m2, ("q_proj",), r=2, alpha=8)       # wrong rank already in the model
    with pytest.raises(ValueError, match="shape"):
        lora.load_adapter(m2, str(tmp_path / "ad"))
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    cfg = json.load(open(cfg_path))
    for field, value, match in [("use_dora", True, "use_dora"), ("target_modules", ["fc1"], "target_modules"),
                                ("peft_type", "IA3", "peft_type")]:
        bad = dict(cfg, **{field: value})
        json.dump(bad, open(cfg_path, "w"))
        with pytest.raises(ValueError, match=match):
            lora.load_adapter(llama.load(path), str(tmp_path / "ad"))
    json.dump(dict(cfg, target_modules=["v_proj"]), open(cfg_path, "w"))   # tensors name q_proj
    with pytest.raises(ValueError, match="does not fit"):
        lora.load_adapter(llama.load(path), str(tmp_path / "ad"))


# ----------------------------------------------------------------------------- peft interop

def test_peft_adapter_loads_here(tiny, tmp_path):
    peft = pytest.importorskip("peft")
    path, hf = tiny
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    pm = peft.get_peft_model(hf, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(str(tmp_path / "peft_ad"))
    with torch.no_grad():
        ref = pm(IDX).logits
    m = llama.load(path)
    lora.load_adapter(m, str(tmp_path / "peft_ad"))
    assert (logits(m, IDX) - ref).abs().max().item() < 1e-4
    with torch.no_grad(), pm.disable_adapter():
        base = pm(IDX).logits
    assert (ref - base).abs().max().item() > 1e-3             # the adapter does change the outputs


def test_our_adapter_loads_into_peft(tiny_untied, tmp_path):
    peft = pytest.importorskip("peft")
    path, hf = tiny_untied
    m = llama.load(path)
    base_out = logits(m, IDX)
    lora.inject(m, ("q_proj", "v_proj", "o_proj", "down_proj"), r=4, alpha=16, dropout=0.0)
    randomize_B(m, seed=5)
    ours = logits(m, IDX)
    lora.save_adapter(m, str(tmp_path / "ad"), base_model=path)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ad")).eval()
    with torch.no_grad():
        ref = pm(IDX).logits
    assert (ours - ref).abs().max().item() < 1e-4
    assert (ours - base_out).abs().max().item() > 1e-3


def test_training_gradients_match_peft_on_a_padded_batch(tiny_untied, tmp_path):
    """The whole training path (CausalAttention's backward, the last layer on supervised rows
    only, right padding) gives peft + transformers' loss and LoRA gradients."""
    peft = pytest.importorskip("peft")
    path, hf = tiny_untied
    m = llama.load(path)
    lora.inject(m, ("q_proj", "v_proj"), r=4, alpha=8, dropout=0.0)
    randomize_B(m, seed=3, std=0.2)
    lora.save_adapter(m, str(tmp_path / "ad"), base_model=path)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ad"), is_trainable=True).eval()
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (150, 121, 77)]   # > 2 attention blocks
    idx, valid = generate.pad(rows, left=False)
    supervised = torch.zeros_like(valid)
    for b, n in enumerate((150, 121, 77)):
        supervised[b, n - 6:n - 1] = True                  # position t predicts token t + 1
    supervised[0, 40:44] = True
    targets = torch.roll(idx, -1, dims=1)
    labels = torch.full_like(idx, -100)                    # HF shifts: label t+1 is predicted at t
    labels[:, 1:][supervised[:, :-1]] = idx[:, 1:][supervised[:, :-1]]
    ours = m.loss(idx, targets, supervised, valid)
    ours.backward()
    ref = pm(input_ids=idx, attention_mask=valid.long(), labels=labels).loss
    ref.backward()
    assert abs(ours.item() - ref.item()) < 1e-5
    peft_grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    assert len(peft_grads) == 2 * len(lora.lora_modules(m)) == 8
    for name, mod in lora.lora_modules(m).items():
        for ab in ("lora_A", "lora_B"):
            mine = getattr(mod, ab).weight.grad
            theirs = peft_grads[f"base_model.model.{name}.{ab}.default.weight"]
            assert theirs.abs().max() > 1e-4, (name, ab)    # a real gradient, not zeros
            assert (mine - theirs).abs().max() <= 1e-4 * theirs.abs().max(), (name, ab)


def test_injected_adapter_follows_the_model_mode(tiny_untied, tmp_path):
    """An adapter with dropout > 0 loaded into an eval-mode model scores deterministically; the
    same adapter in training mode does apply dropout (so the check can fail)."""
    path, _ = tiny_untied
    m = llama.load(path)
    lora.inject(m, r=4, dropout=0.5)
    randomize_B(m)
    lora.save_adapter(m, str(tmp_path / "ad"))
    served = llama.load(path)
    served.eval()
    lora.load_adapter(served, str(tmp_path / "ad"))
    assert not any(mod.training for mod in lora.lora_modules(served).values())
    torch.manual_seed(1)
    a = logits(served, IDX)
    torch.manual_seed(2)
    assert torch.equal(a, logits(served, IDX))
    served.train()
    torch.manual_seed(1)
    b = logits(served, IDX)
    torch.manual_seed(2)
    assert not torch.equal(b, logits(served, IDX))
