"""The one training loop that recicl.py and adaptrec.py call: LoRA parameters only, AdamW,
linear warm-up then cosine decay, gradient accumulation, clipping, optional bf16 autocast and
activation checkpointing, validation that keeps the best adapter, atomic checkpoints with
exact resume, and data parallelism under torchrun through the same code path.

The caller gives a list of examples and `loss_fn(model, examples) -> (mean loss, n_tokens)`.
Which examples form step s is a pure function of (seed, s): epoch e visits a permutation
seeded by (seed, e), and step s takes the next `batch_size` of them. So the data position of a
checkpoint is its step number, and a resumed run sees exactly the batches it would have seen.

Data parallel (torchrun --nproc_per_node N): rank r takes rows r, r+N, ... of each global
batch; each micro-batch's mean loss is weighted by its share of the global batch, gradients
are summed across ranks with all_reduce, so every rank applies the update a single process
would make on the whole batch. Backend gloo on CPU, nccl on GPU. Only rank 0 writes files.
"""
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

import lora


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    steps: int = 100              # optimizer steps
    batch_size: int = 8           # examples per optimizer step, over all processes
    micro_batch: int = 1          # examples per forward/backward (gradient accumulation)
    lr: float = 2e-4
    weight_decay: float = 0.0     # applied to matrices only (all LoRA A and B are matrices)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1     # cosine decays from lr to lr * min_lr_ratio
    clip: float = 1.0             # max global grad norm; 0 = off
    bf16: bool = False            # autocast matmuls to bfloat16
    grad_checkpoint: bool = False # recompute each block in backward (memory for time)
    eval_every: int = 0           # steps between validations; 0 = only at the end
    save_every: int = 50          # steps between checkpoints; the last step always saves
    log_every: int = 1
    seed: int = 0


def add_args(p, batch_size: int, lr: float, lora_r: int, lora_dropout: float, resume_from: str, lr_help: str = ""):
    """The command-line flags of this loop and of the LoRA it trains (recicl.py and adaptrec.py);
    the defaults that differ between the methods are arguments."""
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--micro-batch", type=int, default=1, help="examples per forward (1 is fastest on CPU: no padding)")
    p.add_argument("--lr", type=float, default=lr, help=lr_help or None)
    p.add_argument("--lora-r", type=int, default=lora_r)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=lora_dropout)
    p.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated projections (paper setups: often "
                   "all seven, q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; slower on CPU)")
    p.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0 = at the end only)")
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--resume", action="store_true", help=f"continue from {resume_from}")


def config_from_args(model, a, out_dir: str, steps: int) -> TrainConfig:
    """Inject LoRA into `model` as the add_args flags say; the TrainConfig they describe (warm-up:
    a tenth of the steps)."""
    lora.inject(model, tuple(a.lora_targets.split(",")), r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout)
    return TrainConfig(out_dir=out_dir, steps=steps, batch_size=a.batch_size, micro_batch=a.micro_batch, lr=a.lr,
                       warmup_steps=max(1, steps // 10), eval_every=a.eval_every, save_every=a.save_every,
                       seed=a.seed, bf16=a.bf16, grad_checkpoint=a.grad_checkpoint)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step: int, n: int, cfg: TrainConfig) -> list[int]:
    """Indices of the examples of optimizer step `step` (a pure function of seed and step)."""
    out, pos = [], step * cfg.batch_size
    while len(out) < cfg.batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)).tolist()
        take = min(cfg.batch_size - len(out), n - offset)
        out += perm[offset:offset + take]
        pos += take
    return out


def dist_info() -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def dist_close():
    """End the process group dist_info started (all ranks wait for each other first). Without
    it a gloo process can abort at interpreter exit ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def make_optimizer(params, cfg: TrainConfig):
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    return opt, sched


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def atomic_torch_save(obj, path: str):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(obj, path: str):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def save_checkpoint(path, model, opt, sched, step, best, cfg, rng=None):
    """rng: the RNG state at the end of `step` (default: now)."""
    atomic_torch_save({"adapter": lora.adapter_state(model), "optimizer": opt.state_dict(),
                       "scheduler": sched.state_dict(), "step": step, "best": best,
                       "rng": rng or rng_state(), "config": asdict(cfg)}, path)


def load_checkpoint(path, model, opt, sched) -> tuple[int, float | None]:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    params = lora.adapter_params(model)
    if set(params) != set(ck["adapter"]):
        raise ValueError(f"{path}: the checkpoint's adapter does not match this model's LoRA modules")
    with torch.no_grad():
        for k, v in ck["adapter"].items():
            params[k].copy_(v)
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    set_rng_state(ck["rng"])
    return ck["step"], ck["best"]


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory in the process (Linux only; False elsewhere).

    Torch's CPU tensors come straight from malloc. By default glibc hands freed memory back to
    the kernel when the free top of its heap passes a threshold (a few MB), and maps blocks
    above another (at most 32 MB) afresh each time. A training step frees its activations in
    the backward and allocates them again in the next forward, so each step page-faults tens
    of MB of them back in, zero-filled by the kernel. With both thresholds at 1 GB the memory is
    reused instead: the peak resident size is unchanged (it is reached every step anyway) and
    the LoRA step of bench.py ran ~2% faster (alternating processes, 21 steps each; minor
    faults per step from ~14,000 to ~3). Process-wide and permanent, so train() calls it only
    for CPU training. mallopt(3): M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3."""
    import ctypes
    import ctypes.util
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):                # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(-3, 1 << 30)) and bool(mallopt(-1, 1 << 30))


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def train(model, examples, loss_fn, cfg: TrainConfig, validate=None, resume: bool = False,
          run_config: dict | None = None, base_model: str = "") -> dict:
    """Train the model's LoRA parameters (inject them first). `validate(model) -> float` (higher
    is better) runs every cfg.eval_every steps and at the end; the best adapter is kept in
    out_dir/best (peft layout). Checkpoints go to out_dir/checkpoint.pt. Returns a summary."""
    if not examples:
        raise ValueError("no training examples")
    if cfg.batch_size % cfg.micro_batch:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of micro_batch {cfg.micro_batch}")
    rank, world = dist_info()
    params = lora.lora_parameters(model)
    if not params:
        raise ValueError("the model has no LoRA parameters: call lora.inject first")
    if world > 1:                                   # same starting adapter everywhere
        for p in params:
            dist.broadcast(p.data, src=0)
    opt, sched = make_optimizer(params, cfg)
    ck_path = os.path.join(cfg.out_dir, "checkpoint.pt")
    start, best = 0, None
    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        write_json({"train": asdict(cfg), "world_size": world, **(run_config or {})}, os.path.join(cfg.out_dir, "config.json"))
    if resume:
        if not os.path.exists(ck_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ck_path}")
        start, best = load_checkpoint(ck_path, model, opt, sched)
        if rank == 0:
            print(f"[train] resumed from {ck_path} at step {start}", file=sys.stderr)
    else:
        torch.manual_seed(cfg.seed + rank)          # dropout masks; data order is seeded separately
    model.grad_checkpoint = cfg.grad_checkpoint
    device_type = next(model.parameters()).device.type
    if device_type == "cpu":
        keep_freed_memory()
    t0, tokens, step, saved_step = time.time(), 0, start, start
    log = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if rank == 0 else None

    def run_validation():
        nonlocal best
        model.eval()
        with torch.no_grad():
            metric = float(validate(model))
        model.train()
        improved = best is None or metric > best
        if improved:
            best = metric
            if rank == 0:
                lora.save_adapter(model, os.path.join(cfg.out_dir, "best"), base_model)
                write_json({"step": step, "metric": metric}, os.path.join(cfg.out_dir, "best", "metric.json"))
        if rank == 0:
            print(f"[train] step {step} validation {metric:.4f}{' (best, saved)' if improved else ''}", file=sys.stderr)
            log.write(json.dumps({"step": step, "validation": metric}) + "\n")
            log.flush()

    model.train()
    try:
        while step < cfg.steps:
            idx = batch_indices(step, len(examples), cfg)[rank::world]
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for s in range(0, len(idx), cfg.micro_batch):
                chunk = [examples[i] for i in idx[s:s + cfg.micro_batch]]
                with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss, n_tok = loss_fn(model, chunk)
                weight = len(chunk) / cfg.batch_size            # share of the global batch
                (loss * weight).backward()
                loss_sum += loss.item() * weight
                tokens += n_tok * world
            if world > 1:
                for p in params:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                t = torch.tensor([loss_sum])
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                loss_sum = t.item()
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            sched.step()
            step += 1
            rng_end = rng_state()          # what an interrupted run must resume from
            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
                el = time.time() - t0
                eta = el / (step - start) * (cfg.steps - step)
                print(f"[train] step {step}/{cfg.steps} | loss {loss_sum:.4f} | lr {sched.get_last_lr()[0]:.2e} | "
                      f"{tokens / max(el, 1e-9):.0f} tok/s | elapsed {fmt_time(el)} | eta {fmt_time(eta)}", file=sys.stderr)
                log.write(json.dumps({"step": step, "loss": loss_sum, "lr": sched.get_last_lr()[0]}) + "\n")
                log.flush()
            if validate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                run_validation()
            if rank == 0 and (step % cfg.save_every == 0 or step == cfg.steps):
                save_checkpoint(ck_path, model, opt, sched, step, best, cfg, rng_end)
                saved_step = step
        if validate is not None:
            run_validation()
        if rank == 0:
            lora.save_adapter(model, os.path.join(cfg.out_dir, "final"), base_model)
    except KeyboardInterrupt:
        if rank == 0 and step > saved_step:   # the adapter and optimizer still hold the end of `step`
            save_checkpoint(ck_path, model, opt, sched, step, best, cfg, rng_end)
            print(f"[train] interrupted: checkpoint of step {step} saved to {ck_path}; continue with --resume", file=sys.stderr)
        raise
    finally:
        if log:
            log.close()
    model.eval()
    return {"steps": step, "best": best, "out_dir": cfg.out_dir, "elapsed_s": time.time() - t0}
