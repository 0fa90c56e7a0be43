"""Llama-2 in plain PyTorch: the architecture, a KV cache, masks, the training loss, a strict loader.

Imports nothing from the project: copied alone, it loads and runs a HF Llama directory (config.json,
safetensors). Generation and scoring: generate.py. fast.py, the CPU speed layer, swaps modules
through load's `prepare` hook (its attention overrides Attention.attend).

RMSNorm statistics, RoPE, the logits and the loss are fp32 whatever the weight dtype. Every token
carries a `valid` flag (False = padding); its RoPE position is the number of valid tokens before
it in its row (prefix and cache included); a query sees a key iff the key's slot is not after its
own and the key is valid. A padded query always sees itself, so no softmax row is empty.

References: Touvron et al. 2023, "Llama 2" (arXiv 2307.09288); Su et al. 2021, RoFormer
(arXiv 2104.09864); Zhang & Sennrich 2019, RMSNorm; Shazeer 2020, SwiGLU (arXiv 2002.05202);
Ainslie et al. 2023, GQA (arXiv 2305.13245). HF Llama layout: q/k rotate halves (rotate_half).
"""
import copy
import json
import math
import os
import struct
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- config

@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    hidden_dim: int = 11008
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    bos_id: int | None = 1
    eos_ids: list[int] = field(default_factory=lambda: [2])

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# ----------------------------------------------------------------------------- math

def rope_tables(head_dim: int, n_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (n_positions, head_dim) in fp32, HF 'rotate_half' layout:
    frequency j is used by dims j and j + head_dim/2."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float64), inv_freq)  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)                                  # (T, hd)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, h, hd); cos, sin: (B, T, 1, hd) fp32. Rotates each pair of dims (j, j + hd/2)
    by its angle: x * cos + rotate_half(x) * sin, in fp32, result in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)          # rotate_half(x) = (-x2, x1)


# ----------------------------------------------------------------------------- cache

class KVCache:
    """Preallocated keys/values for every layer: k[i], v[i] (B, n_kv, slots, hd); valid (B, slots):
    which slots hold real tokens; next_pos (B,): RoPE position of each row's next real token; length:
    slots used. Also serves as a read-only shared prefix (Llama.forward's `prefix`)."""

    def __init__(self, args: ModelArgs, batch: int, slots: int, dtype=torch.float32, device="cpu"):
        if slots > args.max_seq_len:
            raise ValueError(f"cache length {slots} exceeds the model's max_seq_len {args.max_seq_len}")
        shape = (batch, args.n_kv_heads, slots, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.valid = torch.zeros(batch, slots, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self.slots = slots

    def row(self, b: int) -> "KVCache":
        """A batch-1 view of row b (no copy), e.g. a prefix after a left-padded batch prefill."""
        view = copy.copy(self)
        view.k, view.v = [k[b:b + 1] for k in self.k], [v[b:b + 1] for v in self.v]
        view.valid, view.next_pos = self.valid[b:b + 1], self.next_pos[b:b + 1]
        return view


# ----------------------------------------------------------------------------- modules

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # x / sqrt(mean(x^2) + eps) * weight, in fp32
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(args.n_heads * self.hd, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, kv_write=None, kv_prefix=None, at=None):
        """x: (B, T, D). mask: (B, 1, T, S) bool or None for plain causal.
        kv_write: (k_cache, v_cache, start) to store this chunk's keys/values at slots
        start..start+T and attend over slots 0..start+T. kv_prefix: (k, v) of a shared
        prefix, (1 or B, n_kv, P, hd), attended before this chunk and never written.
        at: (B, n) slots; only their queries are kept (keys and values from all T slots), and
        the output is (B, n, D); mask is then (B, 1, n, T) from `rows_mask`."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd)
        k, v = self.k_proj(x).view(B, T, self.n_kv, self.hd), self.v_proj(x).view(B, T, self.n_kv, self.hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if at is not None:
            q = q.take_along_dim(at[:, :, None, None], dim=1)                  # (B, n, nh, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T or n, hd)
        if kv_write is not None:
            k_cache, v_cache, start = kv_write
            k_cache[:, :, start:start + T] = k
            v_cache[:, :, start:start + T] = v
            k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]      # (B, nkv, S, hd)
        if kv_prefix is not None:
            pk, pv = kv_prefix
            k = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
        own_slots = kv_write is None and kv_prefix is None and at is None
        y = self.attend(q, k, v, mask, own_slots)                               # (B, nh, T or n, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, q.shape[2], self.n_heads * self.hd))

    def attend(self, q, k, v, mask, own_slots: bool):
        """softmax(q k^T / sqrt(hd) + mask) v. q: (B, nh, T, hd); k, v: (B, nkv, S, hd); mask: (B, 1, T, S)
        bool, or None for plain causal (or one query that sees everything). GQA: query head h reads KV
        head h // (nh / nkv), without copying the cache. own_slots: the keys sit at the queries' own
        slots (no cache, prefix or `at`); SDPA does not need to know, fast.py's training kernel does."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                              enable_gqa=k.shape[1] != q.shape[1])


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))   # SwiGLU


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, kv_write=None, kv_prefix=None, at=None):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_write, kv_prefix, at)
        if at is not None:
            x = x.take_along_dim(at[:, :, None], dim=1)    # (B, n, D): only these slots go on
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = nn.ModuleDict(dict(                                          # HF's `model.*` names
            embed_tokens=nn.Embedding(args.vocab_size, args.dim),
            layers=nn.ModuleList(Block(args) for _ in range(args.n_layers)),
            norm=RMSNorm(args.dim, args.norm_eps)))
        if not args.tie_embeddings:
            self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)                  # (max_seq_len, hd) fp32
        self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpoint = False  # set by the training loop

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.args.tie_embeddings else self.lm_head.weight

    def head(self, h: torch.Tensor, vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits of hidden states h (..., D), optionally only for some vocab rows (fast.py splits it)."""
        w = self.head_weight if vocab_ids is None else self.head_weight[vocab_ids]
        return F.linear(h, w).float()

    def forward(self, idx: torch.Tensor, valid: torch.Tensor | None = None,
                cache: KVCache | None = None, prefix: KVCache | None = None,
                at: torch.Tensor | None = None, pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, D) of idx (B, T); valid (B, T): False on padding.
        cache: this chunk is stored at slots cache.length.. and attends to all stored before it.
        prefix: a read-only cache (batch 1 or B) that every row attends to first.
        at: (B, n) slots; only their states are returned, (B, n, D), and the last layer computes only
        those rows (keys and values still from every slot): a loss or a score needs no more.
        pos (B, T), mask (B, 1, T, T): the caller's own layout (no cache or prefix; `valid` unused):
        RoPE positions and "query t sees key s", within the causal triangle, every token seeing itself."""
        B, T = idx.shape
        check_forward_args(B, T, cache, prefix, at, pos, mask)
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=idx.device)
        start, past_valid, base_pos = 0, None, torch.zeros(B, dtype=torch.long, device=idx.device)
        if cache is not None:
            start, base_pos = cache.length, cache.next_pos
            cache.valid[:, start:start + T] = valid
            past_valid = cache.valid[:, :start]
        elif prefix is not None:
            base_pos = prefix.next_pos.expand(B)
            past_valid = prefix.valid[:, :prefix.length].expand(B, -1)

        if pos is None:  # positions: count of valid tokens before this one in its row (pads reuse a neighbour's)
            pos = (base_pos[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)        # (B, T)
        if int(pos.max()) >= self.args.max_seq_len:
            raise ValueError(f"position {int(pos.max())} exceeds max_seq_len {self.args.max_seq_len}")
        cos, sin = self.rope_cos[pos][:, :, None], self.rope_sin[pos][:, :, None]  # (B, T, 1, hd)
        full = attention_mask(valid, past_valid) if mask is None else mask       # the caller's own, or the rule's

        x = self.model.embed_tokens(idx)
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            kv_write = (cache.k[i], cache.v[i], start) if cache is not None else None
            kv_prefix = None if prefix is None else (prefix.k[i][:, :, :prefix.length], prefix.v[i][:, :, :prefix.length])
            args = (x, cos, sin, full, kv_write, kv_prefix)
            if i == last and at is not None:
                rows = rows_mask(valid, at) if mask is None else mask.take_along_dim(at[:, None, :, None], dim=2)
                args = (x, cos, sin, rows, None, None, at)
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        if cache is not None:
            cache.length += T
            cache.next_pos = cache.next_pos + valid.long().sum(1)
        return self.model.norm(x)

    def loss(self, idx, targets, supervised, valid=None) -> torch.Tensor:
        """Mean cross-entropy of targets[b, t] given idx[b, :t+1] where `supervised` (B, T) is True;
        the last layer and the head run only at those positions."""
        count = supervised.sum(1)                                                        # (B,)
        n = int(count.max())
        if n == 0:
            raise ValueError("Llama.loss: no supervised position in the batch (the mean would be NaN)")
        at = supervised.int().sort(dim=1, descending=True, stable=True).indices[:, :n]   # (B, n) supervised first
        real = torch.arange(n, device=idx.device)[None, :] < count[:, None]              # (B, n) False = filler
        h = self(idx, valid, at=at)
        logits = self.head(h[real])                                                      # (N, V) fp32
        return F.cross_entropy(logits, targets.take_along_dim(at, dim=1)[real])


def check_forward_args(B: int, T: int, cache, prefix, at, pos, mask):
    """Llama.forward's rules on which arguments go together, and their shapes."""
    if cache is not None and prefix is not None:
        raise ValueError("pass either cache or prefix, not both")
    if cache is not None and cache.k[0].shape[0] != B:
        raise ValueError(f"cache batch {cache.k[0].shape[0]} != input batch {B}")
    if cache is not None and cache.length + T > cache.slots:
        raise ValueError(f"cache full: {cache.length} + {T} > {cache.slots} slots")
    if prefix is not None and prefix.k[0].shape[0] not in (1, B):
        raise ValueError(f"prefix batch {prefix.k[0].shape[0]} must be 1 or {B}")
    if at is not None and (cache is not None or prefix is not None):
        raise ValueError("`at` works without cache or prefix only")
    if at is not None and (at.dim() != 2 or at.shape[0] != B or (at.numel() and not 0 <= at.min() <= at.max() < T)):
        raise ValueError(f"`at` must be (B={B}, n) slots in 0..{T - 1}, got shape {tuple(at.shape)}")
    if (pos is None) != (mask is None) or (mask is not None and (cache is not None or prefix is not None)):
        raise ValueError("pos and mask go together, without cache or prefix")
    if mask is not None and (mask.shape != (B, 1, T, T) or pos.shape != (B, T)):
        raise ValueError(f"mask must be (B, 1, T, T) = {(B, 1, T, T)} and pos (B, T), got {tuple(mask.shape)}, "
                         f"{tuple(pos.shape)}")


def attention_mask(valid: torch.Tensor, past_valid: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean (B, 1, T, P+T) mask for T new queries after P earlier slots: rows_mask at slots P..P+T-1.
    None when that is plain causal with nothing before (SDPA's is_causal) or T == 1 with no pads."""
    B, T = valid.shape
    P = 0 if past_valid is None else past_valid.shape[1]
    if bool(valid.all()) and (past_valid is None or bool(past_valid.all())) and (P == 0 or T == 1):
        return None              # plain causal with nothing before, or one query that sees every slot
    keys_valid = valid if past_valid is None else torch.cat([past_valid, valid], dim=1)  # (B, S)
    return rows_mask(keys_valid, torch.arange(P, P + T, device=valid.device).expand(B, T))


def rows_mask(valid: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The one mask rule, (B, 1, n, T) bool: the query at slot at[b, i] sees key slot s iff s <= its
    slot and valid[b, s] (B, T), and it always sees itself (so a padded query's row is never empty)."""
    s = torch.arange(valid.shape[1], device=valid.device)[None, None, :]        # (1, 1, T)
    mask = ((s <= at[:, :, None]) & valid[:, None, :]) | (s == at[:, :, None])  # (B, n, T)
    return mask[:, None]


# ----------------------------------------------------------------------------- loading

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
              "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: str, metadata: dict | None = None):
    """Yields (name, tensor) from a .safetensors file, one tensor in memory at a time (no mmap);
    `metadata`, if given, receives its __metadata__. Format (github.com/huggingface/safetensors):
    u64 little-endian N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}}, data."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else size
        if n > size - 8:
            raise ValueError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: corrupt safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: corrupt safetensors header: not a JSON object")
        if metadata is not None:
            metadata.update(header.get("__metadata__") or {})
        header.pop("__metadata__", None)
        for name, info in header.items():
            ok = isinstance(info, dict) and all(isinstance(info.get(k), list) for k in ("shape", "data_offsets"))
            if not (ok and len(info["data_offsets"]) == 2 and info.get("dtype") in _ST_DTYPES
                    and all(type(x) is int and x >= 0 for x in info["shape"] + info["data_offsets"])):
                raise ValueError(f"{path}: tensor {name}: corrupt header entry (needs a known dtype, a shape and two "
                                 "data_offsets, all non-negative integers)")
        end = 0
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
            dtype, (b, e) = _ST_DTYPES[info["dtype"]], info["data_offsets"]
            nbytes = math.prod(info["shape"]) * dtype.itemsize
            if e - b != nbytes or 8 + n + e > size:
                raise ValueError(f"{path}: tensor {name} lies outside the file or has the wrong length (truncated file?)")
            if b < end:
                raise ValueError(f"{path}: tensor {name} overlaps the tensor before it (data_offsets {b}..{e})")
            end = e
            buf = torch.empty(nbytes, dtype=torch.uint8)
            f.seek(8 + n + b)
            if f.readinto(buf.numpy()) != nbytes:
                raise ValueError(f"{path}: truncated while reading {name}")
            yield name, buf.view(dtype).reshape(info["shape"])


def args_from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs from a HF Llama config.json dict, its defaults filled in. What would change the
    math and is not implemented here is refused by name, and so is a value that is missing, of the
    wrong type or out of range (sizes drive allocation: a bad one must not become a huge request)."""
    if not isinstance(cfg, dict):
        raise ValueError(f"config.json: expected a JSON object, got {type(cfg).__name__}")
    rope = cfg.get("rope_parameters") or {}
    cfg = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, **cfg,
           "rope_theta": rope.get("rope_theta", cfg.get("rope_theta", 10000.0))}
    if cfg.get("num_key_value_heads") is None:
        cfg["num_key_value_heads"] = cfg.get("num_attention_heads")          # no GQA
    sizes = {"hidden_size": 1 << 16, "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024,
             "intermediate_size": 1 << 18, "vocab_size": 1 << 22, "max_position_embeddings": 1 << 20}
    for key, high in sizes.items():
        if cfg.get(key) is None:
            raise ValueError(f"config.json: {key} is missing")
        if type(cfg[key]) is not int or not 1 <= cfg[key] <= high:
            raise ValueError(f"config.json: {key} must be an integer in [1, {high}], got {cfg[key]!r}")
    for key, low in (("rms_norm_eps", 0), ("rope_theta", 1)):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= low:
            raise ValueError(f"config.json: {key} must be a finite number > {low}, got {v!r}")
    if not isinstance(cfg["tie_word_embeddings"], bool):
        raise ValueError(f"config.json: tie_word_embeddings must be true or false, got {cfg['tie_word_embeddings']!r}")
    for key in ("bos_token_id", "eos_token_id"):
        ids = cfg.get(key) if isinstance(cfg.get(key), list) else [cfg.get(key)]
        if not all(i is None or (type(i) is int and 0 <= i < cfg["vocab_size"]) for i in ids):
            raise ValueError(f"config.json: {key} {cfg[key]!r} is not a token id below vocab_size {cfg['vocab_size']}")
    refuse = {"model_type": lambda v: v != "llama", "attention_bias": bool, "mlp_bias": bool,
              "hidden_act": lambda v: v != "silu", "sliding_window": lambda v: v is not None,
              "rope_scaling": lambda v: v is not None and v.get("rope_type", v.get("type")) != "default",
              "rope_parameters": lambda v: v is not None and v.get("rope_type", "default") != "default"}
    for name, bad in refuse.items():
        if name in cfg and bad(cfg[name]):
            raise ValueError(f"config.json: unsupported {name}={cfg[name]!r}")
    dim, n_heads, n_kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    if dim % n_heads or cfg.get("head_dim") not in (None, dim // n_heads) or n_heads % n_kv:
        raise ValueError(f"config.json: unsupported head layout (hidden_size {dim} must be num_attention_heads "
                         f"{n_heads} x head_dim {cfg.get('head_dim')}, a multiple of num_key_value_heads {n_kv})")
    eos = cfg.get("eos_token_id")
    return ModelArgs(dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads, n_kv_heads=n_kv,
                     hidden_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"], norm_eps=cfg["rms_norm_eps"],
                     rope_theta=float(cfg["rope_theta"]), max_seq_len=cfg["max_position_embeddings"],
                     tie_embeddings=cfg["tie_word_embeddings"], bos_id=cfg.get("bos_token_id"),
                     eos_ids=[] if eos is None else [eos] if isinstance(eos, int) else list(eos))


def checkpoint_files(model_dir: str) -> list[str]:
    """The safetensors files of model_dir: model.safetensors, or the shards its index names."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        meta = read_json(index)
        weight_map = meta.get("weight_map") if isinstance(meta, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map")
        shards = sorted(set(weight_map.values()))
        bad = [s for s in shards if not isinstance(s, str) or os.path.basename(s) != s]
        if bad:
            raise ValueError(f"{index}: shard {bad[0]!r} is not a file name inside the model directory")
        return [os.path.join(model_dir, s) for s in shards]
    single = os.path.join(model_dir, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{model_dir}: neither model.safetensors nor model.safetensors.index.json")
    return [single]


def read_config(model_dir: str) -> ModelArgs:
    """ModelArgs from model_dir/config.json (HF layout)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{model_dir}: no config.json (is this a HF Llama checkpoint directory?)")
    return args_from_hf_config(read_json(path))


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load(model_dir: str, dtype=torch.float32, device="cpu", prepare=None) -> Llama:
    """Strictly load a HF Llama directory: every expected tensor present with its exact shape, else an
    error naming it (with the tokenizer: generate.load_model). prepare(model) runs on the model built
    on 'meta', before any weight has storage: it may swap modules (fast.py) at no cost in memory."""
    args = read_config(model_dir)
    with torch.device("meta"):
        model = Llama(args)
    if prepare is not None:
        prepare(model)
    for module in model.modules():                 # storage for every weight, filled below
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(module, name, nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device)))
    params, seen = dict(model.named_parameters()), set()
    for path in checkpoint_files(model_dir):
        for name, t in read_safetensors(path):   # one tensor in memory at a time, copied into place
            if name == "lm_head.weight" and args.tie_embeddings:
                continue  # some tied checkpoints store the head anyway; the embeddings are used
            if name not in params:
                raise ValueError(f"{path}: unexpected tensor {name} (not in a Llama with this config)")
            if t.shape != params[name].shape:
                raise ValueError(f"{path}: tensor {name} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(params[name].shape)}")
            if name in seen:
                raise ValueError(f"{path}: tensor {name} appears twice in the checkpoint")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{path}: tensor {name} holds NaN or infinite values")
            with torch.no_grad():
                params[name].copy_(t)
            seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise ValueError(f"{model_dir}: missing tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)   # built on 'meta' above
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    model.model_dir = model_dir                     # where it came from (a full fine-tune copies its config)
    model.eval().requires_grad_(False)
    return model
