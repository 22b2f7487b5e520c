#!/usr/bin/env python3
"""PyTorch peer benchmark for llamarec-serve (issues #15 item 1 and #16 item 5).

Times, on the project's own GGUF (dequantized to f32 by transformers' GGUF loader), the
project's own prompt ids and thread count:

  prefill   one forward pass over the prompt, last-position logits only
            (logits_to_keep=1: the 49152-wide head runs for the last position alone, as the
            project's Positions::Last does), f32 and under bf16 autocast;
  train     one PEFT LoRA training step (r 8, alpha 32, dropout 0.05, q_proj + v_proj; loss =
            cross-entropy of the full-vocabulary logits at the last prompt position against the
            answer token; forward + backward + AdamW step, lr 1e-4), f32 and bf16 autocast
            (master weights and optimizer state stay f32).

Each mode: warm-up, then the median of --iters runs (wall seconds; process CPU seconds beside).
Writes one JSON (--json) and prints a short summary. Run it with the venv that
bench/peers/setup.sh builds (target/peer-venv), outside the test command.
"""

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import time

LETTER_IDS = list(range(49, 69))  # "A".."T" in SmolLM2's vocabulary, the 20 candidate letters
DEFAULT_GGUF = "assets/models/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PROMPT = "bench/peers/movielens_prompt.json"
MODES = ("prefill_f32", "prefill_bf16", "train_f32", "train_bf16")
LORA = dict(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
LR = 1e-4


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=DEFAULT_GGUF, help=f"GGUF file (default {DEFAULT_GGUF})")
    p.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help='JSON {"ids": [...], "label_token": N} (default %(default)s)')
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    p.add_argument("--iters", type=int, default=5, help="timed runs per mode after warm-up (default 5)")
    p.add_argument("--train-iters", type=int, default=None,
                   help="timed steps per training mode (default: --iters); a bf16 step is slow without native bf16")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per mode first (default 1)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list out of " + ",".join(MODES))
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args()
    a.modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in a.modes if m not in MODES]
    if bad:
        p.error(f"unknown modes {bad}")
    if a.train_iters is None:
        a.train_iters = a.iters
    if a.iters < 1 or a.train_iters < 1 or a.threads < 1 or a.warmup < 0:
        p.error("--iters, --train-iters and --threads must be >= 1, --warmup >= 0")
    return a


ARGS = parse_args()
# Before torch/transformers are imported (peer_env.py says why).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_env  # noqa: E402

peer_env.configure(ARGS.threads)

import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


T_START = time.perf_counter()


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def rss_peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def mkldnn_bf16_supported():
    """oneDNN's own answer to "native bf16 here?" (False on AVX2-only CPUs: bf16 is emulated)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - private op, absent in some builds
        return None


def measure(fn, iters, warmup):
    """Runs fn warmup times untimed, then iters times; returns per-run wall and CPU seconds and
    whatever fn returned on its last run."""
    out = None
    for _ in range(warmup):
        out = fn()
    walls, cpus, outs = [], [], []
    for _ in range(iters):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        outs.append(out)
    return walls, cpus, outs


def summary(walls, cpus):
    return {
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "max_s": max(walls),
        "median_cpu_s": statistics.median(cpus),
        "samples_s": walls,
        "samples_cpu_s": cpus,
    }


def gemm_probe(m, k, n):
    """GFLOP/s of one (m x k) @ (k x n) matmul in f32 and bf16, measured now: shows what this
    CPU gives each dtype at the moment of the run (bf16 without native support is emulated)."""
    out = {"shape": [m, k, n]}
    for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        x, w = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
        x @ w
        calls, t0 = 0, time.perf_counter()
        while calls < 2 or time.perf_counter() - t0 < 0.5:
            x @ w
            calls += 1
        out[name + "_gflops"] = 2 * m * k * n * calls / (time.perf_counter() - t0) / 1e9
    return out


def load_prompt(path):
    with open(path) as f:
        p = json.load(f)
    ids = [int(x) for x in p["ids"]]
    label = int(p["label_token"])
    if not ids:
        raise SystemExit(f"{path}: empty ids")
    return ids, label, p


def main():
    a = ARGS
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    if not os.path.isfile(a.gguf):
        raise SystemExit(f"{a.gguf} not found: run `./target/release/llamarec fetch` first (puts it under assets/)")
    if not os.path.isfile(a.prompt):
        raise SystemExit(f"{a.prompt} not found: the prompt JSON {{\"ids\": [...], \"label_token\": N}} is needed")
    ids, label, _ = load_prompt(a.prompt)
    n = len(ids)
    input_ids = torch.tensor([ids], dtype=torch.long)

    result = {
        "bench": "torch_peer",
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_mkldnn_bf16_supported": mkldnn_bf16_supported(),
        "cpu": peer_env.cpu_info(),
        "env": {k: os.environ.get(k) for k in (
            "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
            "ATEN_CPU_CAPABILITY", "LD_PRELOAD")},
        "load_average_before": list(os.getloadavg()),
        "threads": a.threads,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "gguf": {"path": a.gguf, "sha256": peer_env.sha256_file(a.gguf), "dequantized_to": "float32"},
        "prompt": {"path": a.prompt, "sha256": peer_env.sha256_file(a.prompt), "tokens": n, "label_token": label},
        "attn_implementation": a.attn,
        "iters": a.iters,
        "train_iters": a.train_iters,
        "warmup": a.warmup,
        "prefill_head": "logits_to_keep=1 (lm_head on the last position only)",
        "modes": {},
        "checks": {},
    }

    result["gemm_probe"] = gemm_probe(n, 576, 1536)  # an MLP up-projection over the prompt
    log(f"gemm probe: f32 {result['gemm_probe']['f32_gflops']:.1f} GFLOP/s,"
        f" bf16 {result['gemm_probe']['bf16_gflops']:.1f} GFLOP/s")
    log(f"loading {a.gguf} (dequantizing to f32) ...")
    t0 = time.perf_counter()
    gguf_dir, gguf_name = os.path.split(os.path.abspath(a.gguf))
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, dtype=torch.float32, attn_implementation=a.attn)
    model.config.use_cache = False
    result["load_s"] = time.perf_counter() - t0
    result["rss_peak_mib_after_load"] = rss_peak_mib()
    assert all(p.dtype == torch.float32 for p in model.parameters()), "weights not f32"
    result["model"] = {
        "class": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "layers": model.config.num_hidden_layers,
        "hidden": model.config.hidden_size,
        "vocab": model.config.vocab_size,
        "tie_word_embeddings": bool(model.config.tie_word_embeddings),
    }
    vocab = model.config.vocab_size
    if not (0 <= label < vocab) or max(ids) >= vocab or min(ids) < 0:
        raise SystemExit("prompt ids / label_token out of the vocabulary")
    log(f"loaded in {result['load_s']:.1f} s; prompt {n} tokens, label {label}, threads {a.threads}")

    # ---------------------------------------------------------------- prefill
    model.eval()

    def prefill(bf16):
        def run():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
            return out.logits[0, -1].float()
        return run

    # Correctness: the last-position f32 logits are finite over the 20 letters, and
    # logits_to_keep=1 gives the same last row as the full head.
    ref_last = prefill(False)()
    with torch.inference_mode():
        full = model(input_ids=input_ids, use_cache=False).logits[0, -1].float()
    letters_f32 = ref_last[LETTER_IDS]
    assert torch.isfinite(letters_f32).all(), "non-finite letter logits (f32)"
    keep_diff = (full - ref_last).abs().max().item()
    assert keep_diff < 1e-3, f"logits_to_keep=1 differs from the full head by {keep_diff}"
    del full
    result["checks"]["prefill_f32_letter_logits"] = [round(x, 4) for x in letters_f32.tolist()]
    result["checks"]["prefill_f32_letter_argmax"] = LETTER_IDS[int(letters_f32.argmax())]
    result["checks"]["logits_to_keep_max_abs_diff"] = keep_diff

    for bf16 in (False, True):
        mode = "prefill_bf16" if bf16 else "prefill_f32"
        if mode not in a.modes:
            continue
        log(f"{mode}: {a.warmup} warm-up + {a.iters} runs ...")
        walls, cpus, outs = measure(prefill(bf16), a.iters, a.warmup)
        s = summary(walls, cpus)
        s["tok_per_s"] = n / s["median_s"]
        s["autocast"] = "bfloat16" if bf16 else None
        last = outs[-1][LETTER_IDS]
        assert torch.isfinite(last).all(), f"non-finite letter logits ({mode})"
        s["letter_logits_max_abs_diff_vs_f32"] = (last - letters_f32).abs().max().item()
        s["letter_argmax"] = LETTER_IDS[int(last.argmax())]
        result["modes"][mode] = s
        log(f"  {mode}: median {s['median_s']:.3f} s = {s['tok_per_s']:.0f} tok/s")
    result["rss_peak_mib_after_prefill"] = rss_peak_mib()

    # ---------------------------------------------------------------- LoRA training step
    train_modes = [m for m in ("train_f32", "train_bf16") if m in a.modes]
    if train_modes:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA)
        pm = get_peft_model(model, cfg)
        trainable = [(name, p) for name, p in pm.named_parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for _, p in trainable)
        c = model.config
        kv_out = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
        r = LORA["r"]
        expected = c.num_hidden_layers * ((r * c.hidden_size + c.hidden_size * r) + (r * c.hidden_size + kv_out * r))
        assert n_trainable == expected, f"trainable {n_trainable} != expected {expected}"
        assert all(("q_proj" in nm or "v_proj" in nm) and "lora_" in nm for nm, _ in trainable), \
            "trainable parameters outside the q_proj/v_proj LoRA"
        assert all(p.dtype == torch.float32 for _, p in trainable), "LoRA master weights not f32"
        result["lora"] = dict(LORA, lr=LR, optimizer="torch.optim.AdamW", trainable_params=n_trainable,
                              trainable_tensors=len(trainable),
                              expected_formula="layers x (r*576 + 576*r  +  r*576 + kv_out*r)")
        log(f"LoRA: {n_trainable} trainable params in {len(trainable)} tensors (q_proj/v_proj only)")
        init = {nm: p.detach().clone() for nm, p in trainable}
        target = torch.tensor([label])

        for mode in train_modes:
            bf16 = mode == "train_bf16"
            with torch.no_grad():  # each mode starts from the same adapter
                for nm, p in trainable:
                    p.copy_(init[nm])
            torch.manual_seed(a.seed)
            opt = torch.optim.AdamW([p for _, p in trainable], lr=LR)
            pm.train()
            phases = {"forward_s": [], "backward_s": [], "optimizer_s": []}
            losses = []

            def step():
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = pm(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits[:, -1, :]
                    loss = torch.nn.functional.cross_entropy(logits.float(), target)
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                opt.step()
                opt.zero_grad(set_to_none=True)
                t3 = time.perf_counter()
                phases["forward_s"].append(t1 - t0)
                phases["backward_s"].append(t2 - t1)
                phases["optimizer_s"].append(t3 - t2)
                losses.append(loss.item())
                return loss.item()

            log(f"{mode}: {a.warmup} warm-up + {a.train_iters} steps ...")
            walls, cpus, _ = measure(step, a.train_iters, a.warmup)
            assert all(map(lambda x: x == x and abs(x) != float("inf"), losses)), f"non-finite loss ({mode})"
            moved = max((p.detach() - init[nm]).abs().max().item() for nm, p in trainable)
            assert moved > 0, f"the optimizer did not change the adapter ({mode})"
            s = summary(walls, cpus)
            s["autocast"] = "bfloat16" if bf16 else None
            s["master_weights"] = "float32"
            s["tok_per_s"] = n / s["median_s"]
            timed = slice(a.warmup, None)
            s["phase_median_s"] = {k: statistics.median(v[timed]) for k, v in phases.items()}
            s["forward_backward_median_s"] = statistics.median(
                f + b for f, b in zip(phases["forward_s"][timed], phases["backward_s"][timed]))
            s["losses"] = losses  # warm-up step(s) first; same example every step, so it falls
            s["adapter_max_abs_change"] = moved
            result["modes"][mode] = s
            log(f"  {mode}: median {s['median_s']:.2f} s/step (fwd {s['phase_median_s']['forward_s']:.2f}"
                f" + bwd {s['phase_median_s']['backward_s']:.2f} + opt {s['phase_median_s']['optimizer_s']:.3f});"
                f" loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        result["rss_peak_mib_after_train"] = rss_peak_mib()

    result["rss_peak_mib"] = rss_peak_mib()
    result["load_average_after"] = list(os.getloadavg())
    result["wall_s_total"] = time.perf_counter() - T_START

    # ---------------------------------------------------------------- output
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        log(f"wrote {a.json}")
    fl = result["cpu"]["flags"]
    print(f"torch {torch.__version__} / transformers {transformers.__version__} / peft {peft.__version__};"
          f" {result['cpu']['model']}; capability {result['torch_cpu_capability']};"
          f" avx512_bf16 {fl['avx512_bf16']} amx_bf16 {fl['amx_bf16']}; threads {a.threads}; prompt {n} tokens")
    for m, s in result["modes"].items():
        if m.startswith("prefill"):
            print(f"  {m:13s} {s['median_s']:.3f} s  {s['tok_per_s']:6.0f} tok/s  (cpu {s['median_cpu_s']:.2f} s;"
                  f" letters max|d| vs f32 {s['letter_logits_max_abs_diff_vs_f32']:.3g})")
        else:
            ph = s["phase_median_s"]
            print(f"  {m:13s} {s['median_s']:.2f} s/step (fwd {ph['forward_s']:.2f} bwd {ph['backward_s']:.2f}"
                  f" opt {ph['optimizer_s']:.3f}; cpu {s['median_cpu_s']:.2f} s)")
    g = result["gemm_probe"]
    print(f"  gemm probe {g['shape']}: f32 {g['f32_gflops']:.1f} GFLOP/s, bf16 {g['bf16_gflops']:.1f} GFLOP/s;"
          f" oneDNN native bf16: {result['torch_mkldnn_bf16_supported']}")
    print(f"  rss peak {result['rss_peak_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
