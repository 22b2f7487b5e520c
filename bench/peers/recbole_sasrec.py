#!/usr/bin/env python3
"""RecBole 1.2.1 SASRec peer for llamarec-serve (issue #17 item 5): the run behind the peer
figures for the retriever, reproducible by anyone, outside the test command.

Protocol (the project's, README "Data" and common/src/data/preprocess.rs):
  * data: RecBole's own ml-100k atomic files as `llamarec fetch` extracts them
    (assets/ml-100k/ml-100k.inter, ml-100k.item);
  * items without a title dropped, 5-core filtering (users and items >= 5) iterated to a fixed
    point: 943 users, 1,349 items, 99,287 interactions (asserted);
  * each user's interactions ordered by (timestamp, item id); leave-one-out: last = test,
    second-to-last = validation;
  * full ranking over all items, the user's history masked; Recall@K (= hit@K, one positive)
    and NDCG@K = 1/log2(rank+1), all users.

History masking: RecBole 1.2.1 masks a user's earlier items only for general (non-sequential)
models; for a sequential model its FullSortEvalDataLoader passes no history index, so SASRec's
own evaluation ranks the user's earlier items too (a harder task than the project's). With
--mask-history (the default) this script adds the project's mask to RecBole's full-sort
evaluation (every item before the target in the user's whole sequence, not only the 50 the
model reads), for validation (model selection) and test; the test of the chosen epoch is also
reported unmasked (RecBole's own figure). --no-mask-history is RecBole as it ships, the
protocol of the first peer run (test R@10 .2121, N@10 .1109, R@20 .3256).

How RecBole is made to follow it: this script does the filtering itself and writes the result
to target/recbole/ml-100k-llamarec/ml-100k-llamarec.inter, rows sorted by (user, timestamp,
item id). RecBole 1.2.1 orders a sequential dataset only with stable sorts
(Interaction.sort: np.argsort(kind="stable") by [user, timestamp], then by timestamp for the
"TO" order) and nothing before that reorders rows (rm_dup_inter stays None: its pandas
sort_values is not stable), so equal timestamps keep the file order, i.e. item id order. Its
own 5-core filter is configured too and must be a no-op. Before training, the script checks
that RecBole's validation and test targets (and the input sequences' last items) equal the ones
the project's protocol gives, for every one of the 943 users.

Model and training: RecBole's SASRec defaults (2 layers, 2 heads, hidden 64, inner 256, dropout
0.5/0.5, gelu, CE loss over all items, Adam lr 1e-3, batch 2048, seed 2020) with
MAX_ITEM_LIST_LENGTH 50. Validation every epoch (full ranking); the epoch with the best
validation NDCG@10 (first one on ties, as RecBole's early stopping) is the one whose test
metrics are reported; early stopping after 10 epochs without improvement (RecBole's
stopping_step default). The default --epochs 19 is the run behind the peer figures (test
R@10 .2121, N@10 .1109, R@20 .3256; still rising at epoch 19; ~48 min on 2 cores).

Compatibility with the locked environment (torch 2.15, numpy 2.4, pandas 2.3; RecBole 1.2.1
predates them), done here at run time, site-packages untouched:
  * numpy 2 removed np.float_, np.complex_, np.unicode_, which RecBole's
    Config.compatibility_settings reads: they are set back to their numpy-2 spellings;
  * torch >= 2.6 loads checkpoints weights_only, which RecBole's pickled checkpoints fail:
    the best epoch's weights are kept in memory instead (fit(saved=False)), and loaded before
    the test evaluation;
  * RecBole's Config parses sys.argv itself: it is hidden from it;
  * RecBole's trainer opens a TensorBoard writer under ./log_tensorboard (the current
    directory): it is pointed at <workdir>/log_tensorboard instead;
  * recbole.quick_start (imports ray) and get_flops (thop) are not used.

Run with the venv that `bash bench/peers/setup.sh recbole` builds:
  nice target/peer-venv/bin/python bench/peers/recbole_sasrec.py --json target/recbole-sasrec.json
"""

import argparse
import copy
import datetime as _dt
import json
import logging
import os
import platform
import resource
import sys
import time

DEFAULT_INTER = "assets/ml-100k/ml-100k.inter"
DEFAULT_ITEM = "assets/ml-100k/ml-100k.item"
DATASET = "ml-100k-llamarec"
EXPECTED = dict(users=943, items=1349, interactions=99287)
TOPK = [10, 20, 50, 100]
VALID_METRIC = "NDCG@10"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inter", default=DEFAULT_INTER, help="RecBole .inter file (default %(default)s)")
    p.add_argument("--item", default=DEFAULT_ITEM, help="RecBole .item file, for titles (default %(default)s)")
    p.add_argument("--workdir", default="target/recbole",
                   help="dataset directory, RecBole's logs (default %(default)s)")
    p.add_argument("--epochs", type=int, default=19, help="training epochs (default 19, the peer figures' run)")
    p.add_argument("--stopping-step", type=int, default=10,
                   help="early stopping: epochs without a better validation NDCG@10 (default 10)")
    p.add_argument("--max-seq-len", type=int, default=50, help="MAX_ITEM_LIST_LENGTH (default 50)")
    p.add_argument("--seed", type=int, default=2020, help="RecBole seed (default 2020, RecBole's)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--mask-history", action=argparse.BooleanOptionalAction, default=True,
                   help="mask the user's earlier items in validation and test, as the project does "
                        "(default); --no-mask-history evaluates as RecBole does for sequential models")
    p.add_argument("--check-imports", action="store_true",
                   help="import RecBole with the shims, build SASRec's config, and exit (setup smoke test)")
    a = p.parse_args()
    if a.epochs < 1 or a.threads < 1 or a.max_seq_len < 1:
        p.error("--epochs, --threads and --max-seq-len must be >= 1")
    return a


ARGS = parse_args()
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import warnings  # noqa: E402

# RecBole 1.2.1's pandas `fillna(inplace=True)` on a column and torch.cuda.amp.GradScaler: both
# FutureWarnings about newer releases' behaviour, harmless here (no NaNs; no GPU).
warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.")

import numpy as np  # noqa: E402

# numpy 2 shim (see docstring): RecBole 1.2.1's Config.compatibility_settings does
# `np.float = np.float_` etc.; these three spellings are gone in numpy 2.
for _old, _new in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
    if _old not in np.__dict__:
        setattr(np, _old, _new)

import torch  # noqa: E402
import recbole  # noqa: E402
from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.model.sequential_recommender import SASRec  # noqa: E402
import recbole.trainer.trainer as _rb_trainer  # noqa: E402
from recbole.trainer import Trainer  # noqa: E402
from recbole.utils import init_seed  # noqa: E402

T_START = time.perf_counter()


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def cpu_info():
    # The same CPU record as the torch peer's (model, SIMD flags, CPUs), plus torch's view.
    from peer_env import cpu_info as peer_cpu_info

    return {
        **peer_cpu_info(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
    }


def read_atomic(path):
    """A RecBole atomic file: header `name:type` columns, tab-separated; returns (names, rows)."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        names = [h.split(":", 1)[0] for h in header]
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return names, rows


def id_key(s):
    """The project's compare_ids: integers compare as integers, otherwise as strings."""
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def project_protocol(inter_path, item_path):
    """The project's preprocessing, in Python: returns {user: [(timestamp, item), ...]} ordered
    by (timestamp, item id), after dropping untitled items and iterated 5-core filtering."""
    names, rows = read_atomic(item_path)
    iid, title = names.index("item_id"), names.index("movie_title" if "movie_title" in names else "title")
    titled = {r[iid] for r in rows if len(r) > title and r[title].strip()}
    names, rows = read_atomic(inter_path)
    u, i, t = names.index("user_id"), names.index("item_id"), names.index("timestamp")
    kept = [(r[u], r[i], int(float(r[t]))) for r in rows if r[i] in titled]
    while True:
        uc, ic = {}, {}
        for user, item, _ in kept:
            uc[user] = uc.get(user, 0) + 1
            ic[item] = ic.get(item, 0) + 1
        nxt = [x for x in kept if uc[x[0]] >= 5 and ic[x[1]] >= 5]
        if len(nxt) == len(kept):
            break
        kept = nxt
    seqs = {}
    for user, item, ts in kept:
        seqs.setdefault(user, []).append((ts, item))
    for s in seqs.values():
        s.sort(key=lambda e: (e[0], id_key(e[1])))
    return seqs


def write_dataset(seqs, workdir):
    d = os.path.join(workdir, DATASET)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{DATASET}.inter")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for user in sorted(seqs, key=id_key):
            for ts, item in seqs[user]:
                f.write(f"{user}\t{item}\t{ts}\n")
    os.replace(tmp, path)
    return path


def make_config(workdir, epochs):
    cfg = {
        "data_path": os.path.abspath(workdir),
        "checkpoint_dir": os.path.join(os.path.abspath(workdir), "saved"),
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[5,inf)",
        "item_inter_num_interval": "[5,inf)",
        "rm_dup_inter": None,
        "MAX_ITEM_LIST_LENGTH": ARGS.max_seq_len,
        "loss_type": "CE",
        "train_neg_sample_args": None,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["Recall", "NDCG"],
        "topk": TOPK,
        "valid_metric": VALID_METRIC,
        "epochs": epochs,
        "stopping_step": ARGS.stopping_step,
        "seed": ARGS.seed,
        "reproducibility": True,
        "use_gpu": False,
        "device": "cpu",
        "show_progress": False,
        "worker": 0,
        "state": "WARNING",
    }
    argv, sys.argv = sys.argv, sys.argv[:1]  # RecBole's Config parses sys.argv itself
    try:
        config = Config(model="SASRec", dataset=DATASET, config_dict=cfg)
    finally:
        sys.argv = argv
    return cfg, config


def token(dataset, field, ids):
    return [str(x) for x in dataset.id2token(field, ids)]


def check_split(dataset, valid_data, test_data, seqs):
    """RecBole's validation/test targets and the last input item must match the protocol's for
    every user."""
    uf, itf = dataset.uid_field, dataset.iid_field
    list_f, len_f = dataset.item_id_list_field, dataset.item_list_length_field
    checked = {}
    for name, data, back in (("valid", valid_data, 2), ("test", test_data, 1)):
        inter = data._dataset.inter_feat
        users = token(dataset, uf, inter[uf].numpy())
        items = token(dataset, itf, inter[itf].numpy())
        lens = inter[len_f].numpy()
        lists = inter[list_f].numpy()
        assert len(users) == len(set(users)) == EXPECTED["users"], (name, len(users))
        bad = []
        for k, user in enumerate(users):
            s = seqs[user]
            want_target, want_prev = s[-back][1], s[-back - 1][1]
            got_prev = token(dataset, itf, [lists[k][lens[k] - 1]])[0]
            want_len = min(len(s) - back, ARGS.max_seq_len)
            if items[k] != want_target or got_prev != want_prev or lens[k] != want_len:
                bad.append((user, items[k], want_target, got_prev, want_prev, int(lens[k]), want_len))
        assert not bad, f"{name} split differs from the project's for {len(bad)} users, e.g. {bad[:5]}"
        checked[name] = len(users)
    # a few users spelled out, for the log: (user, validation item, test item)
    sample = [(u, seqs[u][-2][1], seqs[u][-1][1]) for u in sorted(seqs, key=id_key)[:3]]
    ties = sum(1 for s in seqs.values() if len({ts for ts, _ in s[-3:]}) < 3)
    return {"users_checked": checked, "sample_user_valid_test": sample,
            "users_with_a_timestamp_tie_among_last_three": ties}


def history_masks(dataset, seqs):
    """{(internal user, internal target item): internal ids of every item before the target in the
    user's whole sequence} for the validation and test targets: the project's history mask."""
    uf, itf = dataset.uid_field, dataset.iid_field
    masks = {}
    for user, s in seqs.items():
        uid = int(dataset.token2id(uf, user))
        items = [int(x) for x in dataset.token2id(itf, [item for _, item in s])]
        for back in (1, 2):
            masks[(uid, items[-back])] = torch.tensor(items[:-back], dtype=torch.int64)
    return masks


def mask_history_in_evaluation(trainer, dataset, masks):
    """Makes RecBole's full-sort evaluation of a sequential model mask each user's history (it
    passes none for sequential models): the mask is looked up by (user, target) per row."""
    orig = trainer._full_sort_batch_eval
    uf, itf = dataset.uid_field, dataset.iid_field

    def masked(batched_data):
        interaction, history_index, positive_u, positive_i = batched_data
        assert history_index is None, "RecBole passed a history index for SASRec: masking would be doubled"
        rows, cols = [], []
        for r, (uid, target) in enumerate(zip(interaction[uf].tolist(), interaction[itf].tolist())):
            hist = masks[(uid, target)]
            rows.append(torch.full_like(hist, r))
            cols.append(hist)
        return orig((interaction, (torch.cat(rows), torch.cat(cols)), positive_u, positive_i))

    trainer._full_sort_batch_eval = masked
    return orig


def main():
    t0 = time.perf_counter()
    torch.set_num_threads(ARGS.threads)
    if ARGS.check_imports:
        make_config(ARGS.workdir, 1)
        log(f"[recbole-peer] recbole {recbole.__version__}, torch {torch.__version__}, numpy {np.__version__}: OK")
        return

    os.makedirs(ARGS.workdir, exist_ok=True)
    seqs = project_protocol(ARGS.inter, ARGS.item)
    counts = dict(users=len(seqs), items=len({i for s in seqs.values() for _, i in s}),
                  interactions=sum(len(s) for s in seqs.values()))
    assert counts == EXPECTED, f"protocol counts {counts} != {EXPECTED}"
    path = write_dataset(seqs, ARGS.workdir)
    log(f"[recbole-peer] wrote {path}: {counts}")

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    cfg, config = make_config(ARGS.workdir, ARGS.epochs)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    rb_counts = dict(users=dataset.user_num - 1, items=dataset.item_num - 1, interactions=dataset.inter_num)
    assert rb_counts == EXPECTED, f"RecBole's counts after its filter {rb_counts} != {EXPECTED}"
    train_data, valid_data, test_data = data_preparation(config, dataset)
    split = check_split(dataset, valid_data, test_data, seqs)
    log(f"[recbole-peer] RecBole: {rb_counts}; split equals the project's for all users "
        f"(sample user/valid/test {split['sample_user_valid_test']})")
    t_data = time.perf_counter() - t0

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = SASRec(config, train_data.dataset).to(config["device"])
    # RecBole's get_tensorboard writes under the current directory; keep it in the workdir.
    from torch.utils.tensorboard import SummaryWriter
    tb_dir = os.path.join(os.path.abspath(ARGS.workdir), "log_tensorboard",
                          _dt.datetime.now(_dt.timezone.utc).strftime("SASRec-%Y%m%dT%H%M%SZ"))
    _rb_trainer.get_tensorboard = lambda logger: SummaryWriter(tb_dir)
    trainer = Trainer(config, model)
    unmasked_eval = None
    if ARGS.mask_history:
        unmasked_eval = mask_history_in_evaluation(trainer, dataset, history_masks(dataset, seqs))
        log("[recbole-peer] evaluation masks each user's earlier items (the project's protocol)")

    epochs, best = [], {"score": None, "epoch": None, "state": None}
    orig_train, orig_valid = trainer._train_epoch, trainer._valid_epoch

    def train_epoch(data, epoch_idx, *a, **kw):
        t = time.perf_counter()
        loss = orig_train(data, epoch_idx, *a, **kw)
        epochs.append({"epoch": epoch_idx + 1, "train_loss": float(loss), "train_s": time.perf_counter() - t})
        return loss

    def valid_epoch(data, *a, **kw):
        t = time.perf_counter()
        score, result = orig_valid(data, *a, **kw)
        e = epochs[-1]
        e["valid"] = {k: float(v) for k, v in result.items()}
        e["valid_s"] = time.perf_counter() - t
        e["elapsed_s"] = time.perf_counter() - T_START
        if best["score"] is None or score > best["score"]:  # RecBole's early_stopping: strictly better
            best.update(score=float(score), epoch=e["epoch"], state=copy.deepcopy(model.state_dict()))
        log(f"[recbole-peer] epoch {e['epoch']}/{ARGS.epochs}: loss {e['train_loss']:.4f} "
            f"({e['train_s']:.0f} s), valid R@10 {e['valid']['recall@10']:.4f} N@10 {e['valid']['ndcg@10']:.4f} "
            f"R@20 {e['valid']['recall@20']:.4f} ({e['valid_s']:.0f} s); best epoch {best['epoch']}; "
            f"{e['elapsed_s'] / 60:.1f} min")
        return score, result

    trainer._train_epoch, trainer._valid_epoch = train_epoch, valid_epoch
    t_fit = time.perf_counter()
    trainer.fit(train_data, valid_data, verbose=False, saved=False, show_progress=False)
    t_fit = time.perf_counter() - t_fit

    model.load_state_dict(best["state"])
    t_test = time.perf_counter()
    test = {k: float(v) for k, v in trainer.evaluate(test_data, load_best_model=False, show_progress=False).items()}
    t_test = time.perf_counter() - t_test
    test_unmasked = None
    if unmasked_eval is not None:
        trainer._full_sort_batch_eval = unmasked_eval
        test_unmasked = {k: float(v) for k, v in trainer.evaluate(test_data, load_best_model=False,
                                                                  show_progress=False).items()}
        log(f"[recbole-peer] test without the history mask (RecBole's own evaluation): "
            f"R@10 {test_unmasked['recall@10']:.4f} N@10 {test_unmasked['ndcg@10']:.4f} "
            f"R@20 {test_unmasked['recall@20']:.4f}")
    log(f"[recbole-peer] test (epoch {best['epoch']}, best validation {VALID_METRIC} {best['score']:.4f}): "
        f"R@10 {test['recall@10']:.4f} N@10 {test['ndcg@10']:.4f} R@20 {test['recall@20']:.4f} "
        f"N@20 {test['ndcg@20']:.4f} R@50 {test['recall@50']:.4f} R@100 {test['recall@100']:.4f}")

    result = {
        "peer": "RecBole SASRec",
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "recbole": recbole.__version__,
                     "torch": torch.__version__, "numpy": np.__version__,
                     "pandas": __import__("pandas").__version__, "scipy": __import__("scipy").__version__},
        "cpu": cpu_info(),
        "load_avg_end": os.getloadavg(),
        "data": {"inter": ARGS.inter, "item": ARGS.item, "prepared": path, "counts": counts, "split_check": split},
        "config": {"model": "SASRec", "recbole_overrides": cfg,
                   "effective": {k: config[k] for k in (
                       "n_layers", "n_heads", "hidden_size", "inner_size", "hidden_dropout_prob",
                       "attn_dropout_prob", "hidden_act", "layer_norm_eps", "initializer_range", "loss_type",
                       "learner", "learning_rate", "train_batch_size", "eval_batch_size", "weight_decay",
                       "MAX_ITEM_LIST_LENGTH", "epochs", "stopping_step", "valid_metric", "seed")},
                   "threads": ARGS.threads, "selection": f"best validation {VALID_METRIC} (first on ties)"},
        "history_masked": ARGS.mask_history,
        "test_without_history_mask": test_unmasked,
        "epochs": epochs,
        "epochs_run": len(epochs),
        "best_epoch": best["epoch"],
        "best_valid": {VALID_METRIC: best["score"]},
        "test": {k: test[k] for k in ("recall@10", "ndcg@10", "recall@20", "ndcg@20", "recall@50", "ndcg@50",
                                      "recall@100", "ndcg@100")},
        "wall_s": {"data": t_data, "fit": t_fit, "test": t_test, "total": time.perf_counter() - T_START},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    if ARGS.json:
        os.makedirs(os.path.dirname(os.path.abspath(ARGS.json)), exist_ok=True)
        with open(ARGS.json, "w") as f:
            json.dump(result, f, indent=2)
        log(f"[recbole-peer] wrote {ARGS.json}")
    log(f"[recbole-peer] done in {result['wall_s']['total'] / 60:.1f} min")


if __name__ == "__main__":
    main()
