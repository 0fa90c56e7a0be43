"""The CPU speed layer: model.py's Llama, made faster for float32 training on a CPU, with the same math.

    m = fast.load(model_dir)       # model.load(..., prepare=fast.prepare)
    m = model.load(model_dir)      # the plain model (every command's --plain)

Nothing here changes what the model computes; tests/test_fast.py checks that the two paths give
equal logits, losses, LoRA and full-model gradients, caches and greedy tokens. `prepare` runs on
the model built on 'meta' (model.load's hook), before any weight has storage. The two tricks, by
the names `load(without=...)` and `bench.py --without` use (what each buys: docs/BENCHMARKS.md):

  attention      CausalAttention: attention forward and backward by hand in blocks of query
                 rows, for training on CPU. Torch's CPU flash kernels run at about a third of
                 GEMM speed, and a block skips the key blocks it cannot see (packed layouts).
                 bench.py --only lora: a LoRA step on 512 tokens 4 to 10% faster.
  gemv           SplitLinear and split_head: a product of at most 64 rows (decoding, the loss's
                 few positions) as one bmm over the threads' slices of the weight. MKL runs it on
                 one thread, which streams the weights at about half the speed of two on the
                 project's 2-core EPYC: decoding 1.5 times faster; prefill and the LoRA step,
                 whose products have hundreds of rows, unchanged.

Taken out when bench.py found them buying nothing above the noise (docs/BENCHMARKS.md):
column-major weights and fused q/k/v and gate/up GEMMs (the gemv split gives decoding what they
gave, without a second layout), and glibc malloc tuning (0.5% of a LoRA step, half again the
peak memory of loading). In bfloat16, or on another device, fast.load is model.load.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import model as llama
from model import Attention


TRICKS = ("attention", "gemv")


def load(model_dir: str, dtype=torch.float32, device="cpu", without=()):
    """model.load with the CPU fast path when the model is float32 on the CPU (else plain).
    without: names from TRICKS to leave out (bench.py measures each trick this way)."""
    if dtype != torch.float32 or torch.device(device).type != "cpu":
        return llama.load(model_dir, dtype=dtype, device=device)
    unknown = set(without) - set(TRICKS)
    if unknown:
        raise ValueError(f"unknown fast.py tricks {sorted(unknown)}; known: {', '.join(TRICKS)}")
    return llama.load(model_dir, dtype=dtype, device=device, prepare=lambda m: prepare(m, without))


def prepare(model: llama.Llama, without=()):
    """model.load's hook, on the model built on 'meta': every block's attention becomes
    FastAttention, every projection a SplitLinear, and the output head splits its product too.
    Same weights, same names; the swapped modules are built on 'meta' too, so load allocates
    them as it does the rest."""
    with torch.device("meta"):
        for block in model.model.layers:
            if "attention" not in without:
                block.self_attn = FastAttention(model.args)
            if "gemv" not in without:
                for parent in (block.self_attn, block.mlp):
                    for name, child in list(parent.named_children()):
                        if type(child) is nn.Linear:
                            setattr(parent, name, SplitLinear(child.in_features, child.out_features, bias=False))
    if "gemv" not in without:
        model.head = functools.partial(split_head, model)      # shadows Llama.head on this model only


# ----------------------------------------------------------------------------- few-row products

SPLIT_MAX_ROWS = 64    # inputs of at most this many rows (decoding, the loss's few positions) are split


def split_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) = x @ w^T for an x of few rows, as one bmm over the thread count's slices of
    w's output rows: torch runs each batch entry of a bmm on its own thread, so every thread
    streams its own part of the weights. MKL keeps a product of one to a few rows on one thread,
    which on a 2-core EPYC streams the weights at about half the speed of two (docs/BENCHMARKS.md).
    The same products; their sums may run in another order (fp32 rounding)."""
    n = torch.get_num_threads()
    rows = x.numel() // x.shape[-1]
    if rows > SPLIT_MAX_ROWS or n == 1 or w.shape[0] % n or x.device.type != "cpu" or w.dtype != torch.float32:
        return F.linear(x, w)
    out_f, in_f = w.shape
    slices = w.view(n, out_f // n, in_f).transpose(1, 2)                        # (n, in, out/n) views of w
    y = torch.bmm(x.reshape(1, rows, in_f).expand(n, -1, -1), slices)           # (n, rows, out/n)
    return y.transpose(0, 1).reshape(*x.shape[:-1], out_f)


class SplitLinear(nn.Linear):
    """nn.Linear (no bias) whose few-row products go through split_linear."""

    def forward(self, x):
        return split_linear(x, self.weight)


def split_head(model: llama.Llama, h: torch.Tensor, vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Llama.head through split_linear: logits in fp32, optionally only for some vocab rows."""
    w = model.head_weight if vocab_ids is None else model.head_weight[vocab_ids]
    return split_linear(h, w).float()


class FastAttention(Attention):
    """Attention that trains with CausalAttention on CPU; everything else as model.Attention."""

    def attend(self, q, k, v, mask, own_slots: bool):
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if own_slots and needs_grad and q.device.type == "cpu" and q.shape[2] > 1:
            return CausalAttention.apply(q, k, v, mask)
        return super().attend(q, k, v, mask, own_slots)


# ----------------------------------------------------------------------------- training attention

ATTN_BLOCK = 64                # query rows per block of the training attention (32 to 128 time alike)
ATTN_KEEP_P_BYTES = 64 << 20   # keep the forward's softmax P for the backward while it needs at most this
                               # much per layer (9 heads x 512 tokens: 5.3 MB), else recompute it; P grows
                               # as T^2, the rest of a layer's activations as T


class CausalAttention(torch.autograd.Function):
    """y = softmax(q k^T / sqrt(hd) + mask) v, forward and backward by hand, for training on CPU.

    q: (B, nh, T, hd); k, v: (B, nkv, T, hd); mask: (B, 1, T, T) bool or None for plain causal.
    The mask must be causal (or stricter) with every diagonal allowed, as `attention_mask` makes.
    Torch's CPU flash attention runs at about a third of GEMM speed, its backward too. Here the
    queries go in blocks of ATTN_BLOCK rows; a block sees keys 0..e-1 only, so the key blocks it
    cannot see (about half the products) are skipped, and the time goes to batched GEMMs.
    With S = q k^T * scale, P = softmax(S), y = P v:
        dv = P^T dy,  dP = dy v^T,  dS = P * (dP - rowsum(dy * y)),  dq = dS k * scale,  dk = dS^T q * scale.
    P is kept from the forward while small (ATTN_KEEP_P_BYTES), as eager attention does; past
    that it is recomputed block by block, as flash attention does. Rows are laid out as
    (kv head, t, group) so that a GQA query block is one contiguous slab that reads its kv head
    once. Computed in fp32 whatever the input dtype (precision policy)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)   # fp32 under a bf16 autocast too
    def forward(ctx, q, k, v, mask):
        B, nh, T, hd = q.shape
        nkv = k.shape[1]
        G = nh // nkv
        Q = _to_rows(q, nkv, scale=1.0 / math.sqrt(hd))                    # scaled once, here
        K, V = k.float().reshape(B * nkv, T, hd), v.float().reshape(B * nkv, T, hd)
        Y = torch.empty_like(Q)
        keep = B * nh * T * (T + ATTN_BLOCK) * 2 <= ATTN_KEEP_P_BYTES       # fp32 bytes of the P blocks
        kept, ctx.first_keys = [], []
        for s, e, lo, P in _attention_blocks(Q, K, mask, G):
            torch.bmm(P, V[:, lo:e], out=Y[:, s * G:e * G])
            if keep:
                kept.append(P)
                ctx.first_keys.append(lo)
        ctx.save_for_backward(Q, K, V, Y, mask, *kept)     # saved, not kept on ctx: checkpointing can drop them
        return _from_rows(Y, B, T).to(q.dtype)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, dy):
        Q, K, V, Y, mask, *kept = ctx.saved_tensors
        B, nh, T, hd = dy.shape
        nkv = K.shape[0] // B
        G, scale = nh // nkv, 1.0 / math.sqrt(hd)
        want_q, want_k = ctx.needs_input_grad[:2]
        dY = _to_rows(dy, nkv)
        delta = (dY * Y).sum(-1, keepdim=True)                           # rowsum(dy * y): (B*nkv, T*G, 1)
        dQ, dK, dV = torch.empty_like(Q), torch.zeros_like(K), torch.zeros_like(V)
        blocks = _attention_blocks(Q, K, mask, G)
        if kept:            # block n holds queries n*ATTN_BLOCK.. and keys first_keys[n]..
            blocks = ((n * ATTN_BLOCK, min(T, (n + 1) * ATTN_BLOCK), lo, P)
                      for n, (lo, P) in enumerate(zip(ctx.first_keys, kept)))
        for s, e, lo, P in blocks:
            r = slice(s * G, e * G)
            dV[:, lo:e].baddbmm_(P.transpose(1, 2), dY[:, r])
            dS = torch.bmm(dY[:, r], V[:, lo:e].transpose(1, 2)).sub_(delta[:, r]).mul_(P)  # (B*nkv, (e-s)*G, e-lo)
            if want_q:
                torch.bmm(dS, K[:, lo:e], out=dQ[:, r])
            if want_k:          # not in layer 0, whose keys come from frozen weights and embeddings
                dK[:, lo:e].baddbmm_(dS.transpose(1, 2), Q[:, r])        # Q carries the scale already
        dq = _from_rows(dQ.mul_(scale), B, T)
        return (dq.to(dy.dtype) if want_q else None, dK.view(B, nkv, T, hd).to(dy.dtype) if want_k else None,
                dV.view(B, nkv, T, hd).to(dy.dtype), None)


def _to_rows(x: torch.Tensor, nkv: int, scale: float | None = None) -> torch.Tensor:
    """(B, nh, T, hd) -> a new fp32 (B*nkv, T*G, hd) tensor, times `scale` if given: row t*G + g
    of batch b*nkv + kv is query head kv*G + g at position t (the rows of one GQA group)."""
    B, nh, T, hd = x.shape
    G = nh // nkv
    src = x.float().transpose(1, 2).reshape(B, T, nkv, G, hd).transpose(1, 2)   # (B, nkv, T, G, hd) view
    out = torch.empty(B, nkv, T, G, hd, dtype=torch.float32, device=x.device)  # never a view of x
    if scale is None:
        out.copy_(src)
    else:
        torch.mul(src, scale, out=out)
    return out.view(B * nkv, T * G, hd)


def _from_rows(X: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """The inverse of _to_rows: (B*nkv, T*G, hd) -> (B, nh, T, hd), a view of (B, T, nh, hd)
    memory, so that the (B, T, nh*hd) input of o_proj is a view too."""
    nkv, G, hd = X.shape[0] // B, X.shape[1] // T, X.shape[2]
    return X.view(B, nkv, T, G, hd).transpose(1, 2).reshape(B, T, nkv * G, hd).transpose(1, 2)


def _attention_blocks(Q, K, mask, G):
    """Yield (s, e, lo, P) per block of ATTN_BLOCK queries s..e-1: P = softmax over keys lo..e-1,
    (B*nkv, (e-s)*G, e-lo), with the mask (or the causal rule within the diagonal block) applied.
    lo is the first key that a row of the block may see: 0 for causal attention, far later for
    a packed layout whose blocks see only themselves (recicl.py's blocks layout), which is what
    keeps its cost linear in the pack's length."""
    Bk, TG, _ = Q.shape
    T = TG // G
    B = Bk if mask is None else mask.shape[0]
    blk = torch.arange(ATTN_BLOCK, device=Q.device)
    future = blk[None, :] > blk.repeat_interleave(G)[:, None]          # (ATTN_BLOCK*G, ATTN_BLOCK): key after query
    for s in range(0, T, ATTN_BLOCK):
        e = min(s + ATTN_BLOCK, T)                                      # queries s..e-1 see keys 0..e-1 at most
        lo = 0 if mask is None else int(mask[:, :, s:e, :e].any(2).any(1).any(0).int().argmax())
        S = torch.bmm(Q[:, s * G:e * G], K[:, lo:e].transpose(1, 2)).view(B, Bk // B, (e - s) * G, e - lo)
        if mask is None:   # only the diagonal block has keys after some of its queries
            S[..., s:].masked_fill_(future[:(e - s) * G, :e - s], float("-inf"))
        else:
            S.masked_fill_(~mask[:, :, s:e, lo:e].repeat_interleave(G, dim=2), float("-inf"))  # (B, 1, (e-s)*G, e-lo)
        yield s, e, lo, torch.softmax(S, dim=-1).view(Bk, -1, e - lo)
