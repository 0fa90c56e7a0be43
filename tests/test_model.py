"""model.py against transformers' LlamaForCausalLM (independent reference) and against its own
invariants: cache vs recomputation, chunked vs one-shot prefill, padded batch vs one by one,
shared prefix vs full sequences."""
import json
import os

import pytest
import torch

import generate
import model as llama
from conftest import make_tiny_dir


def full_logits(m, ids):
    """fp32 logits (T, V) of one unpadded sequence, no cache."""
    with torch.no_grad():
        return m.head(m(torch.tensor([ids])))[0]


def test_matches_transformers(tiny):
    path, hf = tiny
    m = llama.load(path)
    torch.manual_seed(1)
    idx = torch.randint(0, 300, (3, 37))
    with torch.no_grad():
        ours = m.head(m(idx))
        ref = hf(idx).logits.float()
    assert not torch.isnan(ours).any()
    assert (ours - ref).abs().max().item() <= 1e-4
    assert ref.abs().max().item() > 1.0  # the comparison is not between near-zero numbers


def block_layout(T: int = 12):
    """Three blocks of 4 tokens, each at positions 0..3 and attending within itself, and the last
    two tokens also reading the first two blocks: a layout that no single causal sequence has."""
    owner = torch.arange(T) // 4
    mask = (owner[:, None] == owner[None, :]) & (torch.arange(T)[None, :] <= torch.arange(T)[:, None])
    mask[T - 2:, :8] = True
    return torch.arange(T) % 4, mask


def test_own_positions_and_mask_match_transformers_4d_mask(tiny):
    """forward(pos=, mask=) against transformers given the same position_ids and a 4D additive
    mask; the rows of `at` too."""
    path, hf = tiny
    m = llama.load(path)
    torch.manual_seed(3)
    pos, mask = block_layout()
    idx, P, M = torch.randint(0, 300, (2, 12)), pos.expand(2, -1), mask.expand(2, 1, -1, -1)
    additive = torch.zeros(M.shape).masked_fill(~M, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ours = m.head(m(idx, pos=P, mask=M))
        ref = hf(idx, attention_mask=additive, position_ids=P).logits.float()
        at = torch.tensor([[11, 3], [7, 10]])
        rows = m.head(m(idx, pos=P, mask=M, at=at))
        plain = m.head(m(idx))
    assert (ours - ref).abs().max().item() <= 1e-4
    assert (rows - ours.take_along_dim(at[:, :, None], dim=1)).abs().max().item() <= 1e-4
    assert (plain - ours).abs().max().item() > 0.1      # the layout is not the causal one
    with pytest.raises(ValueError, match="pos and mask go together"):
        m(idx, mask=M)
    with pytest.raises(ValueError, match="mask must be"):
        m(idx, pos=P, mask=M[:, :, :5])


def test_loss_matches_transformers_on_supervised_positions(tiny_untied):
    path, hf = tiny_untied
    m = llama.load(path)
    torch.manual_seed(2)
    idx = torch.randint(0, 300, (2, 20))
    supervised = torch.zeros(2, 20, dtype=torch.bool)
    supervised[0, 12:19] = True
    supervised[1, 5:8] = True
    targets = torch.roll(idx, -1, dims=1)       # position t predicts token t+1
    labels = torch.full_like(idx, -100)         # HF shifts labels itself: label t+1 is predicted at t
    labels[:, 1:][supervised[:, :-1]] = idx[:, 1:][supervised[:, :-1]]
    with torch.no_grad():
        ours = m.loss(idx, targets, supervised)
        ref = hf(idx, labels=labels).loss
    assert abs(ours.item() - ref.item()) < 1e-5
    with pytest.raises(ValueError, match="no supervised position"):
        m.loss(idx, targets, torch.zeros_like(supervised))


def test_rows_at_equal_the_full_forward(tiny):
    """forward(at=...) runs the last layer on a few rows only; those rows must equal the full
    forward's, left padding included."""
    path, _ = tiny
    m = llama.load(path)
    torch.manual_seed(9)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (23, 9, 16)]
    idx, valid = generate.pad(prompts, left=True)
    at = torch.tensor([[22, 5, 0], [22, 3, 14], [7, 22, 22]])       # a repeat (row 2) and a pad slot (3 of row 1) too
    with torch.no_grad():
        full = m(idx, valid)
        rows = m(idx, valid, at=at)
    assert rows.shape == (3, 3, m.args.dim)
    assert not bool(valid.take_along_dim(at, dim=1).all())
    # a pad query sees only itself in both paths, so even that row is the same
    assert torch.allclose(rows, full.take_along_dim(at[:, :, None], dim=1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="without cache"):
        m(idx, valid, cache=llama.KVCache(m.args, 3, 30), at=at)
    for bad in (at + 1, at[:2], at[0]):                          # slot 23 of 23, wrong batch, not 2-D
        with pytest.raises(ValueError, match="`at` must be"):
            m(idx, valid, at=bad)


def test_cached_decoding_equals_recomputation_every_step(tiny):
    path, _ = tiny
    m = llama.load(path)
    torch.manual_seed(3)
    ids = torch.randint(0, 300, (12,)).tolist()
    cache = llama.KVCache(m.args, 1, 40)
    with torch.no_grad():
        h = m(torch.tensor([ids]), cache=cache)
        step_logits = m.head(h[0, -1])
        for step in range(20):
            ref = full_logits(m, ids)[-1]
            assert torch.allclose(step_logits, ref, atol=1e-5, rtol=0), f"step {step}"
            nxt = int(step_logits.argmax())
            ids.append(nxt)
            step_logits = m.head(m(torch.tensor([[nxt]]), cache=cache)[0, -1])
        assert not torch.isnan(step_logits).any()


def test_chunked_prefill_equals_one_shot(tiny_untied):
    path, _ = tiny_untied
    m = llama.load(path)
    torch.manual_seed(4)
    ids = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        one = m.head(m(ids, cache=llama.KVCache(m.args, 1, 30)))
        cache = llama.KVCache(m.args, 1, 30)
        parts = [m.head(m(ids[:, a:b], cache=cache)) for a, b in [(0, 7), (7, 8), (8, 21), (21, 30)]]
    assert torch.allclose(torch.cat(parts, dim=1), one, atol=1e-5, rtol=0)
    assert cache.length == 30 and int(cache.next_pos) == 30


def test_left_padded_batch_equals_each_alone(tiny):
    path, _ = tiny
    m = llama.load(path)
    torch.manual_seed(5)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (3, 11, 7, 1)]
    idx, valid = generate.pad(prompts, left=True)
    with torch.no_grad():
        cache = llama.KVCache(m.args, len(prompts), idx.shape[1] + 6)
        h = m(idx, valid, cache=cache)
        logits = m.head(h[:, -1])
        assert not torch.isnan(m.head(h)).any()  # padded rows give numbers too, never NaN
        seqs = [list(p) for p in prompts]
        for step in range(6):   # decode greedily in the batch and check every row against its own run
            for b, s in enumerate(seqs):
                assert torch.allclose(logits[b], full_logits(m, s)[-1], atol=1e-5, rtol=0), (b, step)
            nxt = logits.argmax(-1)
            for b in range(len(seqs)):
                seqs[b].append(int(nxt[b]))
            logits = m.head(m(nxt[:, None], cache=cache)[:, -1])


def test_prefill_batch_equals_one_padded_forward(tiny):
    """prefill_batch prefills each prompt alone and copies it into its row; the cache and logits
    must be what one left-padded forward of the batch writes (the path checked above)."""
    path, _ = tiny
    m = llama.load(path)
    torch.manual_seed(8)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (4, 13, 9, 1)]
    cache, logits = generate.prefill_batch(m, prompts, extra=5)
    idx, valid = generate.pad(prompts, left=True)
    ref = llama.KVCache(m.args, len(prompts), idx.shape[1] + 5)
    with torch.no_grad():
        ref_logits = m.head(m(idx, valid, cache=ref)[:, -1])
    assert cache.length == ref.length and cache.slots == ref.slots
    assert torch.equal(cache.valid, ref.valid) and torch.equal(cache.next_pos, ref.next_pos)
    slots = ref.valid[:, None, :, None].expand_as(ref.k[0])                     # pad slots hold junk in ref
    for i in range(m.args.n_layers):
        assert torch.allclose(cache.k[i][slots], ref.k[i][slots], atol=1e-5, rtol=0)
        assert torch.allclose(cache.v[i][slots], ref.v[i][slots], atol=1e-5, rtol=0)
    assert torch.allclose(logits, ref_logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="at least one token"):
        generate.prefill_batch(m, [[1, 2], []], extra=1)


def test_generate_batch_equals_single_and_transformers(tiny_untied):
    path, hf = tiny_untied
    m = llama.load(path)
    torch.manual_seed(6)
    prompts = [torch.randint(3, 300, (n,)).tolist() for n in (5, 9)]
    batch = generate.generate(m, prompts, max_new_tokens=10, eos_ids=[])
    for p, got in zip(prompts, batch):
        assert got == generate.generate(m, [p], max_new_tokens=10, eos_ids=[])[0]
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                              pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))
        assert got == ref[0, len(p):].tolist()


def test_generate_eos_stop_and_seeded_sampling(tiny_untied):
    path, _ = tiny_untied
    m, tok = generate.load_model(path, plain=True)
    p = [5, 6, 7, 8]
    greedy = generate.generate(m, [p], max_new_tokens=8, eos_ids=[])[0]
    # stopping at an id: the output ends right before its first occurrence
    cut = generate.generate(m, [p], max_new_tokens=8, eos_ids=[greedy[3]])[0]
    assert cut == greedy[:greedy.index(greedy[3])]
    # stop strings: generation ends at the token whose text completes the stop string
    text = tok.decode(greedy)
    stop = text[2:4]
    out = generate.generate(m, [p], max_new_tokens=8, eos_ids=[], stop=[stop], tokenizer=tok)[0]
    assert stop in tok.decode(out) and stop not in tok.decode(out[:-1])
    assert generate.cut_at_stop(tok.decode(out), [stop]) == tok.decode(out)[:tok.decode(out).index(stop)]
    a = generate.generate(m, [p], max_new_tokens=12, temperature=1.0, top_p=0.9, eos_ids=[], seed=7)
    b = generate.generate(m, [p], max_new_tokens=12, temperature=1.0, top_p=0.9, eos_ids=[], seed=7)
    c = generate.generate(m, [p], max_new_tokens=12, temperature=1.0, top_p=0.9, eos_ids=[], seed=8)
    assert a == b and a != c


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    drawn = {int(generate.sample_next(logits, 1.0, 0.7, g)) for _ in range(300)}
    assert drawn == {0, 1}        # 0.5 < 0.7 <= 0.8: the first two tokens form the nucleus
    drawn = {int(generate.sample_next(logits, 1.0, 1.0, g)) for _ in range(2000)}
    assert drawn == {0, 1, 2, 3}


def test_shared_prefix_with_20_continuations_equals_full_sequences(tiny):
    path, _ = tiny
    m = llama.load(path)
    torch.manual_seed(8)
    prefix = torch.randint(0, 300, (25,)).tolist()
    conts = [torch.randint(0, 300, (int(n),)).tolist() for n in torch.randint(1, 9, (20,))]
    cache, first = generate.prefill(m, prefix)
    got = generate.logprobs_after(m, cache, first, conts, batch_size=7)
    for c, g in zip(conts, got):
        lp = torch.log_softmax(full_logits(m, prefix + c), -1)
        ref = sum(lp[len(prefix) - 1 + j, c[j]] for j in range(len(c)))
        assert abs(g.item() - ref.item()) < 1e-4
    # next-token logits after prefix + suffix equal those of the whole sequence
    nxt = generate.next_token_logits(m, conts, prefix=prefix, batch_size=6)
    for c, row in zip(conts, nxt):
        assert torch.allclose(row, full_logits(m, prefix + c)[-1], atol=1e-5, rtol=0)
    sub = generate.next_token_logits(m, conts[:3], prefix=prefix, vocab_ids=[4, 9])
    assert torch.allclose(sub, nxt[:3, [4, 9]], atol=1e-6)


def test_next_token_logits_without_prefix_right_pads(tiny_untied):
    path, _ = tiny_untied
    m = llama.load(path)
    prompts = [[3, 4, 5], [6], [7, 8, 9, 10, 11]]
    got = generate.next_token_logits(m, prompts)
    for p, row in zip(prompts, got):
        assert torch.allclose(row, full_logits(m, p)[-1], atol=1e-5, rtol=0)


def test_bfloat16_loads_and_stays_close(tiny_untied):
    path, hf = tiny_untied
    m = llama.load(path, dtype=torch.bfloat16)
    assert m.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        ours = m.head(m(idx))
        ref = hf(idx).logits
    assert ours.dtype == torch.float32                      # logits always fp32
    assert (ours - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_tokenizer_adds_exactly_one_bos(tiny_untied):
    path, _ = tiny_untied
    m, tok = generate.load_model(path, plain=True)
    assert m.args.bos_id not in tok.encode("ab")              # no tokenizer_config.json: no BOS
    tok.add_bos = True
    assert tok.encode("ab")[0] == m.args.bos_id and tok.encode("ab").count(m.args.bos_id) == 1
    assert tok.encode("<s1>ab").count(1) == 1                # already there: not added again
    assert tok.decode(tok.encode("héllo wörld", bos=False)) == "héllo wörld"


# ----------------------------------------------------------------------------- bad input

def _rewrite(path, fn):
    from safetensors.torch import load_file, save_file
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    fn(sd)
    save_file(sd, f)


def test_missing_tensor_is_named(tiny_untied):
    path, _ = tiny_untied
    _rewrite(path, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="missing tensors: model.layers.1.mlp.up_proj.weight"):
        llama.load(path)


def test_wrong_shape_is_named(tiny_untied):
    path, _ = tiny_untied
    _rewrite(path, lambda sd: sd.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(64, 64)))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight has shape \(64, 64\), expected \(32, 64\)"):
        llama.load(path)


def test_extra_tensor_is_named(tiny_untied):
    path, _ = tiny_untied
    _rewrite(path, lambda sd: sd.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(64)))
    with pytest.raises(ValueError, match="unexpected tensor model.layers.0.self_attn.q_proj.bias"):
        llama.load(path)


@pytest.mark.parametrize("field,value", [("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
                                         ("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu"),
                                         ("model_type", "mistral"), ("head_dim", 32),
                                         ("model_type", None), ("hidden_act", None), ("rms_norm_eps", None),
                                         ("tie_word_embeddings", None)])
def test_unsupported_config_field_is_named(tiny_untied, field, value):
    path, _ = tiny_untied
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg[field] = value
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ValueError, match=field):
        llama.load(path)


@pytest.mark.parametrize("keep", [4, 100, 0.5, -10])
def test_truncated_safetensors(tiny_untied, keep):
    path, _ = tiny_untied
    f = os.path.join(path, "model.safetensors")
    data = open(f, "rb").read()
    n = int(len(data) * keep) if isinstance(keep, float) else (keep if keep > 0 else len(data) + keep)
    open(f, "wb").write(data[:n])
    with pytest.raises(ValueError, match="truncated"):
        llama.load(path)


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_tiny_dir(tmp_path / "a", tie=False)
    hf.save_pretrained(str(tmp_path / "b"), max_shard_size="40KB")
    assert os.path.exists(tmp_path / "b" / "model.safetensors.index.json")
    os.replace(tmp_path / "a" / "tokenizer.json", tmp_path / "b" / "tokenizer.json")
    m = llama.load(str(tmp_path / "b"))
    idx = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert (m.head(m(idx)) - hf(idx).logits).abs().max().item() <= 1e-4


def test_missing_directory_and_cache_overflow(tiny_untied, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        llama.load(str(tmp_path / "nope"))
    path, _ = tiny_untied
    m = llama.load(path)
    cache = llama.KVCache(m.args, 1, 4)
    with pytest.raises(ValueError, match="cache full"):
        m(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        llama.KVCache(m.args, 1, 10_000)


def test_cli_generates(tiny_untied, capsys):
    path, _ = tiny_untied
    generate.main(["--prompt", "hello", "--model", path, "--max-new-tokens", "5"])
    out = capsys.readouterr()
    assert "tok/s" in out.err and len(out.out.strip("\n")) > 0
