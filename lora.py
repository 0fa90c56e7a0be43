"""LoRA by hand: a wrapper around a base nn.Linear, injection by module-name suffix, explicit
merge/unmerge, and adapters saved and loaded alone in peft's layout.

    y = base(x) + dropout(x) @ A^T @ B^T * (alpha / r)      A: (r, in), B: (out, r)

A starts Kaiming-uniform (a = sqrt(5), as nn.Linear and peft), B at zero, so a fresh adapter
changes nothing. Both live in the base weight's dtype and device. Nothing here changes
weights implicitly: train() / eval() only switch dropout; merge() and unmerge() are the only
calls that touch the base weight, and merging twice is a no-op.

peft layout (so adapters move between iclrec and peft + transformers both ways):
  adapter_model.safetensors   base_model.model.<module path>.lora_A.weight (r, in)
                              base_model.model.<module path>.lora_B.weight (out, r)
  adapter_config.json         {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout",
                               "target_modules", "base_model_name_or_path", ...}
Not supported (refused by name): DoRA, rsLoRA, biases, modules_to_save, layer subsets.

Reference: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685).
"""
import json
import math
import os

import torch
import torch.nn as nn

from fetch import atomic_path, write_json
from model import read_safetensors

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        w = base.weight
        self.base_layer = base
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_A = nn.Linear(base.in_features, r, bias=False, dtype=w.dtype, device=w.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, dtype=w.dtype, device=w.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.enabled = True

    def forward(self, x):
        y = self.base_layer(x)
        if self.enabled and not self.merged:
            u = self.lora_A(self.dropout(x))                                   # (..., r)
            # y + u @ B^T * scaling as one addmm: no separate scale and add passes over y
            y = torch.addmm(y.reshape(-1, y.shape[-1]), u.reshape(-1, self.r), self.lora_B.weight.t(),
                            alpha=self.scaling).view(y.shape)
        return y

    def delta(self) -> torch.Tensor:
        """B @ A * scaling in fp32, (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self):
        if not self.merged and self.enabled:
            w = self.base_layer.weight
            w.copy_((w.float() + self.delta()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta()).to(w.dtype))
            self.merged = False


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def inject(model: nn.Module, targets=("q_proj", "v_proj"), r: int = 8, alpha: float = 16, dropout: float = 0.05) -> dict:
    """Wrap every nn.Linear whose name ends in one of `targets` and freeze everything else.
    Returns {module path: LoRALinear}. Each new module takes its base layer's train/eval mode, so
    an adapter loaded into an eval-mode model scores without dropout. Injecting into a model that
    has LoRA already is an error."""
    bad = [t for t in targets if t not in PROJECTIONS]
    if bad or not targets:
        raise ValueError(f"LoRA targets must be among {PROJECTIONS}, got {list(targets)}")
    if lora_modules(model):
        raise ValueError("this model already has LoRA adapters; injecting twice would stack two adapters")
    model.requires_grad_(False)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not found:
        raise ValueError(f"no module of the model ends in {list(targets)}")
    for name, base in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = LoRALinear(base, r, alpha, dropout)
        wrapped.train(base.training)       # a new module starts in training mode; follow the base's mode
        wrapped.lora_A.weight.requires_grad_(True)
        wrapped.lora_B.weight.requires_grad_(True)
        setattr(parent, child, wrapped)
    model._lora_config = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(set(targets)))
    return lora_modules(model)


def merge(model):
    for m in lora_modules(model).values():
        m.merge()


def unmerge(model):
    for m in lora_modules(model).values():
        m.unmerge()


def set_enabled(model, enabled: bool):
    """Disabled adapters give the base model's outputs (a merged adapter is unmerged first)."""
    for m in lora_modules(model).values():
        if not enabled:
            m.unmerge()
        m.enabled = enabled


def lora_parameters(model):
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def adapter_params(model) -> dict[str, nn.Parameter]:
    """The adapter's parameters under peft's tensor names."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.weight
        out[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.weight
    return out


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's names, detached and contiguous, for saving."""
    return {k: p.detach().contiguous() for k, p in adapter_params(model).items()}


def save_adapter(model, out_dir: str, base_model: str = ""):
    """Write adapter_model.safetensors + adapter_config.json (peft layout), atomically per file."""
    from safetensors.torch import save_file
    if not lora_modules(model):
        raise ValueError("the model has no LoRA adapter to save")
    os.makedirs(out_dir, exist_ok=True)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
           **model._lora_config, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
           "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
           "layers_to_transform": None, "lora_bias": False}
    with atomic_path(os.path.join(out_dir, "adapter_model.safetensors")) as tmp:
        save_file(adapter_state(model), tmp, metadata={"format": "pt"})
    write_json(cfg, os.path.join(out_dir, "adapter_config.json"))


_REFUSED = {"use_dora": True, "use_rslora": True, "fan_in_fan_out": True}


def read_adapter_config(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json")
    with open(path) as f:
        try:
            cfg = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1 or isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{path}: r must be an integer >= 1 and lora_alpha a number (got {r!r}, {alpha!r})")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for k, v in _REFUSED.items():
        if cfg.get(k) == v:
            raise ValueError(f"{path}: {k}={v} is not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save") or cfg.get("layers_to_transform") is not None:
        raise ValueError(f"{path}: bias, modules_to_save and layers_to_transform are not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{path}: per-module rank_pattern / alpha_pattern are not supported")
    targets = cfg.get("target_modules")
    if isinstance(targets, str) or not targets or any(t not in PROJECTIONS for t in targets):
        raise ValueError(f"{path}: target_modules {targets!r} must be a list among {PROJECTIONS}")
    return cfg


def load_adapter(model, adapter_dir: str) -> dict:
    """Inject LoRA as adapter_config.json says and load its weights. Every tensor must fit the
    model (names and shapes); anything else is an error naming it. Returns the config."""
    cfg = read_adapter_config(adapter_dir)
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors")
    state = dict(read_safetensors(path))       # errors name the file
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: tensor {bad[0]} holds NaN or infinite values")
    if not lora_modules(model):
        inject(model, cfg["target_modules"], cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0))
    expected = adapter_params(model)
    for k, v in state.items():
        if k not in expected:
            raise ValueError(f"{path}: tensor {k} does not fit this model (targets {cfg['target_modules']})")
        if v.shape != expected[k].shape:
            raise ValueError(f"{path}: tensor {k} has shape {tuple(v.shape)}, the model needs {tuple(expected[k].shape)}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{path}: missing adapter tensors, e.g. {missing[0]}")
    with torch.no_grad():
        for k, v in state.items():
            expected[k].copy_(v)
    return cfg
