"""Speed and memory of our model (fast.load: model.py plus the CPU speed layer) against HF
transformers, and against the plain model.py path, measured in the same run.

    python bench.py [--model DIR] [--runs 7] [--only prefill,decode,long,memory,bf16,lora]
    python bench.py --only lora,decode --without attention  # what one fast.py trick buys
    python bench.py --only packed [--pack 32]               # RecICL packed training vs one prompt per sample

Prints one JSON object per line:
  {"bench": NAME, "ours": MEDIAN, "peer": MEDIAN, "plain": MEDIAN, "unit": "s",
   "ratio": PEER/OURS, "plain_over_ours": PLAIN/OURS, "runs": N}
ratio > 1 means ours is faster (or smaller); plain_over_ours > 1 means the fast path pays.
With --without T1,T2 the extra column is ours without those tricks ("without_T1,T2").

How: each side runs in its own worker process that imports only its own stack (ours and
plain: torch, safetensors, tokenizers, numpy; the peer: transformers), because importing
transformers slows other code in the same process (measured: our 512-token prefill 0.88 s ->
1.00 s after `import transformers`). The parent sends the workers the same job in turn, run by
run, so drift on a noisy machine hits all alike; each worker times only the job itself. One
warm-up run each, then the median of `runs`. All sides: fp32, same thread count, same model
directory, same token ids; outputs are compared before timing.

  prefill_512        one 512-token prompt, logits of the last position (the peer also computes
                     only the last position: logits_to_keep=1)
  decode_128         greedy decoding of 128 new tokens after a 64-token prompt with the cache
                     (both without EOS, so both make exactly 128 tokens)
  decode_pos2000_vs_100   ours only: 32 decode steps at position 2000 ("ours") and at position
                     100 ("peer"); ratio = speed at 2000 / speed at 100
  load_peak_rss      peak resident memory added by loading the model (VmHWM after minus VmRSS
                     before, in a fresh process); ours_over_weights = ours / weight bytes
  decode_128_bf16    ours in bfloat16 ("ours") against ours in float32 ("peer")
  lora_step_512      one LoRA training step (r 8 on q_proj, v_proj; one 512-token sequence, last 8
                     tokens supervised; forward, backward, AdamW) against transformers + peft;
                     lora_step_512_peak_rss: peak resident memory during a step, above the
                     worker's size before loading the model (weights + activations + state);
                     lora_step_512_kernels: one profiled step per side, seconds in GEMM and
                     attention kernels, and the ratio ceiling those kernels leave (see kernel_seconds)
  recicl_packed_step one LoRA training step on the same --pack samples in recicl.py's blocks layout,
                     packed into one sequence ("ours") against one prompt per sample ("peer");
                     not in the default --only (it loads MovieLens-100K)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT_512 = [100 + (i * 7919) % 39000 for i in range(512)]
PROMPT_64 = [100 + (i * 104729) % 39000 for i in range(64)]


# ----------------------------------------------------------------------------- workers

def rss(name="VmRSS:"):
    for line in open("/proc/self/status"):
        if line.startswith(name):
            return int(line.split()[1]) * 1024


def rss_step_peak(fn, baseline):
    """Run fn; return (result, peak resident bytes during it above `baseline`, the process's
    size after its imports and before loading the model). The kernel's high-water mark is
    reset first (/proc/self/clear_refs, Linux), so the peak is that of this call, and it
    counts the model's weights once whether they were read eagerly or are paged in lazily."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = fn()
    return out, rss("VmHWM:") - baseline


def load_ours(side: str, model_dir: str, dtype, without):
    """side "ours": fast.load (without the tricks named); "plain": model.load (from --plain-code's
    checkout, if given: there, before fast.py existed, load returned (model, tokenizer))."""
    if side == "plain":
        import model
        m = model.load(model_dir, dtype=dtype)
        return m[0] if isinstance(m, tuple) else m
    import fast
    return fast.load(model_dir, dtype=dtype, without=without)


def lora_worker(side: str, model_dir: str, without=()):
    """One LoRA training step: r 8, alpha 16, dropout 0 on q_proj and v_proj, one 512-token
    sequence whose last 8 tokens are supervised, AdamW, fp32."""
    import torch
    ids = torch.tensor([PROMPT_512])
    if side in ("ours", "plain"):
        import lora
        baseline = rss()
        m = load_ours(side, model_dir, torch.float32, without)
        lora.inject(m, ("q_proj", "v_proj"), r=8, alpha=16, dropout=0.0)
        params = lora.lora_parameters(m)
        sup = torch.zeros_like(ids, dtype=torch.bool)
        sup[:, -9:-1] = True                                  # position t predicts token t+1
        targets = torch.roll(ids, -1, 1)

        def loss_fn():
            return m.loss(ids, targets, sup)
    else:
        import peft
        from transformers import AutoModelForCausalLM
        baseline = rss()
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        m = peft.get_peft_model(m, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
        params = [p for p in m.parameters() if p.requires_grad]
        labels = torch.full_like(ids, -100)
        labels[:, -8:] = ids[:, -8:]                          # HF shifts: the same 8 predictions

        def loss_fn():
            return m(input_ids=ids, labels=labels).loss
    m.train()
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return round(loss.item(), 3)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "kernels":
            print(json.dumps({"t": 0.0, "out": kernel_seconds(step)}), flush=True)
            continue
        t0 = time.perf_counter()
        out, peak = rss_step_peak(step, baseline)
        print(json.dumps({"t": time.perf_counter() - t0, "out": out, "peak": peak}), flush=True)


def packed_worker(side: str, model_dir: str, pack: int):
    """RecICL training in the blocks layout, one LoRA step (r 8 on q_proj, v_proj, dropout 0,
    AdamW) over the same `pack` consecutive samples of one MovieLens-100K user (K = 4, 3 liked
    titles per block): side "packed" as one packed sequence, side "single" as one prompt per
    sample (a micro-batch of 1 each, gradients summed, as the trainer's default does)."""
    import torch
    import data
    import fast
    import lora
    import recicl
    from tokenizer import load_tokenizer
    m = fast.load(model_dir)
    tok = load_tokenizer(model_dir, m.args)
    d = data.load(verbose=False)
    samples = data.recicl_samples(d, 10, 4.0, k_demos=4, max_history=10)
    user = next(u for u in range(len(d.user_ids)) if sum(s.user == u and s.period < 5 for s in samples) >= 40 + pack)
    run = [s for s in samples if s.user == user and s.period < 5][40:40 + pack]
    bp = recicl.BlockPrompter(d, samples, tok, 4, 3, m.args.max_seq_len)
    loss_fn = recicl.make_loss_fn(bp, recicl.answer_ids(tok))
    torch.manual_seed(0)
    lora.inject(m, ("q_proj", "v_proj"), r=8, alpha=16, dropout=0.0)
    opt = torch.optim.AdamW(lora.lora_parameters(m), lr=1e-4)
    m.train()
    batches = [[run]] if side == "packed" else [[s] for s in run]

    def step():
        opt.zero_grad(set_to_none=True)
        total, tokens = 0.0, 0
        for b in batches:
            loss, n = loss_fn(m, b)
            (loss / len(batches)).backward()
            total, tokens = total + loss.item() / len(batches), tokens + n
        opt.step()
        return [round(total, 4), tokens]
    print(json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        t0 = time.perf_counter()
        out = step()
        print(json.dumps({"t": time.perf_counter() - t0, "out": out[0], "tokens": out[1]}), flush=True)


def kernel_seconds(step) -> dict:
    """Seconds of one profiled step spent inside the matrix-product kernels (aten::mm, addmm, bmm
    and their in-place forms; our attention backward is made of these) and torch's attention
    kernels (scaled_dot_product_*), self time. What is left is everything else."""
    from torch.profiler import profile
    with profile() as prof:
        step()
    gemm = attn = total = 0.0
    for e in prof.key_averages():
        total += e.self_cpu_time_total
        if e.key in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_"):
            gemm += e.self_cpu_time_total
        elif "scaled_dot_product" in e.key:
            attn += e.self_cpu_time_total
    return {"gemm": round(gemm / 1e6, 4), "attention": round(attn / 1e6, 4), "profiled_total": round(total / 1e6, 4)}


def worker(side: str, model_dir: str, dtype: str, without=(), pack: int = 32):
    """Read one job name per line from stdin; answer {"t": seconds, "out": ...} per line."""
    import torch
    if side.endswith("-lora"):
        return lora_worker(side[:-5], model_dir, without)
    if side in ("packed", "single"):
        return packed_worker(side, model_dir, pack)
    if side in ("ours", "plain"):
        import generate
        import model as llama
        m = load_ours(side, model_dir, getattr(torch, dtype), without)
        never = []

        def prefill():
            cache = llama.KVCache(m.args, 1, len(PROMPT_512), generate.model_dtype(m))
            return m.head(m(torch.tensor([PROMPT_512]), cache=cache)[:, -1])[0]

        def decode():
            return generate.generate(m, [PROMPT_64], max_new_tokens=128, eos_ids=never)[0]

        def decode_at(position, steps=32):
            ids = torch.tensor([[100 + (i * 7919) % 39000 for i in range(position)]])
            cache = llama.KVCache(m.args, 1, position + steps, generate.model_dtype(m))
            m(ids, cache=cache)
            tok = torch.tensor([[1000]])
            t0 = time.perf_counter()
            for _ in range(steps):
                tok = m.head(m(tok, cache=cache)[:, -1]).argmax(-1, keepdim=True)
            return time.perf_counter() - t0
        jobs = {"prefill": prefill, "decode": decode, "pos100": lambda: decode_at(100), "pos2000": lambda: decode_at(2000)}
    else:
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        never = m.config.vocab_size + 1

        def prefill():
            return m(torch.tensor([PROMPT_512]), use_cache=True, logits_to_keep=1).logits[0, -1]

        def decode():
            out = m.generate(torch.tensor([PROMPT_64]), attention_mask=torch.ones(1, 64, dtype=torch.long),
                             max_new_tokens=128, do_sample=False, eos_token_id=never, pad_token_id=0)
            return out[0, 64:].tolist()
        jobs = {"prefill": prefill, "decode": decode}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = line.strip()
        with torch.no_grad():
            t0 = time.perf_counter()
            out = jobs[job]()
            t = time.perf_counter() - t0
        if job.startswith("pos"):
            t, out = out, None                       # the job timed its own decode steps
        elif isinstance(out, torch.Tensor):
            out = out.float().topk(5).indices.tolist()  # compared across sides
        print(json.dumps({"t": t, "out": out}), flush=True)


class Worker:
    def __init__(self, side, model_dir, dtype="float32", extra=()):
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", side, "--model", model_dir,
                                   "--dtype", dtype, *extra], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=HERE)
        self._read()

    def _read(self):
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError("benchmark worker died (see its error output above)")
            if line.startswith("{"):
                return json.loads(line)

    def __call__(self, job):
        self.p.stdin.write(job + "\n")
        self.p.stdin.flush()
        return self._read()

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def compare(name, a: Worker, b: Worker, job_a: str, job_b: str, runs: int, alt: Worker | None = None,
            alt_name: str = "plain", **extra):
    """Warm up both (all three with `alt`), check their outputs agree, then alternate a/b(/alt)
    `runs` times. With alt (the plain model, or ours without one trick) the row also gives
    alt's median and alt / ours (above 1: what the fast path, or that trick, buys)."""
    out_a, out_b = a(job_a)["out"], b(job_b)["out"]
    same = out_a == out_b
    if alt is not None:
        same = same and alt(job_a)["out"] == out_a
    ra, rb, rc = [], [], []
    for _ in range(runs):
        ra.append(a(job_a))
        rb.append(b(job_b))
        if alt is not None:
            rc.append(alt(job_a))
    ours, peer = statistics.median(r["t"] for r in ra), statistics.median(r["t"] for r in rb)
    row = {"bench": name, "ours": round(ours, 4), "peer": round(peer, 4), "unit": "s", "ratio": round(peer / ours, 3)}
    if alt is not None:
        other = statistics.median(r["t"] for r in rc)
        row.update({alt_name: round(other, 4), f"{alt_name}_over_ours": round(other / ours, 3)})
    print(json.dumps({**row, "runs": runs, "same_output": same, **extra}), flush=True)
    if "peak" in ra[0]:
        po, pp = statistics.median(r["peak"] for r in ra), statistics.median(r["peak"] for r in rb)
        print(json.dumps({"bench": name + "_peak_rss", "ours": po, "peer": pp, "unit": "bytes",
                          "ratio": round(pp / po, 3), "runs": runs}), flush=True)
    return peer


# ----------------------------------------------------------------------------- memory

_RSS_SNIPPET = r"""
import sys, torch
from bench import rss
which, path = sys.argv[1], sys.argv[2]
if which == 'ours':
    import fast
    before = rss()
    m = fast.load(path)
else:
    from transformers import AutoModelForCausalLM
    before = rss()
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in m.parameters()}.values())
print(rss('VmHWM:') - before, weights)
"""


def peak_load(which, model_dir):
    out = subprocess.run([sys.executable, "-c", _RSS_SNIPPET, which, model_dir], capture_output=True, text=True,
                         cwd=HERE, check=True).stdout.split()
    return int(out[-2]), int(out[-1])


def bench_load_memory(model_dir, runs):
    ours = [peak_load("ours", model_dir) for _ in range(runs)]
    peer = [peak_load("peer", model_dir) for _ in range(runs)]
    o, w, p = statistics.median(x[0] for x in ours), ours[0][1], statistics.median(x[0] for x in peer)
    print(json.dumps({"bench": "load_peak_rss", "ours": o, "peer": p, "unit": "bytes", "ratio": round(p / o, 3),
                      "runs": runs, "weights": w, "ours_over_weights": round(o / w, 3),
                      "note": "the peer maps the safetensors file lazily; its weights are paged in on first use"}), flush=True)


# ----------------------------------------------------------------------------- benches

def bench_inference(which, model_dir, runs, alt_spec):
    """prefill_512 and decode_128 (ours, the peer, the extra column), decode_pos2000_vs_100."""
    alt_side, alt_extra, alt_name = alt_spec
    ours = Worker("ours", model_dir)
    if which & {"prefill", "decode"}:
        peer, alt = Worker("peer", model_dir), Worker(alt_side, model_dir, extra=alt_extra)
        if "prefill" in which:
            compare("prefill_512", ours, peer, "prefill", "prefill", runs, alt, alt_name)
        if "decode" in which:
            compare("decode_128", ours, peer, "decode", "decode", runs, alt, alt_name)
        peer.close(), alt.close()
    if "long" in which:
        compare("decode_pos2000_vs_100", ours, ours, "pos2000", "pos100", runs,
                note="ours = 32 steps at position 2000, peer = ours at position 100")
    ours.close()


def bench_lora(model_dir, runs, alt_spec):
    """lora_step_512 (ours, the peer, the extra column), its peak memory and its kernel seconds."""
    alt_side, alt_extra, alt_name = alt_spec
    ours, peer = Worker("ours-lora", model_dir), Worker("peer-lora", model_dir)
    alt = Worker(alt_side + "-lora", model_dir, extra=alt_extra)
    peer_t = compare("lora_step_512", ours, peer, "step", "step", runs, alt, alt_name,
                     note="same_output compares the first step's loss (3 decimals)")
    alt.close()
    ko, kp = ours("kernels")["out"], peer("kernels")["out"]
    floor = ko["gemm"] + ko["attention"]
    print(json.dumps({"bench": "lora_step_512_kernels", "ours": ko, "peer": kp, "unit": "s",
                      "ratio_ceiling": round(peer_t / floor, 3),
                      "note": "one profiled step each; ratio_ceiling = the peer's median step / the seconds our "
                              "step spends in GEMM and attention kernels: the ratio no stack reaches without "
                              "doing fewer or faster products than ours"}), flush=True)
    ours.close(), peer.close()


def bench_bf16(model_dir, runs):
    bf16, fp32 = Worker("ours", model_dir, "bfloat16"), Worker("ours", model_dir)
    compare("decode_128_bf16", bf16, fp32, "decode", "decode", runs, note="ours bf16 vs ours fp32 (peer)")
    bf16.close(), fp32.close()


def bench_packed(model_dir, runs, pack):
    extra = ("--pack", str(pack))
    packed, single = Worker("packed", model_dir, extra=extra), Worker("single", model_dir, extra=extra)
    tokens = [packed("step")["tokens"], single("step")["tokens"]]
    compare("recicl_packed_step", packed, single, "step", "step", runs, tokens_packed=tokens[0],
            tokens_single=tokens[1], note=f"ours = {pack} samples as one packed sequence, peer = the same samples "
            "as one prompt each (--layout blocks --pack 0); ratio = samples per hour packed / one prompt each; "
            "same_output compares the first step's mean loss (4 decimals)")
    packed.close(), single.close()


# ----------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description="Speed and memory of our model against HF transformers and the plain model.py path (JSON lines).")
    ap.add_argument("--model", default=None, help="HF Llama directory (default: the default model)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--only", default="prefill,decode,long,memory,bf16,lora")
    ap.add_argument("--worker", choices=["ours", "plain", "peer", "ours-lora", "plain-lora", "peer-lora", "packed", "single"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--pack", type=int, default=32, help="--only packed: samples per pack (recicl.py's --pack)")
    ap.add_argument("--without", default="", help="a comma-separated list of fast.py tricks (attention, gemv): "
                    "the extra column is then ours without them instead of the plain model")
    ap.add_argument("--worker-without", default="", help=argparse.SUPPRESS)
    ap.add_argument("--plain-code", default=None, help="a checkout of an earlier commit: the plain column then runs "
                    "that checkout's model.py, generate.py and lora.py (`git worktree add DIR REV`), ours against "
                    "the earlier code in one run")
    a = ap.parse_args(argv)
    if a.worker and a.plain_code:
        sys.path.insert(0, os.path.abspath(a.plain_code))   # this worker imports the earlier code
    model_dir = a.model
    if model_dir is None:
        from convert_gguf import default_model_dir
        model_dir = default_model_dir()
    if a.worker:
        return worker(a.worker, model_dir, a.dtype, [t for t in a.worker_without.split(",") if t], a.pack)
    import torch
    which = set(a.only.split(","))
    print(json.dumps({"bench": "setup", "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "model": os.path.basename(os.path.normpath(model_dir))}), flush=True)
    if a.without:                                     # the extra column: ours without these tricks
        alt_side, alt_extra, alt_name = "ours", ["--worker-without", a.without], "without_" + a.without
    else:                                             # the extra column: the plain model.py path
        alt_side, alt_extra, alt_name = "plain", [], "plain"
        if a.plain_code:
            alt_extra, alt_name = ["--plain-code", a.plain_code], "earlier"
    alt = (alt_side, alt_extra, alt_name)
    if which & {"prefill", "decode", "long"}:
        bench_inference(which, model_dir, a.runs, alt)
    if "memory" in which:
        bench_load_memory(model_dir, a.runs)
    if "bf16" in which:
        bench_bf16(model_dir, a.runs)
    if "lora" in which:
        bench_lora(model_dir, a.runs, alt)
    if "packed" in which:
        bench_packed(model_dir, a.runs, a.pack)


if __name__ == "__main__":
    main()
