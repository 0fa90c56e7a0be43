"""Speed and memory of model.py against HF transformers, measured in the same run.

    python bench.py [--model DIR] [--runs 5] [--only prefill,decode,...]

Prints one JSON object per line:
  {"bench": NAME, "ours": MEDIAN, "peer": MEDIAN, "unit": "s", "ratio": PEER/OURS, "runs": N}
ratio > 1 means ours is faster (or smaller). Benchmarks without a peer print "peer": null.
Each timing is the median of `runs` repetitions after one warm-up, ours and the peer
alternating run by run; both sides run fp32 on the
same torch thread count, the same model directory and the same token ids.

  prefill_512        one 512-token prompt into an empty cache, logits of the last position
                     (the peer also computes only the last position: logits_to_keep=1)
  decode_128         greedy decoding of 128 new tokens after a 64-token prompt with the cache
                     (both sides with no EOS, so both make exactly 128 tokens)
  decode_pos2000_vs_100   ours only: time for 32 decode steps at position 2000 over the same
                     at position 100 ("ratio" = speed at 2000 / speed at 100)
  load_peak_rss      peak resident memory added by loading the model, in a fresh process,
                     over the size of its weights ("ours" and "peer" in bytes, "ratio" = peer/ours;
                     "ours_over_weights" = ours / weight bytes)
  decode_128_bf16    ours in bfloat16 against ours in float32 ("peer" = ours fp32)
Needs transformers (requirements-test.txt); the peer is imported only here.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import model as M


def timeit(fn_ours, fn_peer, runs: int) -> tuple[float, float]:
    """Median seconds of each, the two interleaved run by run so drift hits both alike."""
    fn_ours(), fn_peer()  # warm-up
    ours, peer = [], []
    for _ in range(runs):
        for fn, out in ((fn_ours, ours), (fn_peer, peer)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(ours), statistics.median(peer)


def emit(name, ours, peer, runs, unit="s", **extra):
    ratio = None if peer is None else peer / ours
    print(json.dumps({"bench": name, "ours": round(ours, 4), "peer": None if peer is None else round(peer, 4),
                      "unit": unit, "ratio": None if ratio is None else round(ratio, 3), "runs": runs, **extra}), flush=True)


def load_hf(model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


@torch.no_grad()
def bench_prefill(ours, hf, runs, n=512):
    ids = torch.randint(100, 40000, (1, n), generator=torch.Generator().manual_seed(0))

    def run_ours():
        cache = M.KVCache(ours.args, 1, n)
        return ours.head(ours(ids, cache=cache)[:, -1])

    def run_peer():
        return hf(ids, use_cache=True, logits_to_keep=1).logits

    assert (run_ours() - run_peer()[:, -1]).abs().max() < 1e-3
    emit("prefill_512", *timeit(run_ours, run_peer, runs), runs)


@torch.no_grad()
def bench_decode(ours, hf, runs, prompt_len=64, new=128, name="decode_128"):
    ids = torch.randint(100, 40000, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    never = ours.args.vocab_size + 1

    def run_ours():
        return M.generate(ours, [ids], max_new_tokens=new, eos_ids=[])[0]

    def run_peer():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, prompt_len, dtype=torch.long),
                          max_new_tokens=new, do_sample=False, eos_token_id=never, pad_token_id=0)
        return out[0, prompt_len:].tolist()

    a, b = run_ours(), run_peer()
    assert len(a) == len(b) == new
    emit(name, *timeit(run_ours, run_peer, runs), runs, same_tokens=a == b)


@torch.no_grad()
def decode_steps_time(m, position, steps=32):
    ids = torch.randint(100, 40000, (1, position), generator=torch.Generator().manual_seed(2))
    cache = M.KVCache(m.args, 1, position + steps)
    m(ids, cache=cache)
    tok = torch.tensor([[1000]])
    t0 = time.perf_counter()
    for _ in range(steps):
        h = m(tok, cache=cache)
        tok = m.head(h[:, -1]).argmax(-1, keepdim=True)
    return time.perf_counter() - t0


def bench_long_decode(ours, runs):
    t100 = statistics.median(decode_steps_time(ours, 100) for _ in range(runs))
    t2000 = statistics.median(decode_steps_time(ours, 2000) for _ in range(runs))
    print(json.dumps({"bench": "decode_pos2000_vs_100", "ours": round(t2000, 4), "peer": round(t100, 4), "unit": "s",
                      "ratio": round(t100 / t2000, 3), "runs": runs,
                      "note": "ours=32 steps at pos 2000, peer=ours at pos 100; ratio=speed@2000/speed@100"}), flush=True)


_RSS_SNIPPET = r"""
import sys, torch
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
which, path = sys.argv[1], sys.argv[2]
if which == 'ours':
    import model as M
    before = rss('VmRSS:')
    m, _ = M.load(path)
else:
    from transformers import AutoModelForCausalLM
    before = rss('VmRSS:')
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in m.parameters()}.values())
print(rss('VmHWM:') - before, weights)
"""


def peak_load(which, model_dir):
    """Peak RSS added by loading (VmHWM after minus VmRSS before), measured in a fresh process
    after its imports; and the loaded weights' bytes."""
    out = subprocess.run([sys.executable, "-c", _RSS_SNIPPET, which, model_dir], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.split()
    return int(out[-2]), int(out[-1])


def bench_load_memory(model_dir, runs):
    ours = [peak_load("ours", model_dir) for _ in range(runs)]
    peer = [peak_load("peer", model_dir) for _ in range(runs)]
    o, w = statistics.median(x[0] for x in ours), ours[0][1]
    p = statistics.median(x[0] for x in peer)
    emit("load_peak_rss", o, p, runs, unit="bytes", weights=w, ours_over_weights=round(o / w, 3))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF Llama directory (default: the default model)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", default="prefill,decode,long,memory,bf16")
    a = ap.parse_args(argv)
    model_dir = a.model
    if model_dir is None:
        from convert_gguf import default_model_dir
        model_dir = default_model_dir()
    which = set(a.only.split(","))
    print(json.dumps({"bench": "setup", "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "model": os.path.basename(os.path.normpath(model_dir))}), flush=True)
    ours, _ = M.load(model_dir)
    hf = load_hf(model_dir) if which & {"prefill", "decode"} else None
    if "prefill" in which:
        bench_prefill(ours, hf, a.runs)
    if "decode" in which:
        bench_decode(ours, hf, a.runs)
    if "long" in which:
        bench_long_decode(ours, a.runs)
    if "memory" in which:
        bench_load_memory(model_dir, a.runs)
    if "bf16" in which:
        ours_bf16, _ = M.load(model_dir, dtype=torch.bfloat16)
        bench_decode(ours_bf16, _Fp32Peer(ours), a.runs, name="decode_128_bf16")


class _Fp32Peer:
    """Lets bench_decode time ours-fp32 as the 'peer' of ours-bf16."""

    def __init__(self, m):
        self.m = m

    def generate(self, ids, max_new_tokens, **_):
        new = M.generate(self.m, [ids[0].tolist()], max_new_tokens=max_new_tokens, eos_ids=[])[0]
        return torch.cat([ids, torch.tensor([new])], dim=1)


if __name__ == "__main__":
    main()
