"""Which candidate a bundle's hidden-state router picks for `pudding-mlx bench`'s own prompts (random
token ids, `bench.cell_prompt`, and their first 16 tokens, the warm-up), against its fallback set:
whether `bench --speculate` guesses hit.
Usage: python benchmarks/bench_prompt_routes.py BUNDLE [--lengths 128,512] [--json OUT]"""
import argparse

from pudding_mlx.atomic import write_json
from pudding_mlx.bench import cell_prompt
from pudding_mlx.load import backend, load

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("bundle")
ap.add_argument("--lengths", default="128,512")
ap.add_argument("--json")
a = ap.parse_args()
loaded = load(a.bundle)
router = loaded.router
if getattr(router, "kind", None) != "hidden":
    raise SystemExit(f"{a.bundle}: its router is not a hidden-state router")
vocab = loaded.model.args.vocab_size
rows = []
for n in (int(x) for x in a.lengths.split(",")):
    prompt = cell_prompt(n, vocab)
    for name, ids in (("prompt", prompt.tolist()), ("warm-up (first 16)", prompt[:16].tolist())):
        candidate, scores, _ = router.best_ids(ids)
        rows.append({"prompt_tokens": n, "which": name, "candidate": candidate, "omitted": list(router.sets[candidate]),
                     "fallback": router.fallback, "hit": candidate == router.fallback,
                     "best_minus_fallback": max(scores) - scores[router.fallback]})
        print(f"{n:5d} {name:18s} -> candidate {candidate} {list(router.sets[candidate])}; fallback {router.fallback} "
              f"{list(router.sets[router.fallback])}; best - fallback score {rows[-1]['best_minus_fallback']:.3f}")
if a.json:
    write_json(a.json, {"bundle": str(loaded.path), "backend": backend(), "rows": rows})
