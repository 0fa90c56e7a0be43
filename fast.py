"""The CPU speed layer: model.py's Llama, made faster for float32 on a CPU, with the same math.

    m = fast.load(model_dir)       # model.load(..., prepare=fast.prepare), and malloc tuning
    m = model.load(model_dir)      # the plain model (every command's --plain)

Nothing here changes what the model computes; tests/test_fast.py checks that the two paths give
equal logits, losses, LoRA gradients, caches and greedy tokens. `prepare` runs on the model
built on 'meta' (model.load's hook), before any weight has storage, so the layouts below cost no
extra peak memory. The tricks, by the names `load(without=...)` and `bench.py --without` use
(what each buys, measured with bench.py: docs/BENCHMARKS.md):

  attention      CausalAttention: attention forward and backward by hand in blocks of query
                 rows, for training on CPU. Torch's CPU flash kernels run at about a third of
                 GEMM speed, and a block skips the key blocks it cannot see.
  column-major   every fp32 matrix stored as a contiguous W^T, so F.linear(x, W) = x W^T reads
                 it in order: faster GEMV when decoding; prefill GEMMs unchanged.
  fused          q/k/v and gate/up weights as column slices of one buffer per group, so one
                 GEMM computes the group (only while the projections are plain nn.Linear: a
                 LoRA wrapper falls back to the separate projections).
  head           vocab_linear: the output head as one bmm over per-thread slices of the
                 vocabulary.
  malloc         keep_freed_memory: glibc keeps freed memory, so a training step stops
                 page-faulting its activations back in. Process-wide: fast.load sets it.

In bfloat16, or on another device, fast.load is model.load: these tricks are for fp32 on CPU.
"""
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import model as llama
from model import MLP, Attention, sdpa


TRICKS = ("attention", "column-major", "fused", "head", "malloc")


def load(model_dir: str, dtype=torch.float32, device="cpu", without=()):
    """model.load with the CPU fast path when the model is float32 on the CPU (else plain).
    without: names from TRICKS to leave out (bench.py measures each trick this way)."""
    if dtype != torch.float32 or torch.device(device).type != "cpu":
        return llama.load(model_dir, dtype=dtype, device=device)
    unknown = set(without) - set(TRICKS)
    if unknown:
        raise ValueError(f"unknown fast.py tricks {sorted(unknown)}; known: {', '.join(TRICKS)}")
    if "malloc" not in without:
        keep_freed_memory()

    def hook(model, dtype, device):
        prepare(model, dtype, device, without)
    return llama.load(model_dir, dtype=dtype, device=device, prepare=hook)


def prepare(model: llama.Llama, dtype, device, without=()):
    """model.load's hook: swap in the fused modules and give every matrix column-major storage.
    Names, shapes and values stay those of the checkpoint; only the memory layout differs."""
    with torch.device("meta"):
        for block in model.model.layers:
            block.self_attn = FusedAttention(model.args, train_kernel="attention" not in without)
            block.mlp = FusedMLP(model.args)
    if "fused" not in without:
        for block in model.model.layers:
            attn, mlp = block.self_attn, block.mlp
            attn.qkv_t = fuse((attn.q_proj, attn.k_proj, attn.v_proj), dtype, device, "column-major" not in without)
            mlp.gate_up_t = fuse((mlp.gate_proj, mlp.up_proj), dtype, device, "column-major" not in without)
    if "column-major" not in without:
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.is_meta and p.dim() == 2:
                    setattr(module, name, nn.Parameter(column_major(torch.empty(p.shape, dtype=dtype, device=device))))
    if "head" not in without:
        model.head_linear = vocab_linear


# ----------------------------------------------------------------------------- layouts

def column_major(w: torch.Tensor) -> torch.Tensor:
    """The same (out, in) matrix stored column-major: a contiguous W^T viewed back as (out, in).
    F.linear(x, w) computes x @ W^T, and with W^T contiguous a CPU GEMV reads it in order. In
    bfloat16 this layout is >10x slower, so it is for float32 only."""
    return w.t().contiguous().t()


def fuse(linears, dtype, device, by_columns: bool = True) -> torch.Tensor:
    """One buffer for a group of linears with the same input, each weight an (out, in) slice of
    it: (in, sum of outs) column slices (column-major weights), or row slices of a
    (sum of outs, in) buffer with by_columns=False."""
    outs = sum(m.out_features for m in linears)
    buf = torch.empty(linears[0].in_features, outs, dtype=dtype, device=device)
    if not by_columns:
        buf = torch.empty(outs, linears[0].in_features, dtype=dtype, device=device).t()
    start = 0
    for m in linears:
        m.weight = nn.Parameter(buf[:, start:start + m.out_features].t())
        start += m.out_features
    return buf


def is_fused(buf: torch.Tensor, linears) -> bool:
    """True while `linears` are plain, frozen nn.Linear whose weights are still the slices of `buf`
    made by `fuse`; a LoRA wrapper, a .to() that moved them or training the weights themselves
    (full fine-tuning: gradients go to the parameters, not to `buf`) ends the fused path."""
    return (all(type(m) is nn.Linear and not m.weight.requires_grad for m in linears)
            and linears[0].weight.data_ptr() == buf.data_ptr())


class FusedAttention(Attention):
    """Attention with q/k/v in one GEMM and CausalAttention for training on CPU."""

    def __init__(self, args, train_kernel: bool = True):
        super().__init__(args)
        self.qkv_t = None        # (D, (nh + 2 nkv) hd), set by `prepare`
        self.train_kernel = train_kernel

    def project(self, x):
        if self.qkv_t is None or not is_fused(self.qkv_t, (self.q_proj, self.k_proj, self.v_proj)):
            return super().project(x)
        B, T, _ = x.shape
        qkv = F.linear(x, self.qkv_t.t()).view(B, T, self.n_heads + 2 * self.n_kv, self.hd)
        return qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=2)

    def attend(self, q, k, v, mask, own_slots: bool):
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if self.train_kernel and own_slots and needs_grad and q.device.type == "cpu" and q.shape[2] > 1:
            return CausalAttention.apply(q, k, v, mask)
        return sdpa(q, k, v, mask)


class FusedMLP(MLP):
    """SwiGLU with gate and up in one GEMM."""

    def __init__(self, args):
        super().__init__(args)
        self.gate_up_t = None    # (D, 2 H), set by `prepare`

    def forward(self, x):
        if self.gate_up_t is None or not is_fused(self.gate_up_t, (self.gate_proj, self.up_proj)):
            return super().forward(x)
        gate, up = F.linear(x, self.gate_up_t.t()).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


# ----------------------------------------------------------------------------- output head

def vocab_linear(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(h, w) for the output head, w: (V, D) with V large. In float32 on CPU it runs as one
    bmm over n = torch.get_num_threads() slices of the vocabulary (h @ W_i^T for row slices W_i of
    w): torch gives each batch entry of a bmm its own thread, and each thread streams its slice of
    w once; one GEMM with few rows of h (a decode step, a loss at a few positions) reaches a
    fraction of that speed. Same products; the sums run in another order (fp32 rounding)."""
    n = torch.get_num_threads()
    V, D = w.shape
    if h.shape[-1] != D:     # checked here: the bmm path would reshape a wrong h before failing
        raise ValueError(f"hidden states of size {h.shape[-1]} do not fit the output head ({V} x {D})")
    if h.device.type != "cpu" or w.dtype != torch.float32 or n == 1 or V % n:
        return F.linear(h, w)
    rows = h.reshape(-1, D)
    slices = w.t().unflatten(1, (n, V // n)).transpose(0, 1)                  # (n, D, V/n) views of w
    out = torch.bmm(rows.expand(n, -1, -1), slices)                           # (n, rows, V/n)
    return out.transpose(0, 1).reshape(*h.shape[:-1], V)


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


# ----------------------------------------------------------------------------- memory

def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory in the process (Linux only; False elsewhere).

    Torch's CPU tensors come straight from malloc. By default glibc hands freed memory back to
    the kernel when the free top of its heap passes a threshold (a few MB), and maps blocks
    above another (at most 32 MB) afresh each time. A training step frees its activations in
    the backward and allocates them again in the next forward, so each step page-faults tens
    of MB of them back in, zero-filled by the kernel. With both thresholds at 1 GB the memory is
    reused instead: the peak resident size is unchanged (it is reached every step anyway) and
    the LoRA step of bench.py ran ~2% faster (alternating processes, 21 steps each; minor
    faults per step from ~14,000 to ~3). Process-wide and permanent: fast.load calls it, so a
    program that loads the fast model opts in. mallopt(3): M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3."""
    import ctypes
    import ctypes.util
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):                # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(-3, 1 << 30)) and bool(mallopt(-1, 1 << 30))
