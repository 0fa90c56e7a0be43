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
import argparse
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

import lora
from fetch import atomic_path, sha256, write_json
from model import read_safetensors


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


def count(minimum: int):
    """argparse type: an integer >= minimum (a count or a size; 0 where 0 means 'all' or 'none')."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v
    return parse


def real(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False):
    """argparse type: a finite float in [low, high] (open ends where asked)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v) or v < low or v > high or (low_open and v == low) or (high_open and v == high):
            raise argparse.ArgumentTypeError(f"must be a finite number in {'(' if low_open else '['}{low}, {high}"
                                             f"{')' if high_open else ']'}, got {text}")
        return v
    return parse


def add_args(p, batch_size: int | None, lr: float, lora_r: int, lora_dropout: float, resume_from: str, lr_help: str = "",
             batch_help: str = ""):
    """The command-line flags of this loop and of the LoRA it trains (recicl.py and adaptrec.py);
    the defaults that differ between the methods are arguments (batch_size None: the caller
    sets it after parsing)."""
    p.add_argument("--batch-size", type=count(1), default=batch_size, help=batch_help or None)
    p.add_argument("--micro-batch", type=count(1), default=1, help="examples per forward (1 is fastest on CPU: no padding)")
    p.add_argument("--lr", type=real(0, low_open=True), default=lr, help=lr_help or None)
    p.add_argument("--full", action="store_true", help="full fine-tuning: every weight trained (AdamW states in fp32), "
                   "no LoRA; saves whole HF-layout models (about 4 bytes a weight); use a smaller --lr (the RecICL "
                   "reference: 5e-5)")
    p.add_argument("--lora-r", type=count(1), default=lora_r)
    p.add_argument("--lora-alpha", type=real(0, low_open=True), default=16)
    p.add_argument("--lora-dropout", type=real(0, 1, high_open=True), default=lora_dropout)
    p.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated projections (paper setups: often "
                   "all seven, q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; slower on CPU)")
    p.add_argument("--eval-every", type=count(0), default=0, help="validate every N steps (0 = at the end only)")
    p.add_argument("--save-every", type=count(1), default=5)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--resume", action="store_true", help=f"continue from the checkpoint in {resume_from} (same settings)")


def lora_from_args(a) -> dict | None:
    """The keyword arguments of lora.inject that the add_args flags describe (None: --full)."""
    if a.full:
        return None
    return {"targets": tuple(a.lora_targets.split(",")), "r": a.lora_r, "alpha": a.lora_alpha, "dropout": a.lora_dropout}


def make_trainable(model, lora_spec: dict | None):
    """lora.inject(model, **lora_spec), or with lora_spec None (--full) every weight of the model;
    a model that holds a loaded adapter goes on training it (lora_spec does not apply then)."""
    if lora.lora_modules(model):
        for p in lora.lora_parameters(model):
            p.requires_grad_(True)
    elif lora_spec is None:
        model.requires_grad_(True)
    else:
        lora.inject(model, **lora_spec)


def config_from_args(a, out_dir: str, steps: int) -> TrainConfig:
    """The TrainConfig that the add_args flags describe (warm-up: a tenth of the steps)."""
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
    """Every RNG a step draws from: (JSON-able values, tensors)."""
    np_state = np.random.get_state()
    py = random.getstate()
    plain = {"numpy": [np_state[0], np_state[1].tolist(), *[x.item() if hasattr(x, "item") else x for x in np_state[2:]]],
             "python": [py[0], list(py[1]), py[2]]}
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{k}": t for k, t in enumerate(torch.cuda.get_rng_state_all())})
    return {"plain": plain, "tensors": tensors}


def set_rng_state(plain: dict, tensors: dict):
    torch.set_rng_state(tensors["rng.torch"])
    name, keys, *rest = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    random.setstate((plain["python"][0], tuple(plain["python"][1]), plain["python"][2]))
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- what is trained

def trained_params(model) -> dict:
    """What training updates, by the names it is saved under: the LoRA adapter (peft names) when
    one is injected, else every parameter that requires grad (full fine-tuning: the model's own
    HF names; call model.requires_grad_(True) first)."""
    if lora.lora_modules(model):
        return lora.adapter_params(model)
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "generation_config.json")


def save_trained(model, out_dir: str, base_model: str = ""):
    """The LoRA adapter (peft layout), or after full fine-tuning every weight as model.safetensors
    beside the base directory's config and tokenizer files: a HF-layout directory that model.load
    and transformers read like the base model (`model.model_dir`, set by model.load, names it)."""
    import shutil
    from safetensors.torch import save_file
    if lora.lora_modules(model):
        return lora.save_adapter(model, out_dir, base_model)
    os.makedirs(out_dir, exist_ok=True)
    for name in MODEL_FILES:
        if os.path.exists(os.path.join(model.model_dir, name)):
            with atomic_path(os.path.join(out_dir, name)) as tmp:
                shutil.copyfile(os.path.join(model.model_dir, name), tmp)
    with atomic_path(os.path.join(out_dir, "model.safetensors")) as tmp:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, tmp, metadata={"format": "pt"})


def is_saved(path: str) -> bool:
    """A directory that save_trained wrote: an adapter or a whole model."""
    return any(os.path.exists(os.path.join(path, f)) for f in ("adapter_config.json", "model.safetensors"))


def saved_weights(path: str) -> str | None:
    """The tensor file of what save_trained wrote in path: the adapter's or the whole model's."""
    return next((os.path.join(path, f) for f in ("adapter_model.safetensors", "model.safetensors")
                 if os.path.exists(os.path.join(path, f))), None)


# A checkpoint is two files, neither of them a pickle: checkpoint-<step>.safetensors (adapter,
# AdamW moments, RNG tensors) and checkpoint.json (step, best, settings, optimizer and scheduler
# hyper-parameters, the other RNG states, and the tensor file's name and SHA-256). The tensor
# file is written first under its own name; the JSON, written atomically last, is the commit
# point; older tensor files are removed after it. Killed at any moment, the JSON names a
# complete tensor file.

def save_checkpoint(out_dir, model, opt, sched, step, best, settings, rng, pending_validation=False):
    """rng: rng_state() at the end of `step`."""
    from safetensors.torch import save_file
    opt_sd = opt.state_dict()
    tensors = {f"trained.{k}": p.detach().contiguous() for k, p in trained_params(model).items()}
    for i, st in opt_sd["state"].items():
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v).detach().contiguous() for k, v in st.items()})
    tensors.update(rng["tensors"])
    name = f"checkpoint-{step}.safetensors"
    with atomic_path(os.path.join(out_dir, name)) as tmp:
        save_file(tensors, tmp)
    write_json({"step": step, "best": best, "settings": settings, "pending_validation": pending_validation,
                "tensors": name, "sha256": sha256(os.path.join(out_dir, name)),
                "optimizer": {"param_groups": opt_sd["param_groups"], "state_keys": {i: list(st) for i, st in opt_sd["state"].items()}},
                "scheduler": sched.state_dict(), "rng": rng["plain"]}, os.path.join(out_dir, "checkpoint.json"))
    for f in os.listdir(out_dir):
        if f.startswith("checkpoint-") and f != name:
            os.remove(os.path.join(out_dir, f))


def load_checkpoint(out_dir, model, opt, sched, settings: dict) -> tuple[int, float | None, bool]:
    """Restore a checkpoint saved by save_checkpoint; refuses one whose settings differ from
    `settings`, naming them. Returns (step, best, pending_validation)."""
    path = os.path.join(out_dir, "checkpoint.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:
        with open(path) as f:
            ck = json.load(f)
        tensor_path = os.path.join(out_dir, os.path.basename(ck["tensors"]))
        step, best, saved = int(ck["step"]), ck["best"], ck["settings"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable checkpoint ({e!r}); delete {out_dir} to start again") from None
    differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if differ:
        raise ValueError(f"--resume: the checkpoint in {out_dir} was made with other settings: "
                         + ", ".join(f"{k} {saved.get(k)!r} -> {settings.get(k)!r}" for k in differ[:6])
                         + "; run again with the checkpoint's settings, or without --resume in a new --out")
    if not os.path.exists(tensor_path) or sha256(tensor_path) != ck.get("sha256"):
        raise ValueError(f"{path}: its tensor file {tensor_path} is missing or does not match its SHA-256")
    t = dict(read_safetensors(tensor_path))
    params = trained_params(model)
    if {k[len("trained."):] for k in t if k.startswith("trained.")} != set(params):
        raise ValueError(f"{tensor_path}: the checkpoint's trained tensors do not match this model's (LoRA modules, "
                         "or all weights with --full)")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(t[f"trained.{k}"])
    state = {int(i): {k: t[f"opt.{i}.{k}"] for k in keys} for i, keys in ck["optimizer"]["state_keys"].items()}
    opt.load_state_dict({"state": state, "param_groups": ck["optimizer"]["param_groups"]})
    sched.load_state_dict(ck["scheduler"])
    set_rng_state(ck["rng"], t)
    return step, best, bool(ck.get("pending_validation"))


RUN_FILES = ("config.json", "log.jsonl", "checkpoint.json")
RUN_DIRS = ("best", "final")


def check_tuned_like(run_dir: str, settings: dict):
    """An adapter is used with the prompt settings it was tuned with: settings {flag: (this
    run's value, the value a run written before the flag existed had)}, compared with the args
    in run_dir/config.json; a difference is an error naming the flag."""
    path = os.path.join(run_dir, "config.json")
    saved = {}
    if os.path.exists(path):
        with open(path) as f:
            try:
                saved = json.load(f).get("args", {})
            except (ValueError, AttributeError) as e:
                raise ValueError(f"{path}: not a run's config.json ({e})") from None
    for flag, (value, default) in settings.items():
        tuned = saved.get(flag.lstrip("-").replace("-", "_"), default)
        if tuned != value:
            raise ValueError(f"the adapter in {run_dir} was tuned with {flag} {tuned}; this run has {flag} {value}")


def adapter_dir(run_dir: str) -> str:
    """RUN/best (kept by validation), else RUN/final (no validation, or none gave a finite metric)."""
    best = os.path.join(run_dir, "best")
    return best if is_saved(best) else os.path.join(run_dir, "final")


def clear_run(out_dir: str):
    """Remove what an earlier run wrote into out_dir (only the names train() writes), so that a
    new run's config.json never sits beside an old run's adapters."""
    import shutil
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if name in RUN_DIRS or name.startswith("best.old"):
            shutil.rmtree(path)
        elif name in RUN_FILES or (name.startswith("checkpoint-") and name.endswith(".safetensors")):
            os.remove(path)


def save_best(model, out_dir: str, base_model: str, metric: dict):
    """Write best/ (adapter and metric.json) as one unit: into a temporary directory, then swapped
    in by two renames. A kill between them leaves best.old-*, which the next run removes, and no
    best/ (eval then uses final/), never weights of one step beside the metric of another."""
    import shutil
    tmp, best = os.path.join(out_dir, f"best.tmp{os.getpid()}"), os.path.join(out_dir, "best")
    old = os.path.join(out_dir, f"best.old{os.getpid()}")
    save_trained(model, tmp, base_model)
    write_json(metric, os.path.join(tmp, "metric.json"))
    if os.path.exists(best):
        os.rename(best, old)
    os.rename(tmp, best)
    shutil.rmtree(old, ignore_errors=True)


def remove_temporaries(out_dir: str):
    """Delete the temporary files a killed run left (names with '.tmp'); only the lock holder
    calls this, so no live writer owns them. They were never trusted: renames publish files."""
    import shutil
    for name in os.listdir(out_dir):
        if name.startswith(("best.tmp", "best.old")):
            shutil.rmtree(os.path.join(out_dir, name))
    for root, _, files in os.walk(out_dir):
        for f in files:
            if ".tmp" in f:
                os.remove(os.path.join(root, f))


def run_cli(commands: dict, a, locked=("train", "eval")):
    """Run commands[a.cmd](a) as recicl.py and adaptrec.py do: commands that write under --out
    hold its lock throughout; every expected failure ends in one `error:` line, Ctrl-C in a
    note and exit code 130 (the stage that was running has said what it kept). SIGTERM (`kill`, a
    batch scheduler's stop) is taken as Ctrl-C: a run started in the background from a script
    ignores SIGINT, and `kill` is then the only way to stop it."""
    on_sigterm = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        lock = RunLock(a.out) if a.cmd in locked else None
        try:
            commands[a.cmd](a)
        finally:
            if lock:
                lock.release()
            signal.signal(signal.SIGTERM, on_sigterm)
    except (OSError, ValueError, RuntimeError, FloatingPointError) as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt


class RunLock:
    """An exclusive lock on a run directory for as long as the process holds it (flock: the
    kernel releases it when the process ends, however it ends, so a killed run leaves no
    stale lock)."""

    def __init__(self, out_dir: str):
        import fcntl
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, ".lock")
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.close()
            raise RuntimeError(f"{out_dir} is in use by another run (it holds {self.path}); wait for it, or use "
                               "another --out") from None

    def release(self):
        self.f.close()


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run_settings(cfg: TrainConfig, run_config: dict | None) -> dict:
    """What a resumed run must share with its checkpoint: every training setting and the
    caller's run description, less what only changes logging, checkpoint spacing or the code path (--plain: the same
    math; --device: the same run on another machine)."""
    out = {f"train.{k}": v for k, v in asdict(cfg).items() if k not in ("out_dir", "save_every", "log_every")}
    for k, v in (run_config or {}).items():
        if k == "args":
            out.update({f"args.{a}": w for a, w in v.items() if a not in ("resume", "save_every", "out", "plain", "device")})
        else:
            out[k] = v
    return json.loads(json.dumps(out, default=str))          # compared as they are stored


def train(model, examples, loss_fn, cfg: TrainConfig, validate=None, resume: bool = False,
          run_config: dict | None = None, base_model: str = "", before_step=None) -> dict:
    """Train the model's LoRA parameters (inject them first), or with no LoRA every parameter that
    requires grad (full fine-tuning). `validate(model) -> float` (higher is better) runs every
    cfg.eval_every steps and at the end; the best weights are kept in out_dir/best (save_trained). Checkpoints: out_dir/checkpoint.json + .safetensors. The run
    holds out_dir's lock throughout; a non-finite loss stops it with an error (nothing saved
    from that step), and a non-finite validation metric never counts as best.
    `before_step(step, model)` runs (in eval mode, no gradients) before each optimizer step, for
    a caller whose examples depend on the model: it may rebuild the examples of the coming steps
    in place (AdaptRec's self-adaptive judge). For an exact --resume it must give, from the
    weights a checkpoint holds, the examples the uninterrupted run had."""
    if not examples:
        raise ValueError("no training examples")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.micro_batch < 1:
        raise ValueError(f"steps, batch size and micro-batch must be >= 1 (got {cfg.steps}, {cfg.batch_size}, {cfg.micro_batch})")
    if cfg.batch_size % cfg.micro_batch:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of micro_batch {cfg.micro_batch}")
    rank, world = dist_info()
    params = list(trained_params(model).values())
    if not params:
        raise ValueError("nothing to train: call lora.inject first, or model.requires_grad_(True) for full fine-tuning")
    if world > 1:                                   # same starting adapter everywhere
        for p in params:
            dist.broadcast(p.data, src=0)
    opt, sched = make_optimizer(params, cfg)
    settings = run_settings(cfg, run_config)
    lock = RunLock(cfg.out_dir) if rank == 0 else None
    if lock:
        remove_temporaries(cfg.out_dir)
    try:
        return _train(model, examples, loss_fn, cfg, validate, resume, run_config, base_model, rank, world, params,
                      opt, sched, settings, before_step)
    finally:
        if lock:
            lock.release()


def start_run(model, cfg, resume, run_config, rank, world, opt, sched, settings) -> tuple[int, float | None, bool]:
    """(first step, best metric so far, validation pending) of a fresh or resumed run."""
    start, best, pending = 0, None, False
    if resume:
        start, best, pending = load_checkpoint(cfg.out_dir, model, opt, sched, settings)
        if rank == 0:
            print(f"[train] resumed from {cfg.out_dir} at step {start}", file=sys.stderr)
    else:
        if rank == 0:
            clear_run(cfg.out_dir)                   # a fresh run never shares its directory with an old one
        torch.manual_seed(cfg.seed + rank)          # dropout masks; data order is seeded separately
    if rank == 0:
        write_json({"train": asdict(cfg), "world_size": world, **(run_config or {})}, os.path.join(cfg.out_dir, "config.json"))
    return start, best, pending


def optimizer_step(model, examples, idx, loss_fn, cfg, params, opt, sched, world, device_type) -> tuple[float, int]:
    """One optimizer step on the examples at idx (this process's share), in micro-batches;
    gradients summed over processes. Returns (the global batch's mean loss, tokens seen)."""
    opt.zero_grad(set_to_none=True)
    loss_sum, tokens = 0.0, 0
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
    if not math.isfinite(loss_sum):
        return loss_sum, tokens                      # the caller stops; nothing of this step is applied
    if cfg.clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
    opt.step()
    sched.step()
    return loss_sum, tokens


def in_eval_mode(model, fn, *args):
    """fn(*args) with the model in eval mode and no gradients, then back in training mode."""
    model.eval()
    try:
        with torch.no_grad():
            return fn(*args)
    finally:
        model.train()


def validate_and_save(model, validate, best, step, out_dir, base_model, rank, log):
    """Run `validate` (in eval mode, no gradients); save best/ when the metric beats `best`; log
    it. Returns the best metric so far. A metric that is not finite is never best."""
    metric = float(in_eval_mode(model, validate, model))
    improved = math.isfinite(metric) and (best is None or metric > best)
    if improved:
        best = metric
        if rank == 0:
            save_best(model, out_dir, base_model, {"step": step, "metric": metric})
    if rank == 0:
        print(f"[train] step {step} validation {metric:.4f}{' (best, saved)' if improved else ''}"
              f"{' (not finite: never best)' if not math.isfinite(metric) else ''}", file=sys.stderr)
        log.write(json.dumps({"step": step, "validation": metric}) + "\n")
        log.flush()
    return best


def log_step(log, step, steps, start, loss, lr, tokens, elapsed):
    """One progress line on stderr (loss, rate, elapsed, eta) and one record in log.jsonl."""
    eta = elapsed / (step - start) * (steps - step)
    print(f"[train] step {step}/{steps} | loss {loss:.4f} | lr {lr:.2e} | {tokens / max(elapsed, 1e-9):.0f} tok/s | "
          f"elapsed {fmt_time(elapsed)} | eta {fmt_time(eta)}", file=sys.stderr)
    log.write(json.dumps({"step": step, "loss": loss, "lr": lr}) + "\n")
    log.flush()


def _train(model, examples, loss_fn, cfg, validate, resume, run_config, base_model, rank, world, params, opt, sched,
           settings, before_step) -> dict:
    start, best, pending = start_run(model, cfg, resume, run_config, rank, world, opt, sched, settings)
    model.grad_checkpoint = cfg.grad_checkpoint
    device_type = next(model.parameters()).device.type
    t0, tokens, step, saved_step = time.time(), 0, start, start
    in_validation = False
    log = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if rank == 0 else None

    def run_validation():                          # `in_validation`: for the interrupt handler below
        nonlocal best, in_validation
        in_validation = True
        best = validate_and_save(model, validate, best, step, cfg.out_dir, base_model, rank, log)
        in_validation = False

    model.train()
    rng_end = rng_state()
    try:
        if pending and validate is not None:         # the run was stopped inside this step's validation
            run_validation()
        while step < cfg.steps:
            if before_step is not None:
                in_eval_mode(model, before_step, step, model)
            idx = batch_indices(step, len(examples), cfg)[rank::world]
            loss_sum, n_tok = optimizer_step(model, examples, idx, loss_fn, cfg, params, opt, sched, world, device_type)
            tokens += n_tok
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"the training loss is {loss_sum} at step {step + 1}: the model or data gives "
                                         f"non-finite values; nothing of this step is saved (last checkpoint: step {saved_step})")
            step += 1
            rng_end = rng_state()          # what an interrupted run must resume from
            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
                log_step(log, step, cfg.steps, start, loss_sum, sched.get_last_lr()[0], tokens, time.time() - t0)
            if validate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                run_validation()
            if rank == 0 and (step % cfg.save_every == 0 or step == cfg.steps):
                save_checkpoint(cfg.out_dir, model, opt, sched, step, best, settings, rng_end)
                saved_step = step
        if validate is not None:
            run_validation()
        if rank == 0:
            save_trained(model, os.path.join(cfg.out_dir, "final"), base_model)
    except KeyboardInterrupt:
        # the adapter and optimizer still hold the end of `step`; a validation cut short runs again on resume
        if rank == 0:
            if step > saved_step or in_validation:
                save_checkpoint(cfg.out_dir, model, opt, sched, step, best, settings, rng_end, pending_validation=in_validation)
                print(f"[train] interrupted: checkpoint of step {step} saved in {cfg.out_dir}; continue with --resume",
                      file=sys.stderr)
            elif saved_step > 0:
                print(f"[train] interrupted: the checkpoint of step {saved_step} in {cfg.out_dir} is the latest; "
                      "continue with --resume", file=sys.stderr)
            else:
                print("[train] interrupted before step 1 ended: no checkpoint; start again without --resume", file=sys.stderr)
        raise
    finally:
        if log:
            log.close()
    model.eval()
    return {"steps": step, "best": best, "out_dir": cfg.out_dir, "elapsed_s": time.time() - t0}
