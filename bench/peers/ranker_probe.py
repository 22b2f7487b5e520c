#!/usr/bin/env python3
"""Ranker probe: does an independent trainer (HF transformers + PEFT on torch CPU) learn the
LlamaRec letter-ranking task on the Rust trainer's OWN examples, and how does a base model
(SmolLM2-135M, Gemma 3 270M, ... any GGUF transformers loads) rank untuned and after a short run?

Input: the JSONL that `llamarec train ranker --export-examples FILE` writes (the training
examples in the run's order with its seed and negatives, and the validation users with the
retriever's candidates and scores). Nothing here builds examples: they are the Rust trainer's.

  * Evaluation (validation users of the export): LLM alone = the logits of the candidates'
    letter tokens at the last prompt position (ranker-service/src/verbalizer.rs), ties count
    against the target; fused = common/src/fusion.rs exactly (f32 log-softmax of each side over
    the N candidates, (1-w) r + w l, ties keep the retriever's order), at w 0, .25, .5, .75, .9.
    Users whose target is not among the candidates are misses (no LLM call). NDCG@10 and
    Recall@10 over all users (and the valid subset). Eval runs in f32 with dropout off.
  * Training: PEFT LoRA with the recipe of ranker-service/training/ml-100k-all-linear/run.sh
    (r 8, alpha 32, dropout .05, q,k,v,o,gate,up,down; AdamW lr 1e-3 betas .9/.999 eps 1e-8
    wd 0, linear warm-up over 10 optimizer steps from lr/10 as the Rust trainer does (step/10),
    8 examples per step, global-norm clip 1.0; loss = cross-entropy of the full-vocabulary
    logits at the last prompt position against the answer letter's token), on the first N
    exported examples in order. Per example: loss, wall and process CPU seconds.

Tokens: with --tokens export (the default for the GGUF the export was made with) the exported
ids are fed as they are (the Rust tokenizer's ids); with --tokens hf the exported prompt TEXT
is tokenized by the GGUF's own tokenizer as transformers loads it (with its BOS when the
tokenizer adds one), and each letter's answer token is resolved as the Rust Verbalizer does:
tokenize(prompt + letter) must be tokenize(prompt) plus exactly one token, distinct per letter.

Writes --json (everything) and --md (tables). Run with target/peer-venv (bench/peers/setup.sh).
"""

import argparse
import datetime as _dt
import json
import math
import os
import platform
import resource
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="JSONL from `llamarec train ranker --export-examples`")
    p.add_argument("--gguf", required=True, help="the base model's GGUF file")
    p.add_argument("--name", required=True, help="label of this run in the outputs (e.g. smollm2-135m)")
    p.add_argument("--tokens", choices=["export", "hf"], default="export",
                   help="export: the Rust tokenizer's exported ids (only for the export's own GGUF); "
                        "hf: tokenize the exported text with the GGUF's tokenizer in transformers")
    p.add_argument("--train", type=int, default=0, help="training examples (the first N of the export, in order)")
    p.add_argument("--eval-at", default="0,end",
                   help="comma list of example counts at which to evaluate; 'end' = after the last (default 0,end)")
    p.add_argument("--no-eval", action="store_true", help="skip every evaluation (timing runs)")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop training at the first optimizer-step boundary after this many minutes since the start "
                        "(then the final evaluation runs as for 'end'); 0 = no limit")
    p.add_argument("--stop-file", default=None,
                   help="stop the same way as soon as this file exists (checked at optimizer-step boundaries)")
    p.add_argument("--rust-state", default=None,
                   help="a Rust run's checkpoint/trainer_state.json: check that the export follows that run "
                        "(random stream and prompt tokens after its examples, same recipe)")
    p.add_argument("--adapter", default=None,
                   help="start from this PEFT adapter directory (e.g. a Rust run's checkpoint/) instead of a fresh LoRA")
    p.add_argument("--loss-on", default=None,
                   help="START:END (0-based, END exclusive): before training, the forward-only loss (dropout off) of "
                        "these exported training examples, e.g. examples a Rust checkpoint has not seen yet")
    p.add_argument("--precision", choices=["f32", "bf16"], default="f32",
                   help="training forward/loss: f32, or torch.autocast('cpu', bfloat16) with f32 master weights")
    p.add_argument("--eval-precision", choices=["f32", "bf16"], default="f32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--seed", type=int, default=42, help="torch seed (LoRA A init, dropout masks)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--grad-accum", type=int, default=8)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--json", required=True, help="write the results here (rewritten after every evaluation)")
    p.add_argument("--md", default=None, help="write a markdown summary here")
    a = p.parse_args()
    a.targets = [t for t in a.targets.split(",") if t]
    return a


ARGS = parse_args()
# Before torch/transformers are imported (peer_env.py says why).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_env  # noqa: E402

peer_env.configure(ARGS.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

FUSION_WEIGHTS = [0.0, 0.25, 0.5, 0.75, 0.9]
KS = [1, 5, 10, 20]


T_START = time.perf_counter()


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ fusion.rs, exactly (f32)
def log_softmax_f32(xs):
    xs = [np.float32(x) for x in xs]
    m = np.float32(-np.inf)
    for x in xs:
        m = max(m, x)  # f32::max (no NaN here)
    s = np.float32(0.0)
    for x in xs:
        s = np.float32(s + np.float32(np.exp(np.float32(x - m))))
    log_sum = np.float32(m + np.float32(np.log(s)))
    return [np.float32(x - log_sum) for x in xs]


def fused_rank(retriever_scores, ranker_logits, w, target):
    assert len(retriever_scores) == len(ranker_logits)
    w = np.float32(w)
    r = log_softmax_f32(retriever_scores)
    l = log_softmax_f32(ranker_logits)
    one = np.float32(1.0)
    fused = [np.float32(np.float32((one - w) * a) + np.float32(w * b)) for a, b in zip(r, l)]
    t = fused[target]
    return 1 + sum(1 for i, s in enumerate(fused) if s > t or (s == t and i < target))


def llm_rank(logits, target):
    ts = logits[target]
    return 1 + sum(1 for i, s in enumerate(logits) if i != target and (s >= ts or math.isnan(s)))


class Acc:
    """TwoStageAccumulator: all users (None = miss) and the valid subset."""

    def __init__(self):
        self.ranks = []

    def add(self, rank):
        self.ranks.append(rank)

    def report(self, subset=False):
        ranks = [r for r in self.ranks if r is not None] if subset else self.ranks
        n = max(len(ranks), 1)
        out = {"users": len(ranks)}
        for k in KS:
            hit = [r for r in ranks if r is not None and r <= k]
            out[f"recall@{k}"] = len(hit) / n
            out[f"ndcg@{k}"] = sum(1.0 / math.log2(r + 1) for r in hit) / n
            out[f"mrr@{k}"] = sum(1.0 / r for r in hit) / n
        return out


# ------------------------------------------------------------------ data
def load_export(path):
    meta, train, val = None, [], []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            kind = rec.get("kind")
            if kind == "meta":
                meta = rec
            elif kind == "train":
                train.append(rec)
            elif kind == "validation":
                val.append(rec)
    if meta is None:
        raise SystemExit(f"{path}: no meta record")
    train.sort(key=lambda r: r["index"])
    assert [r["index"] for r in train] == list(range(len(train))), "training examples not contiguous"
    return meta, train, val


class Tokens:
    """Prompt ids and answer-token ids for each exported prompt, per --tokens."""

    def __init__(self, mode, meta, tokenizer):
        self.mode = mode
        self.tok = tokenizer
        self.letters = meta["letters"]
        self.checked = 0
        if mode == "export":
            self.letter_ids = [int(x) for x in meta["letter_token_ids"]]
        else:
            self.letter_ids = None  # resolved on the first prompt

    def prompt(self, rec):
        if self.mode == "export":
            return [int(x) for x in rec["ids"]]
        ids = self.tok(rec["text"], add_special_tokens=True)["input_ids"]
        if self.letter_ids is None or self.checked < 20:
            self._check_letters(rec["text"], ids)
        return ids

    def _check_letters(self, text, ids):
        got = []
        for letter in self.letters:
            with_letter = self.tok(text + letter, add_special_tokens=True)["input_ids"]
            if len(with_letter) != len(ids) + 1 or with_letter[: len(ids)] != ids:
                raise SystemExit(f"letter {letter!r} is not exactly one token after the prompt")
            got.append(with_letter[-1])
        if len(set(got)) != len(got):
            raise SystemExit("two letters share one answer token")
        if self.letter_ids is None:
            self.letter_ids = got
        elif got != self.letter_ids:
            raise SystemExit(f"letter tokens differ between prompts: {got} vs {self.letter_ids}")
        self.checked += 1


# ------------------------------------------------------------------ model
def last_logits(model, ids, bf16):
    x = torch.tensor([ids], dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids=x, use_cache=False, logits_to_keep=1)
    return out.logits[0, -1].float()


def evaluate(model, val, tokens, bf16):
    t0, c0 = time.perf_counter(), time.process_time()
    model.eval()
    llm, fused = Acc(), [Acc() for _ in FUSION_WEIGHTS]
    calls, ntok = 0, 0
    per_user = []
    with torch.inference_mode():
        for rec in val:
            t = rec["target_index"]
            if t is None:
                llm.add(None)
                for a in fused:
                    a.add(None)
                per_user.append(None)
                continue
            ids = tokens.prompt(rec)
            n = len(rec["candidates"])
            logits = last_logits(model, ids, bf16)
            scores = [float(np.float32(v)) for v in logits[tokens.letter_ids[:n]].tolist()]
            calls += 1
            ntok += len(ids)
            llm.add(llm_rank(scores, t))
            for a, w in zip(fused, FUSION_WEIGHTS):
                a.add(fused_rank(rec["retriever_scores"], scores, w, t))
            per_user.append(scores)
    return {
        "llm_all": llm.report(),
        "llm_valid_subset": llm.report(subset=True),
        "fused": [{"weight": w, "all": a.report()} for w, a in zip(FUSION_WEIGHTS, fused)],
        "llm_calls": calls,
        "mean_prompt_tokens": ntok / max(calls, 1),
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "letter_logits": per_user,
    }


def check_export(meta, train, val, state_path):
    """The export is the run's: same recipe, same random stream and prompt tokens after as many
    examples as the run saw, and every prompt shows the target's title at the label's letter."""
    with open(state_path) as f:
        st = json.load(f)
    out = {"state": state_path, "run_examples": st["examples"]}
    budget = ("max_examples", "max_minutes", "eval_every_steps", "checkpoint_every_steps", "backprop")
    a = {k: v for k, v in meta["config"].items() if k not in budget}
    b = {k: v for k, v in st["config"].items() if k not in budget}
    out["same_recipe"] = a == b
    out["recipe_differences"] = {k: [a.get(k), b.get(k)] for k in set(a) | set(b) if a.get(k) != b.get(k)}
    n = st["examples"]
    if n <= len(train):
        out["rng_after_run_examples_equal"] = train[n - 1]["rng_after"] == st["rng"]
        out["prompt_tokens_export"] = sum(len(r["ids"]) for r in train[:n])
        out["prompt_tokens_run"] = st["prompt_tokens"]
    bad = 0
    for rec in train + val:
        for i, title in enumerate(rec["candidate_titles"]):
            if f"({meta['letters'][i]}) {title[:12]}" not in rec["text"]:
                bad += 1
    out["candidate_title_letter_mismatches"] = bad
    labels = [r["label"] for r in train]
    out["label_histogram"] = [labels.count(i) for i in range(len(meta["letters"]))]
    ok = out["same_recipe"] and out.get("rng_after_run_examples_equal") and \
        out.get("prompt_tokens_export") == out.get("prompt_tokens_run")
    out["ok"] = bool(ok)
    log(f"export check against {state_path}: {'OK' if ok else 'MISMATCH'} {json.dumps({k: v for k, v in out.items() if k != 'label_histogram'})}")
    return out


def retriever_report(val):
    acc = Acc()
    for rec in val:
        t = rec["target_index"]
        acc.add(None if t is None else t + 1)
    return acc.report()


def short(ev):
    f = " ".join(f"w{w}:{x['all']['ndcg@10']:.4f}" for w, x in zip(FUSION_WEIGHTS, ev["fused"]))
    return (f"LLM alone N@10 {ev['llm_all']['ndcg@10']:.4f} R@10 {ev['llm_all']['recall@10']:.4f}; "
            f"fused N@10 {f} ({ev['llm_calls']} calls, {ev['seconds']:.0f} s)")


def write_md(path, res):
    a = res["args"]
    lines = [f"# ranker_probe: {a['name']}", "",
             f"GGUF `{a['gguf']}` (sha256 {res['gguf_sha256'][:16]}...), tokens: {a['tokens']}, "
             f"training precision {a['precision']}, eval precision {a['eval_precision']}, "
             f"{a['threads']} threads, {res['date_utc']}.", "",
             f"Retriever order on the same {res['retriever']['users']} validation users: "
             f"NDCG@10 {res['retriever']['ndcg@10']:.4f}, Recall@10 {res['retriever']['recall@10']:.4f}.", "",
             "| examples | LLM alone N@10 | LLM alone R@10 | "
             + " | ".join(f"fused w {w} N@10" for w in FUSION_WEIGHTS) + " | eval s |",
             "|---" * (4 + len(FUSION_WEIGHTS)) + "|"]
    for ev in res["evaluations"]:
        lines.append(f"| {ev['examples']} | {ev['llm_all']['ndcg@10']:.4f} | {ev['llm_all']['recall@10']:.4f} | "
                     + " | ".join(f"{x['all']['ndcg@10']:.4f}" for x in ev["fused"]) + f" | {ev['seconds']:.0f} |")
    tr = res["train"]
    if tr["examples"]:
        lines += ["", f"Training: {tr['examples']} examples, {tr['wall_s_per_example']:.2f} s and "
                  f"{tr['cpu_s_per_example']:.2f} CPU-s per example (mean prompt {tr['mean_prompt_tokens']:.0f} tokens), "
                  f"{tr['trainable_params']} trainable parameters.", "",
                  "| examples | mean loss (full vocabulary) | mean loss over the letters only |", "|---|---|---|"]
        losses = [e["loss"] for e in tr["per_example"]]
        letters = [e["letters_only_loss"] for e in tr["per_example"]]
        w = 40
        for i in range(0, len(losses), w):
            chunk, lc = losses[i:i + w], letters[i:i + w]
            lines.append(f"| {i + 1}-{i + len(chunk)} | {sum(chunk) / len(chunk):.3f} | {sum(lc) / len(lc):.3f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    a = ARGS
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    meta, train, val = load_export(a.export)
    log(f"export: {len(train)} training examples, {len(val)} validation users; recipe seed {meta.get('seed')}")
    if a.train > len(train):
        raise SystemExit(f"--train {a.train} > {len(train)} exported examples")
    eval_at = set()
    for x in a.eval_at.split(","):
        x = x.strip()
        if x == "end":
            eval_at.add(a.train)
        elif x:
            eval_at.add(int(x))
    if a.no_eval:
        eval_at = set()

    gguf_dir, gguf_name = os.path.split(os.path.abspath(a.gguf))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32,
                                                 attn_implementation=a.attn)
    model.config.use_cache = False
    load_s = time.perf_counter() - t0
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name) if a.tokens == "hf" else None
    tokens = Tokens(a.tokens, meta, tokenizer)
    log(f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params) in {load_s:.0f} s")

    res = {
        "probe": "ranker_probe",
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "args": vars(a),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": peer_env.cpu_info(),
        "load_average_before": list(os.getloadavg()),
        "gguf_sha256": peer_env.sha256_file(a.gguf),
        "export": {"path": a.export, "sha256": peer_env.sha256_file(a.export), "meta": {k: v for k, v in meta.items() if k != "kind"}},
        "model": {"class": type(model).__name__, "config": model.config.to_dict()},
        "load_s": load_s,
        "retriever": retriever_report(val),
        "export_check": check_export(meta, train, val, a.rust_state) if a.rust_state else None,
        "evaluations": [],
        "train": {"examples": 0, "per_example": [], "step_losses": []},
    }

    def save():
        res["rss_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        res["load_average_now"] = list(os.getloadavg())
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
        if a.md:
            write_md(a.md, res)

    def run_eval(done):
        ev = evaluate(model, val, tokens, a.eval_precision == "bf16")
        ev["examples"] = done
        res["evaluations"].append(ev)
        log(f"eval at {done} examples: {short(ev)}")
        save()

    from peft import LoraConfig, PeftModel, get_peft_model

    if a.adapter:
        model = PeftModel.from_pretrained(model, a.adapter, is_trainable=a.train > 0)
        res["adapter"] = {"path": a.adapter, "config": model.peft_config["default"].to_dict()}
        log(f"adapter {a.adapter} loaded")
    elif a.train > 0:
        cfg = LoraConfig(task_type="CAUSAL_LM", bias="none", r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                         target_modules=a.targets)
        model = get_peft_model(model, cfg)

    if a.loss_on:
        s0, s1 = (int(x) for x in a.loss_on.split(":"))
        model.eval()
        t0 = time.perf_counter()
        losses, letter_losses = [], []
        with torch.inference_mode():
            for rec in train[s0:s1]:
                ids = tokens.prompt(rec)
                logits = last_logits(model, ids, a.eval_precision == "bf16")
                answer = tokens.letter_ids[rec["label"]]
                losses.append(float(torch.nn.functional.cross_entropy(logits[None, :], torch.tensor([answer]))))
                lp = torch.log_softmax(logits[tokens.letter_ids[:rec["num_candidates"]]], -1)
                letter_losses.append(-float(lp[rec["label"]]))
        res["loss_on"] = {"range": [s0, s1], "mean": sum(losses) / len(losses), "losses": losses,
                          "letters_only_mean": sum(letter_losses) / len(letter_losses),
                          "seconds": time.perf_counter() - t0}
        log(f"forward-only loss on examples {s0}..{s1 - 1}: mean {res['loss_on']['mean']:.4f}")
        save()

    if a.train == 0:
        if 0 in eval_at:
            run_eval(0)
        res["letter_token_ids"] = tokens.letter_ids
        save()
        return

    params = [p for p in model.parameters() if p.requires_grad]
    assert params, 'no trainable parameters'
    n_trainable = sum(p.numel() for p in params)
    res["train"]["trainable_params"] = n_trainable
    res["train"]["trainable_tensors"] = len(params)
    log(f"LoRA r {a.r} alpha {a.alpha} on {a.targets}: {n_trainable} trainable params")
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    if 0 in eval_at:
        run_eval(0)
    bf16 = a.precision == "bf16"
    step, micro, micro_losses = 0, 0, []
    wall_train, cpu_train, ntok = 0.0, 0.0, 0
    opt.zero_grad(set_to_none=True)
    for i in range(a.train):
        rec = train[i]
        model.train()
        t, c = time.perf_counter(), time.process_time()
        ids = tokens.prompt(rec)
        answer = tokens.letter_ids[rec["label"]]
        if a.tokens == "export":
            assert answer == rec["answer_token"], "answer token differs from the export's"
        logits = last_logits(model, ids, bf16)
        loss = torch.nn.functional.cross_entropy(logits[None, :], torch.tensor([answer]))
        (loss / a.grad_accum).backward()
        value = float(loss.detach())
        with torch.no_grad():
            letter_ce = -float(torch.log_softmax(logits.detach()[tokens.letter_ids[:rec["num_candidates"]]], -1)[rec["label"]])
        micro += 1
        micro_losses.append(value)
        norm = None
        if micro == a.grad_accum or i + 1 == a.train:
            step += 1
            lr = a.lr * (min(step / a.warmup_steps, 1.0) if a.warmup_steps > 0 else 1.0)
            for g in opt.param_groups:
                g["lr"] = lr
            norm = float(torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)) if a.max_grad_norm > 0 else None
            opt.step()
            opt.zero_grad(set_to_none=True)
            res["train"]["step_losses"].append({"step": step, "mean_loss": sum(micro_losses) / len(micro_losses),
                                                "grad_norm": norm, "lr": lr})
            micro, micro_losses = 0, []
        dw, dc = time.perf_counter() - t, time.process_time() - c
        wall_train += dw
        cpu_train += dc
        ntok += len(ids)
        res["train"]["per_example"].append({"i": i, "loss": value, "letters_only_loss": letter_ce,
                                            "label": rec["label"], "tokens": len(ids),
                                            "wall_s": dw, "cpu_s": dc})
        done = i + 1
        res["train"].update(examples=done, steps=step, wall_s=wall_train, cpu_s=cpu_train,
                            wall_s_per_example=wall_train / done, cpu_s_per_example=cpu_train / done,
                            mean_prompt_tokens=ntok / done)
        if done % 8 == 0 or done == a.train:
            recent = [e["loss"] for e in res["train"]["per_example"][-50:]]
            log(f"example {done}/{a.train} step {step} loss {value:.3f} (last 50 {sum(recent) / len(recent):.3f}) "
                f"{dw:.2f} s wall {dc:.2f} CPU-s" + (f" |g| {norm:.3f}" if norm is not None else ""))
        stop = micro == 0 and done < a.train and (
            (a.max_minutes > 0 and time.perf_counter() - T_START > 60 * a.max_minutes)
            or (a.stop_file and os.path.exists(a.stop_file)))
        if done in eval_at or (stop and a.train in eval_at):
            run_eval(done)
        elif done % 8 == 0:
            save()
        if stop:
            res["train"]["stopped"] = f"budget or stop file after {done} of {a.train} examples"
            log(res["train"]["stopped"])
            break
    res["letter_token_ids"] = tokens.letter_ids
    save()


if __name__ == "__main__":
    main()
