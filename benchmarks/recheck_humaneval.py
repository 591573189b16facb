"""Run the HumanEval tests of `pudding-mlx eval --json` outputs again on this machine (the replies are in
the records) and rewrite pass@1 in place, e.g. after the sandbox itself changed.

    python benchmarks/recheck_humaneval.py results/qwen2.5-coder-1.5b/mlx/generation/eval_*.json
"""
import json
import sys

from pudding_mlx import humaneval as he
from pudding_mlx.atomic import write_json

problems = {p.task_id: p for p in he.load_problems()}
for path in sys.argv[1:]:
    payload = json.load(open(path))
    task = payload["tasks"]["humaneval"]
    recs = task["records"]
    outcomes = he.check_all([problems[r["task_id"]] for r in recs], [r["text"] for r in recs])
    before = task["pass@1"]
    for r, o in zip(recs, outcomes):
        r.update(o.to_json())
    task.update({"pass@1": he.pass_at_1(outcomes), "outcomes": he.summary(outcomes)})
    write_json(path, payload)
    print(f"{path}: pass@1 {before:.2f} -> {task['pass@1']:.2f} {task['outcomes']}")
