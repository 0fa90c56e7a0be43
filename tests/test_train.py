"""train.py: the schedule, exact resume after an interruption, torchrun data parallelism equal
to one process on the whole batch, gradient checkpointing, and a real learning test."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lora
import model as llama
import train as trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pattern_examples(n=32, length=12, seed=0):
    """Sequences counting up by a per-sequence stride mod 40, offset 50: learnable, not trivial."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start, stride = int(torch.randint(0, 40, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        out.append([50 + (start + stride * i) % 40 for i in range(length)])
    return out


def lm_loss(model, examples):
    idx = torch.tensor(examples)
    sup = torch.ones_like(idx, dtype=torch.bool)
    sup[:, :3] = False       # the first tokens fix the stride; supervise the rest
    sup[:, -1] = False
    return model.loss(idx, torch.roll(idx, -1, 1), sup), int(sup.sum())


def fresh(path, seed=0, dropout=0.1, targets=("q_proj", "v_proj")):
    m = llama.load(path)
    torch.manual_seed(seed)
    lora.inject(m, targets, r=4, alpha=8, dropout=dropout)
    return m


def test_lr_schedule_by_hand():
    cfg = trainer.TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert trainer.lr_factor(0, cfg) == pytest.approx(0.1)
    assert trainer.lr_factor(9, cfg) == pytest.approx(1.0)
    assert trainer.lr_factor(10, cfg) == pytest.approx(1.0)
    assert trainer.lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert trainer.lr_factor(110, cfg) == pytest.approx(0.1)


def test_batches_are_a_function_of_seed_and_step():
    cfg = trainer.TrainConfig(batch_size=5, seed=3)
    seen = [i for s in range(4) for i in trainer.batch_indices(s, 10, cfg)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))  # epochs
    assert trainer.batch_indices(2, 10, cfg) == trainer.batch_indices(2, 10, cfg)
    assert seen[:10] != seen[10:20]


def test_resume_after_interrupt_equals_uninterrupted(tiny_untied, tmp_path):
    path, _ = tiny_untied
    data = pattern_examples()
    cfg = dict(steps=6, batch_size=4, micro_batch=2, lr=5e-3, warmup_steps=2, save_every=1, seed=1)
    a = fresh(path)
    trainer.train(a, data, lm_loss, trainer.TrainConfig(out_dir=str(tmp_path / "a"), **cfg))

    calls = {"n": 0}

    def interrupted(model, ex):
        calls["n"] += 1
        if calls["n"] == 4 * 2 + 1:       # first micro-batch of step 5: like a Ctrl-C mid-step
            raise KeyboardInterrupt
        return lm_loss(model, ex)
    b = fresh(path)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(b, data, interrupted, trainer.TrainConfig(out_dir=str(tmp_path / "b"), **cfg))
    ck = json.load(open(tmp_path / "b" / "checkpoint.json"))
    assert ck["step"] == 4 and os.listdir(tmp_path / "b").count(ck["tensors"]) == 1
    torch.manual_seed(12345)                  # whatever the process did since, resume restores it
    c = fresh(path, seed=99)                  # a different initial adapter: the checkpoint replaces it
    trainer.train(c, data, lm_loss, trainer.TrainConfig(out_dir=str(tmp_path / "b"), **cfg), resume=True)
    sa, sc = lora.adapter_state(a), lora.adapter_state(c)
    assert all(torch.equal(sa[k], sc[k]) for k in sa)
    assert any(not torch.equal(sa[k], lora.adapter_state(fresh(path))[k]) for k in sa)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_full_fine_tuning_resumes_exactly_and_saves_a_model_transformers_reads(tmp_path, tie):
    """--full: every weight trained; an interrupted run resumes to the same weights, and final/ is
    a HF directory that transformers' LlamaForCausalLM and model.load read with this model's logits."""
    from conftest import make_tiny_dir
    from transformers import LlamaForCausalLM
    make_tiny_dir(tmp_path / "tiny", tie=tie)
    path = str(tmp_path / "tiny")
    data = pattern_examples()
    cfg = dict(steps=4, batch_size=4, micro_batch=2, lr=1e-3, warmup_steps=1, save_every=1, seed=1)

    def full():
        m = llama.load(path)
        trainer.make_trainable(m, None)
        return m
    a = full()
    trainer.train(a, data, lm_loss, trainer.TrainConfig(out_dir=str(tmp_path / "a"), **cfg))
    calls = {"n": 0}

    def interrupted(model, ex):
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 1:       # first micro-batch of step 3
            raise KeyboardInterrupt
        return lm_loss(model, ex)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(full(), data, interrupted, trainer.TrainConfig(out_dir=str(tmp_path / "b"), **cfg))
    c = full()
    trainer.train(c, data, lm_loss, trainer.TrainConfig(out_dir=str(tmp_path / "b"), **cfg), resume=True)
    base, pa, pc = dict(llama.load(path).named_parameters()), dict(a.named_parameters()), dict(c.named_parameters())
    assert all(torch.equal(pa[k], pc[k]) for k in pa)
    assert all(not torch.equal(pa[k], base[k]) for k in pa if k.endswith("proj.weight"))     # every matrix moved
    final = str(tmp_path / "a" / "final")
    assert trainer.adapter_dir(str(tmp_path / "a")) == final and trainer.is_saved(final)
    idx = torch.tensor(data[:2])
    with torch.no_grad():
        ours = a.head(a(idx))
        theirs = LlamaForCausalLM.from_pretrained(final).eval()(idx).logits.float()
        again = llama.load(final)
        reread = again.head(again(idx))
    assert (ours - theirs).abs().max() <= 1e-4 and torch.equal(ours, reread)


def test_validation_keeps_best_and_writes_files(tiny_untied, tmp_path):
    path, _ = tiny_untied
    m = fresh(path, dropout=0.0)
    scores = iter([0.3, 0.9, 0.5, 0.7])
    out = trainer.train(m, pattern_examples(), lm_loss, trainer.TrainConfig(out_dir=str(tmp_path / "r"), steps=4, batch_size=2,
                  eval_every=1, save_every=2), validate=lambda _: next(scores), run_config={"method": "test"})
    assert out["best"] == 0.9
    assert json.load(open(tmp_path / "r" / "best" / "metric.json")) == {"step": 2, "metric": 0.9}
    assert json.load(open(tmp_path / "r" / "config.json"))["method"] == "test"
    for f in ["best/adapter_model.safetensors", "final/adapter_config.json", "checkpoint.json", "log.jsonl"]:
        assert os.path.exists(tmp_path / "r" / f), f


def test_resume_refuses_other_settings_and_files_hold_no_pickle(tiny_untied, tmp_path):
    path, _ = tiny_untied
    cfg = dict(out_dir=str(tmp_path / "r"), steps=4, batch_size=2, save_every=1, lr=1e-3)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(fresh(path), pattern_examples(), interrupt_at(3), trainer.TrainConfig(**cfg), run_config={"args": {"lr": 1e-3}})
    for name in os.listdir(tmp_path / "r"):                           # JSON, safetensors, text: no pickle
        if os.path.isfile(tmp_path / "r" / name):
            assert not (tmp_path / "r" / name).read_bytes().startswith(b"\x80"), name
    with pytest.raises(ValueError, match=r"other settings: train.lr 0.001 -> 0.01"):
        trainer.train(fresh(path), pattern_examples(), lm_loss, trainer.TrainConfig(**{**cfg, "lr": 1e-2}), resume=True,
                run_config={"args": {"lr": 1e-3}})
    with pytest.raises(ValueError, match=r"args.train_rows None -> 8"):
        trainer.train(fresh(path), pattern_examples(), lm_loss, trainer.TrainConfig(**cfg), resume=True,
                run_config={"args": {"lr": 1e-3, "train_rows": 8}})
    ck = json.load(open(tmp_path / "r" / "checkpoint.json"))
    with open(tmp_path / "r" / ck["tensors"], "r+b") as f:             # a damaged tensor file is refused
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    with pytest.raises(ValueError, match="does not match its SHA-256"):
        trainer.train(fresh(path), pattern_examples(), lm_loss, trainer.TrainConfig(**cfg), resume=True, run_config={"args": {"lr": 1e-3}})


def interrupt_at(call):
    calls = {"n": 0}

    def loss(model, ex):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return lm_loss(model, ex)
    return loss


def test_non_finite_loss_stops_and_nan_validation_is_never_best(tiny_untied, tmp_path):
    path, _ = tiny_untied
    cfg = dict(steps=3, batch_size=2, save_every=1)

    def nan_at_step_2(model, ex, calls={"n": 0}):
        calls["n"] += 1
        loss, n = lm_loss(model, ex)
        return (loss * float("nan") if calls["n"] == 3 else loss), n     # step 2, first micro-batch
    with pytest.raises(FloatingPointError, match="loss is nan at step 2"):
        trainer.train(fresh(path), pattern_examples(), nan_at_step_2, trainer.TrainConfig(out_dir=str(tmp_path / "n"), **cfg))
    assert json.load(open(tmp_path / "n" / "checkpoint.json"))["step"] == 1
    assert not os.path.exists(tmp_path / "n" / "final")
    out = trainer.train(fresh(path), pattern_examples(), lm_loss, trainer.TrainConfig(out_dir=str(tmp_path / "v"), eval_every=1, **cfg),
                  validate=lambda m: float("nan"))
    assert out["best"] is None and not os.path.exists(tmp_path / "v" / "best")


def test_one_run_per_directory_and_interrupted_validation_runs_again(tiny_untied, tmp_path):
    path, _ = tiny_untied
    cfg = trainer.TrainConfig(out_dir=str(tmp_path / "r"), steps=2, batch_size=2, save_every=1, eval_every=1)
    held = trainer.RunLock(str(tmp_path / "r"))
    with pytest.raises(RuntimeError, match="in use by another run"):
        trainer.train(fresh(path), pattern_examples(), lm_loss, cfg)
    held.release()
    seen = []

    def validate(m):
        seen.append(len(seen))
        if len(seen) == 1:
            raise KeyboardInterrupt                # Ctrl-C inside the first validation (step 1)
        return 0.5
    with pytest.raises(KeyboardInterrupt):
        trainer.train(fresh(path), pattern_examples(), lm_loss, cfg, validate=validate)
    ck = json.load(open(tmp_path / "r" / "checkpoint.json"))
    assert ck["step"] == 1 and ck["pending_validation"] is True
    out = trainer.train(fresh(path), pattern_examples(), lm_loss, cfg, validate=validate, resume=True)
    assert json.load(open(tmp_path / "r" / "best" / "metric.json"))["step"] == 1   # step 1's validation ran
    assert out["best"] == 0.5 and len(seen) == 3                        # step 1 again, then the end (step 2)


def test_tiny_model_learns_the_pattern(tiny_untied, tmp_path):
    path, _ = tiny_untied
    m = fresh(path, dropout=0.0, targets=lora.PROJECTIONS)
    data = pattern_examples(64)
    with torch.no_grad():
        start = lm_loss(m, data)[0].item()
    trainer.train(m, data, lm_loss, trainer.TrainConfig(out_dir=str(tmp_path / "l"), steps=150, batch_size=8, lr=3e-2,
                                            warmup_steps=5, save_every=1000, log_every=50))
    with torch.no_grad():
        end = lm_loss(m, data)[0].item()
    assert end < 0.35 * start, (start, end)


def test_grad_checkpoint_and_bf16_autocast(tiny_untied):
    path, _ = tiny_untied
    m = fresh(path, dropout=0.0)
    m.train()
    grads = []
    for ckpt in (False, True):
        m.grad_checkpoint = ckpt
        for p in lora.lora_parameters(m):
            p.grad = None
        randB = lora.lora_modules(m)["model.layers.0.self_attn.q_proj"].lora_B.weight
        with torch.no_grad():
            randB.fill_(0.01)
        lm_loss(m, pattern_examples(4))[0].backward()
        grads.append([p.grad.clone() for p in lora.lora_parameters(m)])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm_loss(m, pattern_examples(4))[0]
    assert torch.isfinite(loss) and loss.dtype == torch.float32


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import lora, model as llama, train as trainer
    from test_train import pattern_examples, lm_loss
    m = llama.load({path!r})
    torch.manual_seed(0)
    lora.inject(m, ("q_proj", "v_proj"), r=4, alpha=8, dropout=0.0)
    trainer.train(m, pattern_examples(), lm_loss, trainer.TrainConfig(out_dir={out!r}, steps=2, batch_size=4, micro_batch=1,
            lr=1e-2, warmup_steps=1, save_every=100))
    if int(os.environ.get("RANK", "0")) == 0:
        lora.save_adapter(m, os.path.join({out!r}, "adapter"))
    trainer.dist_close()
""")


SIGTERM_SCRIPT = textwrap.dedent("""
    import argparse, os, sys, time, torch
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import lora, model as llama, train as trainer
    from test_train import pattern_examples, lm_loss
    calls = {{"n": 0}}

    def loss(model, ex):                  # a call a micro-batch, two a step: the third call is in step 2;
        calls["n"] += 1                   # it tells the test so and waits for the signal
        if calls["n"] == 3:
            open(os.path.join({out!r}, "in-step-2"), "w").close()
            time.sleep(120)
        return lm_loss(model, ex)

    def cmd_train(a):
        m = llama.load({path!r})
        torch.manual_seed(0)
        lora.inject(m, ("q_proj", "v_proj"), r=4, alpha=8, dropout=0.0)
        trainer.train(m, pattern_examples(), loss, trainer.TrainConfig(out_dir=os.path.join(a.out, "m"), steps=10, batch_size=2,
                      save_every=100))
    trainer.run_cli({{"train": cmd_train}}, argparse.Namespace(cmd="train", out={out!r}))
""")


def test_sigterm_saves_a_checkpoint_like_ctrl_c(tiny_untied, tmp_path):
    """A run started in the background from a script ignores SIGINT, so `kill` (SIGTERM) is how
    it is stopped: it must save the finished steps and exit as Ctrl-C does, not die unsaved."""
    import signal
    import time
    path, _ = tiny_untied
    out = tmp_path / "run"
    out.mkdir()
    script = tmp_path / "run.py"
    script.write_text(SIGTERM_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), path=path, out=str(out)))
    p = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.time() + 120
    while not (out / "in-step-2").exists():
        assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else "no step 2"
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)                 # ignored, as in a background run
    time.sleep(0.5)
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130, err[-3000:]
    assert "checkpoint of step 1 saved" in err             # the finished step; step 2 runs again on --resume
    assert json.load(open(out / "m" / "checkpoint.json"))["step"] == 1


def test_torchrun_two_processes_equal_one(tiny_untied, tmp_path):
    path, _ = tiny_untied
    outs = {}
    for name, launcher in [("one", [sys.executable]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])]:
        script = tmp_path / f"{name}.py"
        script.write_text(DDP_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), path=path, out=str(tmp_path / name)))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        r = subprocess.run(launcher + [str(script)], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        from safetensors.torch import load_file
        outs[name] = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    assert json.load(open(tmp_path / "two" / "config.json"))["world_size"] == 2
    for k in outs["one"]:
        assert torch.allclose(outs["one"][k], outs["two"][k], atol=1e-6, rtol=1e-5), k
    assert any(outs["one"][k].abs().max() > 0 for k in outs["one"] if "lora_B" in k)
