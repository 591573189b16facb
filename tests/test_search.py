"""The greedy candidate search: correct greedy choices, nested k, deduplicated pool, resumable
after a kill with the same result, and the candidates file that `convert bundle` reads."""

import itertools
import json

import pytest

from pudding_mlx.errors import PuddingError
from pudding_mlx.candidates import read_candidates
from pudding_mlx.train.search import SearchState, greedy_search, pool, write_candidates

N_BLOCKS = 10


def synthetic_losses(task, omitted):
    """A loss with per-block costs and pairwise interactions, different per task, so the greedy
    path is not simply 'the k cheapest blocks'."""
    cost = {"a": [5, 1, 3, 2, 8, 4, 7, 6, 9, 5], "b": [5, 6, 2, 9, 1, 3, 8, 4, 2, 5]}[task]
    like = sum(cost[b] for b in omitted) + sum(3 for x, y in itertools.combinations(omitted, 2) if abs(x - y) == 1)
    diff = sum((b % 4) for b in omitted) - 0.1 * len(omitted)
    return {"likelihood": float(like), "likelihood_diff": float(diff)}


def brute_greedy(task, loss, k, removable):
    removed = []
    for _ in range(k):
        best = min((b for b in removable if b not in removed),
                   key=lambda b: (synthetic_losses(task, removed + [b])[loss], b))
        removed.append(best)
    return removed


def test_greedy_search_matches_reference_and_protects_ends():
    calls = []
    score = lambda t, s: calls.append((t, s)) or synthetic_losses(t, s)
    orders = greedy_search(score, ["a", "b"], ["likelihood", "likelihood_diff"], N_BLOCKS, 4, [0, 9])
    for name, order in orders.items():
        task, loss = name.split("/")
        assert order == brute_greedy(task, loss, 4, range(1, 9))
        assert 0 not in order and 9 not in order
    # each (task, set) is scored once: both chains of a task share phase 1
    assert len(calls) == len(set(calls))
    # greedy is nested: a k=2 search is the prefix of the k=4 one
    short = greedy_search(synthetic_losses, ["a"], ["likelihood"], N_BLOCKS, 2, [0, 9])
    assert short["a/likelihood"] == orders["a/likelihood"][:2]


def test_resume_after_kill_gives_same_result(tmp_path):
    settings = {"k": 4}
    full = greedy_search(synthetic_losses, ["a", "b"], ["likelihood", "likelihood_diff"], N_BLOCKS, 4, [0, 9],
                         SearchState(tmp_path / "ref.json", settings))

    class Killed(Exception):
        pass

    phases_done = []

    def kill_after_five(chain, phase, record):
        phases_done.append((chain, phase))
        if len(phases_done) == 5:
            raise Killed

    path = tmp_path / "state.json"
    with pytest.raises(Killed):
        greedy_search(synthetic_losses, ["a", "b"], ["likelihood", "likelihood_diff"], N_BLOCKS, 4, [0, 9],
                      SearchState(path, settings), on_phase=kill_after_five)
    saved = json.loads(path.read_text())
    assert sum(len(v) for v in saved["chains"].values()) == 5
    calls = []
    resumed = greedy_search(lambda t, s: calls.append((t, s)) or synthetic_losses(t, s),
                            ["a", "b"], ["likelihood", "likelihood_diff"], N_BLOCKS, 4, [0, 9],
                            SearchState(path, settings))
    assert resumed == full
    # the finished phases were not scored again
    assert all(len(s) > 1 for t, s in calls if t == "a")
    assert json.loads(path.read_text())["chains"] == json.loads((tmp_path / "ref.json").read_text())["chains"]


def test_state_with_other_settings_is_refused(tmp_path):
    path = tmp_path / "state.json"
    SearchState(path, {"k": 4}).save()
    with pytest.raises(PuddingError, match="other settings"):
        SearchState(path, {"k": 5})
    path.write_text("{broken")
    with pytest.raises(PuddingError, match="not valid JSON"):
        SearchState(path, {"k": 4})


def test_pool_dedups_and_candidates_round_trip(tmp_path):
    orders = {"a/likelihood": [3, 1, 5], "a/likelihood_diff": [1, 3, 7], "b/likelihood": [2, 4, 6]}
    p = pool(orders, 2)
    assert [c["omitted"] for c in p] == [[1, 3], [2, 4]]
    assert p[0]["sources"] == [["a", "likelihood"], ["a", "likelihood_diff"]]
    state = SearchState(None, {})
    state.chains = {name: [{"removed": b, "loss": -i, "tried": {}} for i, b in enumerate(o)] for name, o in orders.items()}
    data = write_candidates(tmp_path / "c.json", orders, 2, state, {"num_blocks": 10})
    assert data["candidates"][0]["loss_value"] == -1
    back = read_candidates(tmp_path / "c.json", n_blocks=10)
    assert [c["omitted"] for c in back] == [[1, 3], [2, 4]] and back[1]["task"] == "b"
    (tmp_path / "plain.json").write_text("[[1, 2], [5]]")
    assert [c["omitted"] for c in read_candidates(tmp_path / "plain.json")] == [[1, 2], [5]]
    with pytest.raises(PuddingError, match="num_blocks"):
        read_candidates(tmp_path / "c.json", n_blocks=12)
    (tmp_path / "bad.json").write_text('{"format": "x"}')
    with pytest.raises(PuddingError, match="format"):
        read_candidates(tmp_path / "bad.json")


def test_bad_arguments():
    with pytest.raises(PuddingError, match="unknown loss"):
        greedy_search(synthetic_losses, ["a"], ["perplexity"], N_BLOCKS, 2)
    with pytest.raises(PuddingError, match="may be removed"):
        greedy_search(synthetic_losses, ["a"], ["likelihood"], N_BLOCKS, 9, [0, 9])
