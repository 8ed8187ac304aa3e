"""Which score finds wrong training labels? An evaluation on the bundled digits.

Plants wrong labels in 10 % of the training instances (each flipped to another
class at random), trains two models with `reptrace train`, and prints the ROC
AUC with which each candidate score ranks the flipped instances first:

- the demo MLP (hidden 32, 16; 20 epochs, momentum 0.9, cosine schedule),
  which does not fit the flipped labels;
- a wide MLP (hidden 128, 64; 60 epochs, same optimiser), which fits them
  (memorises them).

Usage: scripts/eval/mislabel.sh (set-up, release build, then this), or
       python scripts/eval/mislabel.py REPTRACE_BIN [--out DIR] [--fraction 0.1]
       [--seed 7] [--json FILE]
tests/python/test_mislabel.py runs it in the test suite and holds the canned
query to AUC >= 0.97 in both regimes.

Every score is read with SQL from the run (`reptrace sql` and the canned
queries), as a user would.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "crates/format/data/digits.csv.gz"
N_TRAIN = 1437  # docs/data.md: the first 1,437 rows train, the last 360 test
N_TEST = 360

COMMON = ["--momentum", "0.9", "--lr-schedule", "cosine", "--probes", "train"]
REGIMES = {
    "demo MLP (32, 16; 20 epochs)": ["--model", "mlp", "--epochs", "20", *COMMON],
    "wide MLP (128, 64; 60 epochs)": ["--model", "mlp:128,64", "--epochs", "60", *COMMON],
}
# `--optimizer adam`: the same models trained with Adam in instance mode
# (docs/method.md §6), lr 0.003 with the cosine schedule.
ADAM = ["--optimizer", "adam", "--lr", "0.003", "--lr-schedule", "cosine", "--probes", "train"]
ADAM_REGIMES = {
    "demo MLP, Adam (32, 16; 20 epochs)": ["--model", "mlp", "--epochs", "20", *ADAM],
    "wide MLP, Adam (128, 64; 60 epochs)": ["--model", "mlp:128,64", "--epochs", "60", *ADAM],
}


def flipped_digits(fraction: float, seed: int, path: Path) -> np.ndarray:
    """Writes the digits with `fraction` of the training labels flipped to
    `path`; returns the flipped instance ids."""
    with gzip.open(DIGITS, "rt") as f:
        data = pd.read_csv(f, header=None)
    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.choice(N_TRAIN, size=round(fraction * N_TRAIN), replace=False))
    labels = data.iloc[:, -1].to_numpy().copy()
    shift = rng.integers(1, 10, size=len(flipped))
    labels[flipped] = (labels[flipped] + shift) % 10
    data.iloc[:, -1] = labels
    data.to_csv(path, header=False, index=False)
    return flipped


def sql(bin_: str, run: Path, query: str) -> pd.DataFrame:
    out = subprocess.run(
        [bin_, "sql", str(run), query, "--format", "csv", "--max-computed-rows", "100000000"],
        check=True, capture_output=True, text=True,
    ).stdout
    return pd.read_csv(io.StringIO(out))


def canned(bin_: str, run: Path, name: str, *params: str) -> pd.DataFrame:
    args = [bin_, "query", str(run), name, "--format", "csv"]
    for p in params:
        args += ["--param", p]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return pd.read_csv(io.StringIO(out))


def auc(scores: pd.Series, positives: set[int]) -> float:
    """ROC AUC of ranking the positives first by descending score (ties
    count one half): the Mann-Whitney statistic."""
    s = scores.reindex(range(N_TRAIN)).fillna(-np.inf)
    ranks = s.rank(method="average").to_numpy()
    pos = np.array([i in positives for i in range(N_TRAIN)])
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def scores(bin_: str, run: Path) -> dict[str, pd.Series]:
    """Every candidate score per training instance, larger = more suspect."""
    out: dict[str, pd.Series] = {}
    mis = canned(bin_, run, "mislabel_candidates", f"k={N_TRAIN}")
    out["mislabel_candidates (the canned query)"] = mis.set_index("instance_id")["score"]
    dyn = sql(bin_, run, """
        SELECT instance_id, AVG(loss) AS mean_loss, AVG(p_label) AS confidence,
               STDDEV_POP(p_label) AS variability,
               AVG(CASE WHEN predicted = label THEN 1.0 ELSE 0.0 END) AS correctness
        FROM examples GROUP BY instance_id""").set_index("instance_id")
    out["mean loss over training"] = dyn["mean_loss"]
    out["1 - confidence (data map)"] = 1 - dyn["confidence"]
    out["1 - correctness (data map)"] = 1 - dyn["correctness"]
    out["variability (data map)"] = dyn["variability"]
    last = sql(bin_, run, """
        SELECT instance_id, loss FROM examples
        WHERE epoch = (SELECT MAX(epoch) FROM examples)""").set_index("instance_id")
    out["loss in the last epoch"] = last["loss"]
    forget = canned(bin_, run, "forgetting_events", f"k={N_TRAIN}")
    forget = forget.set_index("instance_id")
    # Never learned counts as the most forgotten (Toneva et al. 2019).
    out["forgetting events"] = forget["forgetting_events"] + np.where(
        forget["first_learned_step"].isna(), 1e6, 0)
    tracin = sql(bin_, run, """
        SELECT instance_id, layer,
               SUM(CAST(update_norm AS DOUBLE) * CAST(update_norm AS DOUBLE)) AS s
        FROM updates GROUP BY instance_id, layer""")
    out["TracIn self-influence, all layers"] = tracin.groupby("instance_id")["s"].sum()
    for layer, g in tracin.groupby("layer"):
        out[f"TracIn self-influence, {layer}"] = g.set_index("instance_id")["s"]
    si = canned(bin_, run, "self_influence", f"k={N_TRAIN}")
    for (layer, tail), g in si.groupby(["layer", "tail"]):
        sign = 1 if tail == "memorised" else -1
        out[f"self share ({tail} tail), {layer}"] = sign * g.set_index("instance_id")["self_share"]
    return out


def evaluate(bin_: str, out: Path, fraction: float = 0.1, seed: int = 7, regimes=None):
    """Trains both regimes (of `regimes`, default REGIMES) in `out`; returns
    ({score: {regime: AUC}}, the flipped ids, {regime: share of the flipped
    labels predicted in the last epoch})."""
    regimes = REGIMES if regimes is None else regimes
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "digits-flipped.csv"
    flipped = set(int(i) for i in flipped_digits(fraction, seed, csv))
    data = f"csv:{csv}?scale=0.0625&test={N_TEST}"
    table: dict[str, dict[str, float]] = {}
    fits: dict[str, float] = {}
    for name, model in regimes.items():
        run = out / ("run-" + name.split(" ")[0])
        subprocess.run(
            [bin_, "train", "--data", data, "--out", str(run), *model],
            check=True, capture_output=True, text=True,
        )
        fits[name] = float(sql(bin_, run, f"""
            SELECT AVG(CASE WHEN predicted = label THEN 1.0 ELSE 0.0 END) AS fit
            FROM examples WHERE epoch = (SELECT MAX(epoch) FROM examples)
              AND instance_id IN ({",".join(map(str, sorted(flipped)))})""")["fit"][0])
        for score, values in scores(bin_, run).items():
            table.setdefault(score, {})[name] = auc(values, flipped)
    return table, flipped, fits


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bin", help="the reptrace binary")
    ap.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path, help="also write the table as JSON")
    ap.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                    help="train the regimes with SGD + momentum (default) or Adam")
    args = ap.parse_args()
    regimes = ADAM_REGIMES if args.optimizer == "adam" else REGIMES
    with tempfile.TemporaryDirectory() as tmp:
        table, flipped, fits = evaluate(args.bin, args.out or Path(tmp), args.fraction,
                                        args.seed, regimes)
    for name, fit in fits.items():
        print(f"{name}: in its last epoch it predicts {fit:.0%} of the flipped labels",
              file=sys.stderr)
    names = list(regimes)
    print(f"ROC AUC for finding the {len(flipped)} flipped training labels "
          f"({args.fraction:.0%} of {N_TRAIN}, seed {args.seed})\n")
    print("| score | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for score, row in table.items():
        print(f"| {score} | " + " | ".join(f"{row.get(n, float('nan')):.3f}" for n in names) + " |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
