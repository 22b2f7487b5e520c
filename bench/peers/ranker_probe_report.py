#!/usr/bin/env python3
"""Tables for docs/bench/ranker_probe/: the probe runs (ranker_probe.py JSONs) side by side, and
their training loss against the Rust trainer's over the same examples in the same order
(`step_losses` of a `llamarec train ranker` checkpoint: one mean per optimizer step of 8).

  python3 bench/peers/ranker_probe_report.py --rust ranker-service/training/ml-100k-all-linear/checkpoint/trainer_state.json \
      --run smollm2=docs/bench/ranker_probe/smollm2.json --run gemma3=docs/bench/ranker_probe/gemma3.json \
      --bucket 40 > docs/bench/ranker_probe/tables.md

Standard library only.
"""

import argparse
import json
import math


def ndcg10(rank):
    return 1.0 / math.log2(rank + 1) if rank is not None and rank <= 10 else 0.0


def log_softmax(xs):
    m = max(xs)
    s = sum(math.exp(x - m) for x in xs)
    return [x - m - math.log(s) for x in xs]


def paired_table(export, runs):
    """Per-user NDCG@10 differences against the retriever's order (paired over the same users):
    mean and standard error, from the letter logits each evaluation stored (fusion in f64 here,
    so exact ties may differ from the f32 rule in the last digit)."""
    val = []
    with open(export) as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "validation":
                val.append(r)
    base = [ndcg10(None if r["target_index"] is None else r["target_index"] + 1) for r in val]
    lines = ["### Paired differences against the retriever's order (NDCG@10, mean +- standard error over the same users)\n",
             "| model | examples | LLM alone - retriever | best fused w > 0 | fused - retriever |", "|---|---|---|---|---|"]
    for name, r in runs:
        for ev in r["evaluations"]:
            logits = ev.get("letter_logits")
            if not logits or len(logits) != len(val):
                continue
            best = max((x for x in ev["fused"] if x["weight"] > 0), key=lambda x: x["all"]["ndcg@10"])
            w = best["weight"]
            alone, fused = [], []
            for rec, lg in zip(val, logits):
                t = rec["target_index"]
                if t is None:
                    alone.append(0.0)
                    fused.append(0.0)
                    continue
                rank = 1 + sum(1 for i, x in enumerate(lg) if i != t and x >= lg[t])
                alone.append(ndcg10(rank))
                rl, ll = log_softmax(rec["retriever_scores"]), log_softmax(lg)
                fu = [(1 - w) * x + w * y for x, y in zip(rl, ll)]
                frank = 1 + sum(1 for i, x in enumerate(fu) if x > fu[t] or (x == fu[t] and i < t))
                fused.append(ndcg10(frank))

            def ms(xs):
                d = [x - b for x, b in zip(xs, base)]
                m = sum(d) / len(d)
                sd = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1))
                return f"{m:+.4f} +- {sd / math.sqrt(len(d)):.4f}"
            lines.append(f"| {name} | {ev['examples']} | {ms(alone)} | {w} | {ms(fused)} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rust", help="trainer_state.json or training_report.json with step_losses")
    p.add_argument("--run", action="append", default=[], help="NAME=probe.json (repeatable)")
    p.add_argument("--bucket", type=int, default=40, help="examples per row of the loss table (a multiple of grad_accum)")
    p.add_argument("--rust-run", default=None,
                   help="NAME of the run that used the Rust run's model (the only one its loss is compared with)")
    p.add_argument("--export", default=None,
                   help="the export JSONL: adds paired standard errors of NDCG@10 against the retriever's order")
    a = p.parse_args()
    runs = []
    for spec in a.run:
        name, _, path = spec.partition("=")
        with open(path) as f:
            runs.append((name, json.load(f)))
    rust = None
    if a.rust:
        with open(a.rust) as f:
            st = json.load(f)
        rust = st["step_losses"]
        accum = st["config"]["grad_accum"]
    out = []

    out.append("## Validation NDCG@10 (all users of the export; fused = common/src/fusion.rs)\n")
    weights = None
    for name, r in runs:
        for ev in r["evaluations"]:
            weights = [x["weight"] for x in ev["fused"]]
            break
    if weights is not None:
        out.append("| model | examples | LLM alone N@10 | LLM alone R@10 | " + " | ".join(f"fused w {w}" for w in weights) + " |")
        out.append("|---" * (4 + len(weights)) + "|")
        for name, r in runs:
            ret = r["retriever"]
            for ev in r["evaluations"]:
                out.append(f"| {name} | {ev['examples']} | {ev['llm_all']['ndcg@10']:.4f} | {ev['llm_all']['recall@10']:.4f} | "
                           + " | ".join(f"{x['all']['ndcg@10']:.4f}" for x in ev["fused"]) + " |")
        r0 = runs[0][1]["retriever"]
        out.append(f"\nRetriever order alone on the same users: NDCG@10 {r0['ndcg@10']:.4f}, Recall@10 {r0['recall@10']:.4f} "
                   f"({r0['users']} users).\n")

    if a.export:
        out.append(paired_table(a.export, runs))
    out.append("## Training cost\n")
    out.append("| model | examples | precision | s / example (wall) | CPU-s / example | mean prompt tokens | trainable params | eval s (each evaluation) |")
    out.append("|---|---|---|---|---|---|---|---|")
    for name, r in runs:
        t = r["train"]
        if not t.get("examples"):
            continue
        ev_s = [ev["seconds"] for ev in r["evaluations"]]
        out.append(f"| {name} | {t['examples']} | {r['args']['precision']} | {t['wall_s_per_example']:.2f} | "
                   f"{t['cpu_s_per_example']:.2f} | {t['mean_prompt_tokens']:.0f} | {t.get('trainable_params')} | "
                   f"{', '.join(f'{s:.0f}' for s in ev_s)} |")
    out.append("")

    out.append(f"## Training loss, mean over windows of {a.bucket} examples (same examples, same order)\n")
    out.append(f"ln 20 = {math.log(20):.3f} (uniform over the 20 letters).\n")
    names = [n for n, r in runs if r["train"].get("examples")]
    hdr = ("| examples |" + (" Rust trainer (SmolLM2) |" if rust else "") + "".join(f" {n} |" for n in names)
           + "".join(f" {n} (letters only) |" for n in names))
    out.append(hdr)
    out.append("|---" * (1 + (1 if rust else 0) + 2 * len(names)) + "|")
    longest = max([r["train"]["examples"] for _, r in runs if r["train"].get("examples")] + [0])
    for start in range(0, longest, a.bucket):
        end = min(start + a.bucket, longest)
        row = f"| {start + 1}-{end} |"
        if rust:
            s0, s1 = start // accum, math.ceil(end / accum)
            xs = rust[s0:s1]
            row += f" {sum(xs) / len(xs):.3f} |" if xs and end % accum == 0 else " – |"
        for name, r in runs:
            if not r["train"].get("examples"):
                continue
            ls = [e["loss"] for e in r["train"]["per_example"][start:end]]
            row += f" {sum(ls) / len(ls):.3f} |" if len(ls) == end - start else " – |"
        for name, r in runs:
            if not r["train"].get("examples"):
                continue
            ls = [e["letters_only_loss"] for e in r["train"]["per_example"][start:end]]
            row += f" {sum(ls) / len(ls):.3f} |" if len(ls) == end - start else " – |"
        out.append(row)
    if rust and names:
        out.append("")
        for name, r in runs:
            if not r["train"].get("examples"):
                continue
            ls = [e["loss"] for e in r["train"]["per_example"]]
            first = ls[:accum]
            if a.rust_run and name != a.rust_run:
                continue
            out.append(f"- {name}: first optimizer step (examples 1-{accum}, adapter still zero) mean loss "
                       f"{sum(first) / len(first):.4f}; Rust trainer {rust[0]:.4f}.")
            n = len(ls) // accum * accum
            if n >= 2 * accum:
                half = n // 2 // accum * accum
                py2 = sum(ls[half:n]) / (n - half)
                ru2 = sum(rust[half // accum:n // accum]) / (n // accum - half // accum)
                out.append(f"- {name}: second half of its run (examples {half + 1}-{n}) mean loss {py2:.3f}; "
                           f"Rust trainer over the same examples {ru2:.3f}.")
    print("\n".join(out))


if __name__ == "__main__":
    main()
