"""The converted default model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI) against
transformers loading the same GGUF file with its own reader and dequantizer."""
import os

import pytest
import torch

import generate
import model as llama

TEXTS = [
    "The capital of France is",
    "Toy Story (1995), GoldenEye (1995), Four Rooms (1995)",
    "Amélie (2001) — café, naïve, crème brûlée; Ångström",
    "東京の映画 and Москва 2024 😀 emoji",
    "   leading spaces and   repeated    spaces ",
    "1234567890 + 3.14159 = 42; -7e10",
    "It's \"Heat\" (1995), isn't it? We'll see... (yes!) #1 @user",
    "Star Wars: Episode IV - A New Hope (1977)\nNext line\tand a tab",
    "<|im_start|>user\nHi<|im_end|>",
]
PROMPTS = ["The capital of France is", "A user liked \"Toy Story (1995)\" and \"Heat (1995)\". Next they watched",
           "def fibonacci(n):"]


@pytest.fixture(scope="session")
def both(default_dir, default_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ours, tok = generate.load_model(default_dir, plain=True)
    d, f = os.path.split(default_gguf)
    ref = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    return ours, tok, ref, ref_tok


def test_tokenizer_matches_transformers(both):
    _, tok, _, ref_tok = both
    for t in TEXTS:      # text is plain text: control-token strings in it are split like any text
        assert tok.encode(t) == ref_tok(t, add_special_tokens=False, split_special_tokens=True).input_ids, t
        assert tok.decode(tok.encode(t)) == t
    assert 1 not in tok.encode("<|im_start|>") and tok.token_id("<|im_start|>") == 1   # control tokens go by id


CHATS = [[{"role": "user", "content": "Would you enjoy \"Heat\" (1995)?"}],
         [{"role": "system", "content": "Predict whether the user will enjoy the movie."},
          {"role": "user", "content": "A user liked \"Toy Story (1995)\".\nAnswer:"}],
         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 東京"},
          {"role": "user", "content": "  spaces\tand tabs  "}]]


def test_chat_template_matches_the_tokenizers_own(default_dir):
    """tokenizer.ChatML renders what transformers' apply_chat_template renders from the
    tokenizer_config.json chat template (Jinja), default system turn included; a control-token
    string inside content stays text in ours."""
    from transformers import AutoTokenizer
    from tokenizer import chat_format, load_tokenizer
    tok = load_tokenizer(default_dir, llama.read_config(default_dir))
    chat = chat_format(default_dir, tok)
    ref = AutoTokenizer.from_pretrained(default_dir)
    assert chat is not None and chat.default_system.startswith("You are a helpful AI assistant named SmolLM")
    for messages in CHATS:
        for gen in (True, False):
            expected = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
            expected = expected["input_ids"] if hasattr(expected, "keys") else expected      # a BatchEncoding in newer releases
            assert chat.ids(messages, add_generation_prompt=gen) == list(expected), (messages, gen)
    system, head, tail = "Predict whether the user will enjoy the movie.\n\n", 'A user liked "Heat".', ' Would they like "Alien"?'
    assert chat.wrap_split(system, head) + chat.wrap_tail(tail) == chat.wrap(system, system + head + tail)
    sneaky = chat.ids([{"role": "user", "content": "x<|im_end|>y"}])
    assert sneaky.count(chat.end) == 2                   # the system turn's and the user turn's, not the text's


def test_next_token_logits_match_transformers(both):
    """Tolerance 1e-3 absolute on logits of magnitude ~20 (measured: ~5e-5)."""
    ours, tok, ref, _ = both
    for t in PROMPTS:
        ids = torch.tensor([tok.encode(t)])
        with torch.no_grad():
            a = ours.head(ours(ids))[0]
            b = ref(ids).logits[0]
        assert (a - b).abs().max().item() < 1e-3, t
        assert b.abs().max().item() > 5


def test_greedy_32_tokens_match_transformers(both):
    ours, tok, ref, _ = both
    for t in PROMPTS:
        ids = tok.encode(t)
        got = generate.generate(ours, [ids], max_new_tokens=32, eos_ids=[])[0]
        with torch.no_grad():
            exp = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=32, do_sample=False, pad_token_id=2,
                               eos_token_id=ours.args.vocab_size + 1)  # an id never produced: no early stop
        assert got == exp[0, len(ids):].tolist(), (t, tok.decode(got))
    assert "Paris" in tok.decode(generate.generate(ours, [tok.encode(PROMPTS[0])], max_new_tokens=8)[0])


def test_lora_training_gradients_match_peft(both, default_dir, tmp_path):
    """The training path on the real model: loss and every LoRA gradient of a right-padded batch
    against peft on transformers' own load of the GGUF (the model is restored afterwards)."""
    peft = pytest.importorskip("peft")
    import lora
    _, tok, ref, _ = both
    ours = llama.load(default_dir)                      # a fresh copy: the shared one stays adapter-free
    lora.inject(ours, ("q_proj", "v_proj"), r=8, alpha=16, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in lora.lora_modules(ours).values():
            mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.01)
    lora.save_adapter(ours, str(tmp_path / "ad"), base_model=default_dir)
    rows = [tok.encode(" ".join(TEXTS) * 2), tok.encode(" ".join(PROMPTS))]
    idx, valid = generate.pad(rows, left=False)
    supervised = torch.zeros_like(valid)
    for b, ids in enumerate(rows):
        supervised[b, len(ids) - 9:len(ids) - 1] = True       # the last 8 tokens are predicted
    labels = torch.full_like(idx, -100)
    labels[:, 1:][supervised[:, :-1]] = idx[:, 1:][supervised[:, :-1]]
    ours.train()
    loss = ours.loss(idx, torch.roll(idx, -1, 1), supervised, valid)
    loss.backward()
    pm = peft.PeftModel.from_pretrained(ref, str(tmp_path / "ad"), is_trainable=True)
    try:
        ref_loss = pm(input_ids=idx, attention_mask=valid.long(), labels=labels).loss
        ref_loss.backward()
        theirs = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    finally:
        pm.unload()                                             # `ref` is shared with the tests above
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    worst = 0.0
    for name, mod in lora.lora_modules(ours).items():
        for ab in ("lora_A", "lora_B"):
            t = theirs[f"base_model.model.{name}.{ab}.default.weight"]
            worst = max(worst, ((getattr(mod, ab).weight.grad - t).abs().max() / t.abs().max()).item())
    assert worst < 2e-4, worst                                  # measured: 1.6e-5
