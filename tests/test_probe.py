"""The hidden-state router's head (train.probe): it learns which set is best for a prompt when the
features carry it, falls back to the static set when they do not, and its exported linear map of
the raw hidden state equals the PCA-space head."""


import numpy as np
import pytest

from pudding_mlx.train import probe

TASKS = ("arc_easy", "piqa")  # both report acc


def _data(rng, n=400, m=4, informative=True, fitted=None):
    """Rows whose best set is decided by a hidden direction of the mean-pooled state (when
    informative); the last-token state is another draw (the two poolings differ, as real ones do:
    a swapped order of mean+last shows). Returns (data, feats, {pool: raw hidden state})."""
    task = np.array([TASKS[i % 2] for i in range(n)])
    hidden = rng.normal(size=(n, 16)) * np.linspace(3, 0.5, 16)  # a few strong directions, as real states have
    good = (hidden[:, 0] > 0).astype(int) if informative else rng.integers(0, 2, n)
    correct = rng.random((n, m)) < 0.3
    correct[np.arange(n), good] = rng.random(n) < 0.9  # set 0 or set 1 answers, by the direction
    y = np.log(np.where(correct, 0.6, 0.2)) + rng.normal(0, 0.05, (n, m))
    raw = {"mean": hidden, "last": rng.normal(size=(n, 16)) * np.linspace(2, 0.5, 16) + 1.0}
    data = {"task": task, "id": np.array([f"q{i}" for i in range(n)]), "text": np.array([f"t{i}" for i in range(n)], dtype=object),
            "y": y, "correct": correct, "correct_norm": correct}
    feats = {"id": data["id"], "task": task}
    for pool, x in raw.items():
        if fitted is None:  # the PCA is fitted on the training rows and applied to the others
            center = x.mean(0)
            basis = np.linalg.svd(x - center, full_matrices=False)[2][:8]
        else:
            center, basis = fitted[f"center_{pool}_3"], fitted[f"basis_{pool}_3"]
        feats[f"{pool}_3"] = ((x - center) @ basis.T).astype(np.float16)
        feats[f"center_{pool}_3"], feats[f"basis_{pool}_3"] = center.astype(np.float32), basis.astype(np.float32)
    return data, feats, raw


@pytest.mark.parametrize("objective", [o for o in probe.OBJECTIVES if o != "task"])  # per prompt, not per task
def test_learns_the_best_set_from_the_features(objective):
    rng = np.random.default_rng(0)
    data, feats, _ = _data(rng)
    p = probe.train_probe(data, feats, after=3, objective=objective)
    test, test_feats, _ = _data(np.random.default_rng(1), fitted=feats)
    chosen = probe.predict(p, test_feats)["chosen"]
    hit = probe.hits(test)
    routed = probe.accuracy(hit, test["task"], chosen)
    static = probe.accuracy(hit, test["task"], np.full(len(chosen), p["static"]))
    assert routed > static + 0.2, (routed, static)  # static gets ~0.6, routing by the direction ~0.9


def _task_data(rng, n=600, m=4):
    """Two tasks, each with its own best set (0 for arc_easy, 1 for piqa), which the features show
    (one direction separates the tasks) and single rows only noisily (0/1 hits)."""
    task = np.array([TASKS[i % 2] for i in range(n)])
    b = (task == "piqa").astype(int)
    rate = np.full((n, m), 0.5)
    rate[np.arange(n), b] = 0.8
    rate[np.arange(n), 1 - b] = 0.3
    correct = rng.random((n, m)) < rate
    hidden = rng.normal(size=(n, 8))
    hidden[:, 0] += 3.0 * (2 * b - 1)
    data = {"task": task, "id": np.array([f"q{i}" for i in range(n)]), "y": np.log(np.where(correct, 0.6, 0.2)),
            "correct": correct, "correct_norm": correct}
    feats = {"id": data["id"], "task": task, "mean_3": hidden.astype(np.float16), "last_3": hidden.astype(np.float16)}
    return data, feats


def test_task_objective_runs_each_tasks_best_set():
    data, feats = _task_data(np.random.default_rng(0))
    p = probe.train_probe(data, feats, after=3, objective="task")
    test, test_feats = _task_data(np.random.default_rng(1))
    chosen = probe.predict(p, test_feats)["chosen"]
    want = (test["task"] == "piqa").astype(int)
    assert np.mean(chosen == want) > 0.95  # the task's best set, not the static one (0.55 on average)
    hit = probe.hits(test)
    assert probe.accuracy(hit, test["task"], chosen) > probe.accuracy(hit, test["task"], np.full(len(chosen), p["static"])) + 0.15


def test_task_targets_come_from_the_fitted_rows_only():
    """The task profiles used to select the head's settings are averaged over the fitted rows: the
    validation rows' own hits never shape them."""
    data, _ = _task_data(np.random.default_rng(0), n=40)
    fit_rows = np.arange(20)
    t = probe.targets(data, "task", fit_rows=fit_rows)
    changed = dict(data, correct=data["correct"].copy())
    changed["correct"][20:] = ~changed["correct"][20:]
    changed["correct_norm"] = changed["correct"]
    np.testing.assert_array_equal(probe.targets(changed, "task", fit_rows=fit_rows), t)
    assert not np.array_equal(probe.targets(changed, "task"), probe.targets(data, "task"))
    assert np.allclose(t.sum(1), 0) and np.array_equal(t[0], t[2])  # centered; one profile per task


def test_falls_back_to_static_when_the_features_say_nothing():
    from pudding_mlx.train.router_data import split_by_question

    rng = np.random.default_rng(0)
    data, feats, _ = _data(rng, informative=False)
    p = probe.train_probe(data, feats, after=3, objective="accuracy")
    # the validation figures reported are the decision rule's, with the settings chosen, on the
    # held-out rows of the split (a head fitted on the other rows)
    tr, va = split_by_question(data, 0.2, 0)
    tasks, hit = data["task"], probe.hits(data)
    x = probe.features(feats, 3, p["pooling"])
    head = probe.fit(x[tr], probe.targets(data, "accuracy", fit_rows=tr)[tr], p["ridge"])
    static = probe.best_static(hit[tr], tasks[tr])
    val = probe.decide(probe.scores(head, x[va]), static, p["margin"])
    assert p["val_accuracy"] == probe.accuracy(hit[va], tasks[va], val)
    assert p["val_static_accuracy"] == probe.accuracy(hit[va], tasks[va], np.full(len(va), static))
    # on fresh rows there is nothing to learn: the router keeps mostly to the static set, and what
    # it routes elsewhere costs little
    test, test_feats, _ = _data(np.random.default_rng(1), informative=False, fitted=feats)
    chosen = probe.predict(p, test_feats)["chosen"]
    assert np.mean(chosen == p["static"]) > 0.5
    hit = probe.hits(test)
    static_acc = probe.accuracy(hit, test["task"], np.full(len(chosen), p["static"]))
    assert probe.accuracy(hit, test["task"], chosen) > static_acc - 0.05


def test_decision_rule_extremes():
    score = np.array([[0.0, 1.0, 0.5], [2.0, 0.0, 1.0]])
    assert probe.decide(score, 2, np.inf).tolist() == [2, 2]
    assert probe.decide(score, 2, -np.inf).tolist() == [1, 0]
    assert probe.decide(score, 2, 0.6).tolist() == [2, 0]


def test_export_is_the_same_map_on_the_raw_hidden_state(tmp_path):
    rng = np.random.default_rng(0)
    data, feats, hidden = _data(rng)
    for pooling in probe.POOLINGS:
        p = probe.train_probe(data, feats, after=3, objective="centered", poolings=(pooling,))
        folded = probe.export(p, feats)
        raw = np.concatenate([hidden[pool] for pool in pooling.split("+")], axis=1)  # mean first
        np.testing.assert_allclose(raw @ folded["weight"].T + folded["bias"], probe.predict(p, feats)["scores"],
                                   rtol=2e-2, atol=2e-2)  # float16 PCA features
        # what the runtime reads back: saved through safetensors (a single pooling once came back
        # scrambled: its weight was Fortran-ordered and safetensors wrote the raw buffer)
        from safetensors.numpy import load_file, save_file

        save_file(folded, str(tmp_path / "head.safetensors"))
        back = load_file(str(tmp_path / "head.safetensors"))
        np.testing.assert_array_equal(back["weight"], folded["weight"])


def test_features_of_a_subset_of_rows_select_those_rows():
    rng = np.random.default_rng(0)
    data, feats, _ = _data(rng, n=40)
    sub = {k: (v[::-3] if isinstance(v, np.ndarray) and v.ndim >= 1 and len(v) == 40 else v) for k, v in feats.items()}
    got = probe.rows_with_features(dict(data, meta={}), sub)
    assert list(got["id"]) == list(sub["id"]) and np.array_equal(got["y"], data["y"][::-3])
    assert probe.rows_with_features(data, feats) is data
    from pudding_mlx.errors import PuddingError

    bad = dict(sub, id=np.array(["nope"] + list(sub["id"][1:])))
    with pytest.raises(PuddingError, match="recompute the features"):
        probe.rows_with_features(data, bad)
