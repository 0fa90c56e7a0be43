"""convert_gguf.py against the `gguf` package (dequantization, file writing) and transformers'
own GGUF loader (permutation, config, tokenizer); hostile and truncated files."""
import os
import struct

import numpy as np
import pytest
import torch

import convert_gguf
import generate
from conftest import TINY, make_tiny_dir

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def random_blocks(qtype, n_blocks, rng):
    """Valid raw bytes for n_blocks of a quantized type (scales are finite f16 numbers)."""
    block_bytes = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    n_scales = 2 if qtype == Q.Q4_1 else 1
    scales = rng.normal(0, 0.05, size=(n_blocks, n_scales)).astype("<f2")
    raw[:, :2 * n_scales] = scales.view(np.uint8).reshape(n_blocks, 2 * n_scales)
    return raw.reshape(-1)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_quantized_dequantize_matches_gguf_package(qtype):
    raw = random_blocks(qtype, 64, np.random.default_rng(int(qtype)))
    ours = convert_gguf.dequantize(raw, qtype.name)
    ref = gguf.quants.dequantize(raw, qtype).reshape(-1)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (64 * 32,)
    np.testing.assert_array_equal(ours, ref.astype(np.float32))


@pytest.mark.parametrize("qtype,np_dtype", [(Q.F32, "<f4"), (Q.F16, "<f2")])
def test_float_dequantize_matches_gguf_package(qtype, np_dtype):
    x = np.random.default_rng(0).normal(size=257).astype(np_dtype)
    raw = x.view(np.uint8)
    np.testing.assert_array_equal(convert_gguf.dequantize(raw, qtype.name), gguf.quants.dequantize(raw, qtype).reshape(-1))


def test_bf16_dequantize_matches_gguf_package():
    x = np.random.default_rng(1).normal(size=100).astype(np.float32)
    raw = gguf.quants.quantize(x, Q.BF16).view(np.uint8).reshape(-1)
    np.testing.assert_array_equal(convert_gguf.dequantize(raw, "BF16"), gguf.quants.dequantize(raw, Q.BF16).reshape(-1))
    assert np.abs(convert_gguf.dequantize(raw, "BF16") - x).max() < 0.01


# ----------------------------------------------------------------------------- a tiny GGUF

def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, as published (the forward direction)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_tiny_gguf(path, hf, vocab_tokens, types=None):
    """Write a transformers Llama as a llama.cpp-style GGUF with the gguf package's writer.
    types maps a GGUF tensor name to a quantization type (default F32)."""
    cfg = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(vocab_tokens)
    w.add_token_types([3 if t.startswith("<s") else 1 for t in vocab_tokens])
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    types = types or {}
    for name, t in hf.state_dict().items():
        t = t.float().numpy()
        if name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            gname = "output.weight"
        elif name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{GGUF_NAMES[rest.rsplit('.', 1)[0]]}.weight"
        if gname.endswith("attn_q.weight"):
            t = llamacpp_permute(t, cfg.num_attention_heads)
        if gname.endswith("attn_k.weight"):
            t = llamacpp_permute(t, cfg.num_key_value_heads)
        qt = types.get(gname.split(".", 2)[-1] if gname.startswith("blk") else gname, Q.F32)
        if qt == Q.F32:
            w.add_tensor(gname, np.ascontiguousarray(t))
        else:
            w.add_tensor(gname, gguf.quants.quantize(t, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def tiny_gguf(request, tmp_path):
    import json
    hf = make_tiny_dir(tmp_path / "hf", tie=request.param)
    vocab = json.load(open(tmp_path / "hf" / "tokenizer.json"))["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    types = {"token_embd.weight": Q.Q8_0, "attn_q.weight": Q.Q4_0, "attn_k.weight": Q.Q4_1,
             "ffn_up.weight": Q.F16, "ffn_down.weight": Q.BF16}
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, hf, tokens, types)
    return path, hf


def test_tiny_gguf_converts_like_transformers_loads_it(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM
    path, hf = tiny_gguf
    out = convert_gguf.convert(str(path), str(tmp_path / "conv"))
    m, tok = generate.load_model(out, plain=True)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    idx = torch.randint(0, TINY["vocab_size"], (2, 23))
    with torch.no_grad():
        ours, theirs, orig = m.head(m(idx)), ref(idx).logits, hf(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    # quantization moved the weights a little, but the model is still the same model
    assert torch.corrcoef(torch.stack([ours.flatten(), orig.flatten()]))[0, 1] > 0.95
    assert m.args.tie_embeddings == hf.config.tie_word_embeddings
    assert m.args.n_kv_heads == 2 and m.args.rope_theta == TINY["rope_theta"]
    assert tok.decode(tok.encode("héllo 123")) == "héllo 123"


# ----------------------------------------------------------------------------- hostile files

@pytest.fixture
def tiny_bytes(tmp_path):
    import json
    hf = make_tiny_dir(tmp_path / "hf", tie=True)
    vocab = json.load(open(tmp_path / "hf" / "tokenizer.json"))["model"]["vocab"]
    path = tmp_path / "t.gguf"
    write_tiny_gguf(path, hf, sorted(vocab, key=vocab.get))
    return path.read_bytes()


def _parse(tmp_path, data: bytes):
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    g = convert_gguf.GGUFFile(str(p))
    for name in g.tensors:
        g.tensor(name)
    return g


def test_every_truncation_is_a_clear_error(tiny_bytes, tmp_path):
    cuts = list(range(0, 200)) + list(range(200, len(tiny_bytes) - 1, max(1, len(tiny_bytes) // 300))) + [len(tiny_bytes) - 1]
    for n in cuts:
        with pytest.raises(convert_gguf.GGUFError):
            _parse(tmp_path, tiny_bytes[:n])
    assert _parse(tmp_path, tiny_bytes).tensors  # the whole file parses


@pytest.mark.parametrize("offset,fmt,value,match", [
    (0, "<4s", b"GGML", "bad magic"),
    (4, "<I", 1, "version 1"),
    (4, "<I", 7, "version 7"),
    (8, "<Q", 2**62, "more than the file"),           # tensor count
    (16, "<Q", 2**60, "more than the file"),          # metadata count
    (24, "<Q", 2**63, "truncated"),                   # length of the first key string
])
def test_hostile_header_fields(tiny_bytes, tmp_path, offset, fmt, value, match):
    data = bytearray(tiny_bytes)
    struct.pack_into(fmt, data, offset, value)
    with pytest.raises(convert_gguf.GGUFError, match=match):
        _parse(tmp_path, bytes(data))


def _first_tensor_info_offset(data: bytes) -> int:
    return data.index(b"token_embd.weight") - 8            # u64 name length precedes the name


def test_hostile_tensor_infos(tiny_bytes, tmp_path):
    start = _first_tensor_info_offset(tiny_bytes)
    name_len = struct.unpack_from("<Q", tiny_bytes, start)[0]
    p_ndims = start + 8 + name_len
    n_dims = struct.unpack_from("<I", tiny_bytes, p_ndims)[0]
    p_type = p_ndims + 4 + 8 * n_dims
    cases = [(p_ndims, "<I", 9, "9 dimensions"), (p_ndims + 4, "<Q", 2**40, "impossible dimensions|outside the file"),
             (p_type, "<I", 12, "type Q4_K, which is not supported"), (p_type, "<I", 999, "type 999"),
             (p_type + 4, "<Q", 2**50, "outside the file"), (p_type + 4, "<Q", 3, "misaligned")]
    for pos, fmt, value, match in cases:
        data = bytearray(tiny_bytes)
        struct.pack_into(fmt, data, pos, value)
        with pytest.raises(convert_gguf.GGUFError, match=match):
            _parse(tmp_path, bytes(data))


def test_unsupported_architecture_and_tokenizer(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "qwen2")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(convert_gguf.GGUFError, match="architecture 'qwen2'"):
        convert_gguf.convert(str(tmp_path / "x.gguf"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")            # nothing half-written


def test_unpermute_inverts_llamacpp_permute():
    w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(8 * 6, 3)
    for heads in (1, 3, 6):
        np.testing.assert_array_equal(convert_gguf.unpermute(llamacpp_permute(w, heads), heads), w)


def test_convert_never_deletes_what_it_did_not_write(tiny_bytes, tmp_path, monkeypatch, capsys):
    gguf_path = tmp_path / "t.gguf"
    gguf_path.write_bytes(tiny_bytes)
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "notes.txt").write_text("mine")
    (victim / "sub" / "x").write_text("mine too")
    with pytest.raises(FileExistsError, match="did not write"):
        convert_gguf.convert(str(gguf_path), str(victim))
    assert (victim / "notes.txt").read_text() == "mine" and (victim / "sub" / "x").exists()
    project = tmp_path / "project"                               # `convert_gguf.py t.gguf .` in a repository
    (project / ".git").mkdir(parents=True)
    (project / "main.py").write_text("print()")
    monkeypatch.chdir(project)
    with pytest.raises(SystemExit, match="error: .*did not write"):
        convert_gguf.main([str(gguf_path), "."])
    assert (project / ".git").is_dir() and (project / "main.py").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".convert-")] == []
    empty = tmp_path / "empty"
    empty.mkdir()
    convert_gguf.convert(str(gguf_path), str(empty))                         # an empty directory is filled
    first = (empty / "model.safetensors").stat().st_mtime_ns
    convert_gguf.convert(str(gguf_path), str(empty))                         # an earlier output is replaced
    assert sorted(os.listdir(empty)) == sorted(convert_gguf.OUTPUT_FILES) and (empty / "model.safetensors").stat().st_mtime_ns >= first
    (empty / "extra.txt").write_text("a user's file in the output")
    with pytest.raises(FileExistsError):
        convert_gguf.convert(str(gguf_path), str(empty))
    assert (empty / "extra.txt").exists()


def test_hostile_metadata_and_overlapping_tensors(tiny_bytes, tmp_path):
    """G8-G11: zero or uneven head counts, a tensor name that is not blk.<n>.*, a BOS id past
    the vocabulary; G17: two tensors at the same data offset."""
    g = _parse(tmp_path, tiny_bytes)
    good = dict(g.metadata)
    for change, match in [({"llama.attention.head_count": 0}, "head_count must be a positive integer"),
                          ({"llama.attention.head_count_kv": 0}, "head_count_kv must be a positive integer"),
                          ({"llama.attention.head_count_kv": 3}, "do not divide evenly"),
                          ({"llama.block_count": 1.5}, "block_count must be a positive integer"),
                          ({"tokenizer.ggml.bos_token_id": 10 ** 6}, "bos_token_id = 1000000 is not a token")]:
        g.metadata = {**good, **change}
        with pytest.raises(convert_gguf.GGUFError, match=match):
            convert_gguf.hf_config(g)
    with pytest.raises(convert_gguf.GGUFError, match="blk.x.attn_norm.weight has no place"):
        convert_gguf.hf_name("blk.x.attn_norm.weight")
    names = sorted(g.tensors, key=lambda n: g.tensors[n]["start"])
    data = bytearray(tiny_bytes)
    p = data.index(names[1].encode()) + len(names[1])            # second tensor's info: n_dims, dims, type, offset
    n_dims = struct.unpack_from("<I", data, p)[0]
    struct.pack_into("<Q", data, p + 4 + 8 * n_dims + 4, 0)       # the first tensor's offset
    with pytest.raises(convert_gguf.GGUFError, match="overlap in the file"):
        _parse(tmp_path, bytes(data))
