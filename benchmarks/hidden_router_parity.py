"""Parity of the hidden-state router between the training side (PyTorch features + probe head,
`train predict`) and the MLX runtime (the folded head on MLX's own hidden state), on real texts.

    python benchmarks/hidden_router_parity.py BUNDLE --data DIR[,DIR] --preds P[,P] [--limit N] [--stride K] [--json OUT]

BUNDLE: a bundle with a hidden-state router (`convert bundle --router <train router --variant probe>`).
DIR: router data folders (router_data.npz) whose texts to route; P: the matching `train predict` files.
Prints the share of texts where both pick the same candidate, the largest score difference, and the
same for the MLX weights' own dtype (the bundle's LLM may be requantised: say which)."""

import argparse
import json
import time

import numpy as np

from pudding_mlx.atomic import write_json
from pudding_mlx.load import load
from pudding_mlx.train.router_data import load_router_data


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--data", required=True)
    ap.add_argument("--preds", required=True)
    ap.add_argument("--limit", type=int, default=None, help="at most N texts of each folder (default: all)")
    ap.add_argument("--stride", type=int, default=1, help="every K-th text (spreads --limit over the tasks)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    loaded = load(a.bundle, dtype=a.dtype)
    router = loaded.router
    same = n = 0
    worst = 0.0
    per = {}
    t0 = time.time()
    for folder, pred in zip(a.data.split(","), a.preds.split(",")):
        data = load_router_data(folder)
        with np.load(pred) as z:
            want_scores, want = z["scores"], z["chosen"]
        rows = list(range(0, len(data["text"]), a.stride))[:a.limit]
        for i in rows:
            got, scores, _ = router.best(str(data["text"][i]))
            ok = got == int(want[i])
            same, n = same + ok, n + 1
            worst = max(worst, float(np.max(np.abs(np.array(scores) - want_scores[i]))))
            t = str(data["task"][i])
            per.setdefault(t, [0, 0])
            per[t][0] += ok
            per[t][1] += 1
            if n % 200 == 0:
                print(f"{n} texts, {same / n:.4f} same, {time.time() - t0:.0f} s", flush=True)
    out = {"bundle": a.bundle, "dtype": a.dtype, "n": n, "stride": a.stride, "same_choice": same / n, "max_abs_score_diff": worst,
           "per_task": {t: {"same": s / m, "n": m} for t, (s, m) in per.items()},
           "router": {"after": router.after, "pooling": router.pooling}}
    print(json.dumps(out, indent=1))
    if a.json:
        write_json(a.json, out)


if __name__ == "__main__":
    main()
