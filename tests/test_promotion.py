"""Skill-gated promotion: stages, ``mecs promote`` (refuse a worse candidate, promote a
better one, dry run, rollback) and what the service answers with while stages change."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.promotion import shuffled_targets  # the bench's deliberately worse candidate
from correction import artifacts, stages
from correction.inference import Corrector
from correction.training.pretrain import PretrainConfig, pretrain
from mecs.cli import main

TRAIN = {
    "network": "column-mlp",
    "params": {"hidden": 32, "depth": 2},
    "max_epochs": 12,
    "batch_size": 64,
    "early_stopping": 20,
    "seed": 0,
}


@pytest.fixture(scope="module")
def gated(tmp_path_factory, tiny_increments):
    """A repository: v1 trained on shuffled targets (production), v2 trained on the real
    increments (a candidate), and the shuffled store for later candidates."""
    root = tmp_path_factory.mktemp("promote")
    bad = shuffled_targets(tiny_increments, root / "shuffled.zarr")
    repo = root / "models"
    cfg = PretrainConfig.from_dict(TRAIN)
    pretrain(bad, repo, "l96", cfg, progress=False)
    pretrain(tiny_increments, repo, "l96", cfg, progress=False, stage="candidate")
    return repo, bad


def _promote(repo, tiny_synth, *extra):
    args = ["promote", "--repository", str(repo), "--name", "l96", "--data", str(tiny_synth)]
    return main([*args, "--host", "l96", "--free-run", "40", *extra])


def test_stages_rules_and_publish():
    book = stages.StageBook("m")
    assert book.production([1, 2, 3]) == 3 and book.stage_of(1, [1, 2, 3]) == "retired"
    book = stages.StageBook("m", {1: "retired", 2: "production"}, gated=True)
    # an unlisted version in a gated model is a candidate, never served
    assert book.stage_of(3) == "candidate" and book.production([1, 2, 3]) == 2
    assert book.fallbacks([1, 2, 3]) == [2, 1]


def test_a_worse_candidate_is_refused_a_better_one_promoted(gated, tiny_synth, tmp_path, capsys):
    repo, bad = gated
    book = stages.read(repo, "l96")
    assert book.stages == {1: "production", 2: "candidate"}
    assert artifacts.resolve(repo, "l96").version == 1  # the candidate is not served

    # dry run: the decision, and nothing changes
    assert _promote(repo, tiny_synth, "--dry-run") == 0
    assert "promote" in capsys.readouterr().out
    assert stages.read(repo, "l96").stages == book.stages

    out = tmp_path / "decision.json"
    assert _promote(repo, tiny_synth, "--out", str(out)) == 0
    text = capsys.readouterr().out
    assert "v2 is production" in text, text
    doc = json.loads(out.read_text())
    assert doc["scores"]["ratio"] < 0.99 and doc["scores"]["fields"]["X"]["ratio"] < 0.99
    book = stages.read(repo, "l96")
    assert book.stages == {1: "retired", 2: "production"}
    rec = book.records[-1]
    assert rec["decision"] == "promoted" and rec["version"] == 2
    assert rec["previous_production"] == 1 and rec["data_digest"] == doc["data_digest"]
    assert rec["scores"]["fields"]["X"]["ratio"] == pytest.approx(doc["scores"]["ratio"])
    assert rec["rule"]["margin"] == 0.01 and rec["by"] and rec["at"]
    assert Corrector.load(repo, "l96").version == 2

    # a candidate trained on shuffled targets: refused, recorded, production unchanged
    cfg = PretrainConfig.from_dict({**TRAIN, "seed": 1})  # not v1's run again
    v3 = pretrain(bad, repo, "l96", cfg, progress=False).version.version
    assert stages.read(repo, "l96").stage_of(v3) == "candidate"
    assert _promote(repo, tiny_synth) == 3
    text = capsys.readouterr().out
    assert "stays a candidate" in text and "RMSE ratio" in text
    book = stages.read(repo, "l96")
    assert book.production([1, 2, 3]) == 2 and book.stages[3] == "candidate"
    assert book.records[-1]["decision"] == "refused" and book.records[-1]["scores"]["ratio"] > 1
    print(
        f"table: l96 gate: trained v2 against shuffled v1 {doc['scores']['ratio']:.3f} "
        f"(promoted); shuffled v3 against v2 {book.records[-1]['scores']['ratio']:.3f} (refused)"
    )

    # rollback: the production before the current one, unscored, recorded
    assert main(["promote", "--repository", str(repo), "--name", "l96", "--rollback"]) == 0
    book = stages.read(repo, "l96")
    assert book.production([1, 2, 3]) == 1 and book.stages[2] == "retired"
    assert book.records[-1]["decision"] == "rollback"
    assert (
        main(
            ["promote", "--repository", str(repo), "--name", "l96", "--version", "2", "--rollback"]
        )
        == 0
    )
    assert stages.read(repo, "l96").production([1, 2, 3]) == 2


def test_bad_gate_settings_are_usage_errors(gated, tiny_synth, capsys):
    repo, _ = gated
    assert _promote(repo, tiny_synth, "--leads", "0,9", "--dry-run") == 2
    assert "leads [0, 9] must lie in 1..4" in capsys.readouterr().err
    assert _promote(repo, tiny_synth, "--margin", "2", "--dry-run") == 2
    assert "margin must be a fraction" in capsys.readouterr().err
    assert main(["promote", "--repository", str(repo), "--name", "nope", "--dry-run"]) == 2
    assert "no versions" in capsys.readouterr().err


def test_service_serves_production_names_stages_and_swaps_under_40_callers(start_server, tmp_path):
    """A gated model under 40 callers: a candidate is published, promoted, rolled back.
    No call fails, every answer names its version and stage, and the default never
    answers with the candidate; a caller pinning the candidate gets it, named so."""
    import threading
    import time

    from support import make_l96_model

    from service.client import CorrectionClient

    repo = tmp_path / "gated"
    for seed in (0, 11):
        model, config = make_l96_model(seed=seed)
        artifacts.publish(repo, "l96", model, config, stage="candidate")
    assert stages.read(repo, "l96").stages == {1: "production", 2: "candidate"}
    server = start_server(repository=repo, poll_interval_s=0.05)
    x = np.random.default_rng(3).normal(2.5, 3.6, (2, 36))
    with CorrectionClient(server.url, "l96", version=2) as pinned:
        res = pinned.infer(x)
        assert (res.model_version, res.parameters["model_stage"]) == (2, "candidate")
        meta = pinned.metadata()["parameters"]
        assert meta["stage"] == "candidate" and meta["promotions"] == []
    n, stop, errors = 40, threading.Event(), []
    seen: list[list[tuple[int, str]]] = [[] for _ in range(n)]
    phase = ["candidate"]  # what v2 is while a call is made

    def caller(i):
        with CorrectionClient(server.url, "l96", retries=0) as c:
            while not stop.is_set():
                before = phase[0]
                try:
                    res = c.infer(x)
                except Exception as err:  # counted; the test fails on any
                    errors.append(err)
                    continue
                seen[i].append((res.model_version, res.parameters["model_stage"], before))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()

    def wait_for(version, stage):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(s and s[-1][:2] == (version, stage) for s in seen):
                return
            time.sleep(0.05)
        raise AssertionError(f"not every caller reached v{version} {stage}")

    time.sleep(0.5)
    with stages.editing(repo, "l96") as book:  # what mecs promote does on a win
        before = stages.set_production(book, 2)
        book.records.append(stages.record(2, "promoted", before))
    phase[0] = "promoted"
    wait_for(2, "production")
    with CorrectionClient(server.url, "l96") as c:  # the lineage: the promotion record
        meta = c.metadata()["parameters"]
        assert meta["stage"] == "production" and meta["promotions"][-1]["decision"] == "promoted"
        assert meta["promotions"][-1]["previous_production"] == 1
    assert main(["promote", "--repository", str(repo), "--name", "l96", "--rollback"]) == 0
    phase[0] = "rolled back"
    wait_for(1, "production")
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    calls = [c for s in seen for c in s]
    assert len(calls) > 4 * n
    print(f"table: stages under {n} callers: {len(calls)} calls, {len(errors)} failed")
    # the default answer is the production version; a call that was in flight across
    # a swap names the stage its version has when it is answered (just retired)
    named = {(v, st) for v, st, _ in calls}
    assert {(1, "production"), (2, "production")} <= named, named
    assert named <= {(1, "production"), (2, "production"), (1, "retired"), (2, "retired")}
    assert all(v == 1 for v, _, p in calls if p == "candidate")  # never the candidate
    import urllib.request

    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert 'mecs_model_version_stage{model="l96",stage="retired",version="2"} 1.0' in metrics
    assert 'mecs_model_version_stage{model="l96",stage="production",version="1"} 1.0' in metrics
