"""The statistical champion gate, the alias history and the model card, on a real (sqlite) registry."""

import json
import math

import mlflow
import numpy as np
import pytest

from tuneline import card, gate, provenance, recipes, registry, serving
from tuneline.config import RegisterCfg, flatten
from tuneline.errors import TunelineError
from tuneline.gate import decide, reference
from tuneline.provenance import data_hashes
from tuneline.scoring import Comparison


def _cmp(a, b, lo, hi, p, metric="chrf"):
    return Comparison(metric, a, b, a - b, lo, hi, p, "bootstrap", 100)


@pytest.mark.parametrize(
    "c, cfg, promoted, why",
    [
        (_cmp(60, 50, 4, 16, 0.001), RegisterCfg(), True, "p=0.001 < 0.0304 (register.alpha=0.05, decision 1"),
        (_cmp(50, 50, 0, 0, 1.0), RegisterCfg(), False, "not better"),
        (_cmp(45, 50, -9, -1, 0.99), RegisterCfg(), False, "not better"),
        (_cmp(51, 50, 0.2, 1.8, 0.01), RegisterCfg(min_delta=2.0), False, "gain 1 is below register.min_delta=2.0"),
        (_cmp(52, 50, -1, 5, 0.2), RegisterCfg(), False, "not significant (p=0.2 >= 0.0304 (register.alpha=0.05"),
        (_cmp(52, 50, -1, 5, 0.04), RegisterCfg(), False, "not significant (p=0.04 >= 0.0304"),  # spent: 6/π² of alpha
        (_cmp(52, 50, -1, 5, 0.2), RegisterCfg(alpha=1.0), True, "p=0.2 < 1 (bootstrap)"),
        (_cmp(math.nan, 50, math.nan, math.nan, math.nan), RegisterCfg(alpha=1.0), False, "never promotes"),
        (_cmp(40, 50, -15, -5, 0.001, "perplexity"), RegisterCfg(), True, "delta -10"),  # lower wins
    ],
)
def test_the_gate_promotes_only_a_real_significant_improvement(c, cfg, promoted, why):
    got, reason = decide(c, cfg, "champion v1")
    assert got is promoted and why in reason


def _guard(metric, p, challenger=0.1, champion=0.1, margin=0.05):
    return {
        "metric": metric,
        "margin": margin,
        "challenger": challenger,
        "champion": champion,
        "delta": challenger - champion,
        "p_value": p,
    }


@pytest.mark.parametrize(
    "p, guards, decision, promoted, why",
    [
        # Holm over 3 tests at 0.0304: the p-values, sorted, must be <= 0.0101, 0.0152, 0.0304
        (0.001, [_guard("unterminated_rate", 0.001), _guard("unparseable_rate", 0.02)], 1, True, "guardrails hold"),
        # wins the primary metric, but more answers run on: the guardrail fails, and says so
        (
            0.001,
            [_guard("unterminated_rate", 0.4, 0.30, 0.10)],
            1,
            False,
            "guardrail unterminated_rate is not shown within its margin 0.05: 0.3 vs 0.1 (p=0.4",
        ),
        # 0.02 would pass alone (< 0.0304) but not as the smallest of 3 (> 0.0304 / 3)
        (0.02, [_guard("unterminated_rate", 0.02), _guard("accuracy[joy]", 0.02)], 1, False, "not significant"),
        (0.012, [_guard("accuracy[joy]", 0.001)], 1, True, "Holm over 2 tests"),  # 0.001 <= 0.0152, 0.012 <= 0.0304
        # the same evidence at the 3rd decision on these examples: level 0.05·6/(9π²) = 0.00338
        (0.004, [], 1, True, "p=0.004 < 0.0304"),
        (0.004, [], 3, False, "p=0.004 >= 0.00338 (register.alpha=0.05, decision 3 on these examples"),
    ],
)
def test_guardrails_holm_and_repeated_testing_with_known_p_values(p, guards, decision, promoted, why):
    got, reason = decide(_cmp(60, 50, 4, 16, p), RegisterCfg(), "champion v1", decision, guards)
    assert got is promoted and why in reason, reason


def test_holm_and_alpha_spending_follow_their_definitions():
    from tuneline.scoring import holm, spent_alpha

    assert holm([0.01, 0.04, 0.03], 0.05) == [True, False, False]  # 0.01 <= 0.05/3; 0.03 > 0.05/2
    assert holm([0.01, 0.02, 0.04], 0.05) == [True, True, True]  # 0.01 <= .0167, 0.02 <= .025, 0.04 <= .05
    assert holm([math.nan, 0.001], 0.05) == [False, True]
    assert sum(spent_alpha(0.05, k) for k in range(1, 100_000)) == pytest.approx(0.05, rel=1e-4)


def test_a_non_inferiority_test_passes_within_the_margin_and_fails_beyond_it():
    from tuneline.scoring import compare, mean

    rng = np.random.default_rng(0)
    champ = rng.random(400) < 0.10  # 10% of answers run on
    same, worse = champ.copy(), champ | (rng.random(400) < 0.15)  # about 23%
    for chal, holds in ((same, True), (worse, False)):
        c = compare(mean(chal), mean(champ), "unterminated_rate", margin=0.05)
        assert (c.p_value < 0.05) is holds, (c.delta, c.p_value)


def _record(key="k1", base=0.1, tuned=0.9):
    return {"examples_key": key, "base": {"outputs": ["b"], "tag": base}, "tuned": {"outputs": ["t"], "tag": tuned}}


def _champion_with_record(client, record) -> str:
    with mlflow.start_run() as run:
        mlflow.log_text(json.dumps(record), provenance.EVAL_ARTIFACT)
    v = client.create_model_version("m", source="file:///nowhere", run_id=run.info.run_id).version
    client.set_model_version_tag("m", v, "eval.examples_key", record["examples_key"])
    registry.move_champion(client, "m", v, "gate", "test")
    return v


def test_with_no_champion_the_challenger_faces_the_base_model_at_its_best(client):
    params = recipes.build("descramble")
    against, version, ev = reference(client, "m", [], params, _record() | {"base_prompting": "chat"})
    assert version is None and against == "base model smollm2-135m-instruct (chat prompting)" and ev["tag"] == 0.1


def test_the_champion_is_compared_on_its_logged_per_example_results(client):
    v = _champion_with_record(client, _record(tuned=0.7))
    against, version, ev = reference(client, "m", [], recipes.build("descramble"), _record(tuned=0.9))
    assert (against, version, ev["tag"]) == (f"champion v{v}", str(v), 0.7)


def test_a_champion_evaluated_on_other_examples_is_re_evaluated_on_these(client, monkeypatch):
    _champion_with_record(client, _record(key="old-examples"))
    loaded = []
    monkeypatch.setattr(gate, "load_any", lambda uri: loaded.append(uri) or ("model", "tokenizer"))
    monkeypatch.setattr(gate, "evaluate_model", lambda model, tok, rows, params: {"re-evaluated on": rows})
    _, version, ev = reference(client, "m", [{"target": "a"}], recipes.build("descramble"), _record(key="new"))
    assert loaded == [f"models:/m/{version}"] and version == "1" and ev == {"re-evaluated on": [{"target": "a"}]}


def test_the_champions_own_model_trained_again_is_not_registered_again(client, tmp_path, monkeypatch):
    """A re-run with the same seed and data, or the gate run again with another
    register.alpha, trains what the champion is: the gate would compare it with itself, so
    no copy is registered (or uploaded). New weights, or new served settings, are a
    challenger."""
    monkeypatch.chdir(tmp_path)
    merged = tmp_path / "models/merged"
    merged.mkdir(parents=True)
    (merged / "config.json").write_text("{}")
    (merged / "model.safetensors").write_bytes(b"weights v1")
    (merged / "tuneline_params.json").write_text('{"register": {"alpha": 0.05}}')  # the run's record: not the model
    params = recipes.build("descramble", ["register.model_name=m"])
    v = client.create_model_version("m", source="file:///nowhere").version
    client.set_model_version_tag("m", v, serving.IDENTITY_TAG, serving.identity(params, merged))
    registry.move_champion(client, "m", v, "gate", "test")
    evals = {"tuned": {"chrf": 61.5}}

    (merged / "tuneline_params.json").write_text('{"register": {"alpha": 0.1}}')
    again = recipes.build("descramble", ["register.model_name=m", "register.alpha=0.1"])
    same = gate.already_registered(again, evals, {"examples_key": "k"})
    saved = json.loads((tmp_path / "metrics/register.json").read_text())
    assert saved == same | {"gate": {"decision": "same as champion"}}  # the reason is said, not tabled by DVC
    assert same["version"] == int(v) and same["same_as_champion"] and not same["promoted"] and same["chrf"] == 61.5
    assert len(client.search_model_versions("name='m'")) == 1
    # served with beams, the same weights answer otherwise: a challenger
    assert (
        gate.already_registered(
            recipes.build("descramble", ["register.model_name=m", "evaluate.num_beams=4"]), evals, {"examples_key": "k"}
        )
        is None
    )
    (merged / "model.safetensors").write_bytes(b"weights v2")
    assert gate.already_registered(params, evals, {"examples_key": "k"}) is None


def test_a_version_the_gate_kept_out_trained_again_is_not_registered_again(client, tmp_path, monkeypatch):
    """A re-run that trains nothing new (train.max_steps past what the epochs give, an
    evaluate.* change that re-runs evaluate and register alone) used to register a copy of
    the challenger the gate had kept out: it lost again, and spent one of the gate's
    decisions on these examples, holding every later challenger to a lower level. Judged
    against another champion, on other examples or with other gate settings, it is a
    challenger as usual."""
    monkeypatch.chdir(tmp_path)
    merged = tmp_path / "models/merged"
    merged.mkdir(parents=True)
    (merged / "config.json").write_text("{}")
    (merged / "model.safetensors").write_bytes(b"weights v2")
    params = recipes.build("descramble", ["register.model_name=m"])
    champ, kept = (client.create_model_version("m", source="file:///nowhere").version for _ in range(2))
    registry.move_champion(client, "m", champ, "gate", "test")
    tags = {
        serving.IDENTITY_TAG: serving.identity(params, merged),
        "eval.examples_key": "k",
        "params": json.dumps(flatten(params), sort_keys=True),
        "gate.decision": "kept champion",
        "gate.compared_with": f"champion v{champ}",
    }
    for k, v in tags.items():
        client.set_model_version_tag("m", kept, k, v)
    evals = {"tuned": {"chrf": 58.5}}

    same = gate.already_registered(params, evals, {"examples_key": "k"})
    saved = json.loads((tmp_path / "metrics/register.json").read_text())
    assert saved == same | {"gate": {"decision": f"same as v{kept}"}} and "kept out" in same["gate"]["reason"]
    assert same["version"] == int(kept) and same["same_as_version"] and not same["promoted"]
    assert same["gate"]["decision"] == f"same as v{kept}" and same["chrf"] == 58.5
    assert len(client.search_model_versions("name='m'")) == 2
    # other gate settings, or other test examples: a decision of its own
    for other in ("register.alpha=0.1", "evaluate.primary_metric=bleu"):
        changed = recipes.build("descramble", ["register.model_name=m", other])
        assert gate.already_registered(changed, evals, {"examples_key": "k"}) is None, other
    assert gate.already_registered(params, evals, {"examples_key": "other"}) is None
    # a version the gate promoted once (since rolled back) may fare otherwise now
    client.set_model_version_tag("m", kept, "gate.decision", "promoted")
    assert gate.already_registered(params, evals, {"examples_key": "k"}) is None
    client.set_model_version_tag("m", kept, "gate.decision", "kept champion")
    # another champion since: the same model faces it
    newer = client.create_model_version("m", source="file:///nowhere").version
    registry.move_champion(client, "m", newer, "promote", "test")
    assert gate.already_registered(params, evals, {"examples_key": "k"}) is None

    # no champion yet: kept out against the base model at its best prompting, as it faces now
    first = recipes.build("descramble", ["register.model_name=first"])
    client.create_registered_model("first")
    v = client.create_model_version("first", source="file:///nowhere").version
    base = f"base model {first.model.name} (chat prompting)"
    for k, val in (tags | {"gate.decision": "not promoted", "gate.compared_with": base}).items():
        client.set_model_version_tag("first", v, k, val)
    assert gate.already_registered(first, evals, {"examples_key": "k", "base_prompting": "chat"})["version"] == int(v)
    assert gate.already_registered(first, evals, {"examples_key": "k", "base_prompting": "plain"}) is None


def test_promote_and_rollback_record_who_when_why_and_walk_back(client):
    versions = [client.create_model_version("m", source="file:///nowhere").version for _ in range(3)]
    for v in versions:  # the gate promotes v1, v2, v3 in turn
        registry.move_champion(client, "m", v, "gate", f"v{v} won")
    registry.rollback(client, "m", "v3 misbehaves in production")
    assert registry.champion(client, "m").version == versions[1]
    registry.rollback(client, "m", "so does v2")
    assert registry.champion(client, "m").version == versions[0]
    with pytest.raises(TunelineError, match="no earlier champion"):
        registry.rollback(client, "m", "again")
    registry.promote(client, "m", versions[2], "fixed upstream")
    events = registry.history(client, "m")
    assert [(e["action"], e["previous"], e["version"]) for e in events] == [
        ("gate", None, "1"),
        ("gate", "1", "2"),
        ("gate", "2", "3"),
        ("rollback", "3", "2"),
        ("rollback", "2", "1"),
        ("promote", "1", "3"),
    ]
    assert events[3]["why"] == "v3 misbehaves in production" and events[3]["who"] == registry.user()
    assert all(e["when"].endswith("+00:00") for e in events)


def test_a_decision_that_kept_the_champion_is_a_history_event_with_its_evidence(client):
    v1, v2, v3 = (client.create_model_version("m", source="file:///nowhere").version for _ in range(3))
    for v, decision in ((v1, "promoted"), (v2, "kept champion"), (v3, "not promoted")):
        for k, val in {
            "decision": decision,
            "reason": f"v{v}: not better",
            "p_value": "0.4",
            "level": "0.0076",
        }.items():
            client.set_model_version_tag("m", v, f"gate.{k}", val)
        client.set_model_version_tag("m", v, "registered_by", "ana")
    kept = registry.kept_decisions(client, "m")
    # the promotion is a champion move already
    assert sorted((e["version"], e["decision"], e["who"]) for e in kept) == [
        ("2", "kept champion", "ana"),
        ("3", "not promoted", "ana"),
    ]
    assert all("not better (p=0.4, level 0.0076)" in e["why"] and e["when"].endswith("+00:00") for e in kept)
    # A reason that gives the test's p already is not followed by it a second time.
    said = "v3: not significant (p=0.4 >= 0.0076, bootstrap)"
    client.set_model_version_tag("m", v3, "gate.reason", said)
    assert [e["why"] for e in registry.kept_decisions(client, "m") if e["version"] == "3"] == [said]


def test_promote_refuses_a_version_that_does_not_exist(client):
    client.create_model_version("m", source="file:///nowhere")
    for ref in ("7", "v7"):
        with pytest.raises(TunelineError, match="has no version 7.*choose one of: 1"):
            registry.promote(client, "m", ref, "why not")


def test_promote_takes_a_version_as_history_writes_it_or_an_alias(client):
    """`tuneline promote v2` said "model 'm' has no version v2" while `history` writes v2
    and `export --version` takes it."""
    for _ in range(3):
        client.create_model_version("m", source="file:///nowhere")
    registry.promote(client, "m", "v2", "as history writes it")
    assert str(registry.champion(client, "m").version) == "2"
    client.set_registered_model_alias("m", "challenger", "3")
    registry.promote(client, "m", " challenger ", "the challenger holds up")
    assert [(e["previous"], e["version"]) for e in registry.history(client, "m")] == [(None, "2"), ("2", "3")]
    with pytest.raises(TunelineError, match="m v3 is already the champion"):
        registry.promote(client, "m", "3", "again")


def test_a_model_without_a_champion_names_the_version_there_is(client):
    """`tuneline predict` under params.yaml's model said only "has no champion yet. Fix:
    promote a version", and `tuneline export` "'champion' is not a version or alias ... Fix:
    name ... an alias (champion, ...)"; the newest version can answer or be exported."""
    with pytest.raises(TunelineError, match=r"'m' has no version yet. Fix: run the pipeline first"):
        registry.require_champion(client, "m", "--model models:/{name}/{version}")
    for _ in range(2):
        client.create_model_version("m", source="file:///nowhere")
    with pytest.raises(
        TunelineError,
        match=r"^model 'm' has no champion yet \(the gate promoted none of its 2 version\(s\)\). "
        r"Fix: --model models:/m/2, or promote it: tuneline promote 2 --reason '...'$",
    ):
        registry.require_champion(client, "m", "--model models:/{name}/{version}")
    registry.promote(client, "m", "1", "v2 truncates answers")
    registry.require_champion(client, "m", "--model models:/{name}/{version}")  # there is one now


def test_an_unknown_model_name_says_how_to_ask_for_the_registered_ones(client):
    client.create_registered_model("emotion-classifier")
    # params.yaml names the descrambler, but this store holds other models: say how to pick one
    with pytest.raises(TunelineError, match=r"no registered model 'descrambler'.*--name emotion-classifier, --name m$"):
        registry.require_model(client, "descrambler")
    with pytest.raises(TunelineError, match=r"did you mean 'emotion-classifier'\? \(--name emotion-classifier\)"):
        registry.require_model(client, "emotion-clasifier")
    registry.require_model(client, "m")


def test_the_model_card_has_every_section_and_fits_the_description_column():
    params = recipes.build("descramble")
    metrics = {m: 0.5 for m in ("chrf", "exact_match", "bleu", "multiset_rate", "perplexity")}
    comparison = {
        "metric": "chrf",
        "delta": 10.0,
        "ci_low": 5.0,
        "ci_high": 15.0,
        "p_value": 0.001,
        "test": "bootstrap",
    }
    gate = {
        "decision": "promoted",
        "reason": "chrf 60 vs base's 50",
        "compared_with": "base model x",
        "metric": "chrf",
        "challenger_value": 60.0,
        "reference_value": 50.0,
        "delta": 10.0,
        "ci_low": 5.0,
        "ci_high": 15.0,
        "p_value": 0.001,
        "test": "bootstrap",
        "n": 200,
        "decision_on_these_examples": 2,
        "level": 0.0076,
        "detectable_effect": 4.2,
        "guardrails": [_guard("unterminated_rate", 0.001, 0.02, 0.03) | {"holds": True}],
    }
    long = "word " * 200
    text = card.description(
        name="descrambler",
        version="3",
        params=params,
        flat=flatten(params),
        gate=gate,
        evals={
            "base": metrics,
            "tuned": metrics | {"chrf": 60.0},
            "primary_metric": "chrf",
            "n_examples": 200,
            "tuned_vs_base": comparison,
            "base_prompting": "chat",
            "base_by_prompting": {"plain": metrics | {"chrf": 0.3}, "chat": metrics, "few_shot": metrics},
        },
        samples=[{"prompt": long, "target": long, "base_output": long, "tuned_output": long}] * 5,
        lineage={"source": {"source": "builtin:wikipedia", "sha256": "ab12"}},
        data_hashes={"data.prepare.md5": "d1.dir", "data.tokenize.md5": "d2.dir"},
        commit="abc123",
        train={"steps": 80, "best_val_loss": 1.03, "best_step": 80},
        prepared={
            "near_duplicates": 2,
            "near_duplicate_pairs": [
                {
                    "train": "The cat sat on the mat.",
                    "split": "test",
                    "other": "The dog sat on the mat.",
                    "similarity": 0.6,
                }
            ],
        },
    )
    assert len(text) <= card.MAX_CHARS
    for part in (
        "# descrambler v3",
        "smollm2-135m-instruct",
        "LoRA (r=16",
        "## Gate decision",
        "**promoted**",
        "[+5, +15]",
        "| chrf (primary) | 0.5 | 60 | +59.5 |",
        "prompted chat (the best of the ways tried on chrf: plain 0.3, chat 0.5, few_shot 0.5)",
        "sha256 `ab12`",
        "(dvc.lock md5): `d1.dir`",
        "near-duplicate audit (word uni+bigram Jaccard >= 0.5 with a val/test row): 2 training rows (none allowed)",
        "0.60: `The cat sat on the mat.` ~ test `The dog sat on the mat.`",
        "| train.lr | `0.002` |",
        "Repeated testing: decision 2 on these test examples, tested at level 0.0076",
        "a true chrf gain of 4.2 is found 80% of the time",
        "| unterminated_rate | 0.05 | 0.02 | 0.03 | -0.01 | 0.001 | yes |",
        "## Sample predictions (5)",
        "## Intended use",
        "## Limits",
    ):
        assert part in text, part


def test_the_card_lists_a_sources_files_with_their_hashes():
    # a local file's lineage is {path: hash}; the card once printed that dict's repr
    one = card._lineage("source", {"source": "../d/train.jsonl", "sha256": {"/r/main/../d/train.jsonl": "0fd"}})
    assert one == ["- source: `../d/train.jsonl`, sha256 `0fd`"]
    many = {f"/r/main/../d/part-{i}.txt": f"h{i}" for i in range(7)}
    text = "\n".join(card._lineage("source", {"source": "../d/*.txt", "sha256": many}))
    assert text.startswith("- source: `../d/*.txt`, 7 files, sha256 of each:")
    assert "  - `/r/d/part-0.txt`: `h0`" in text and "part-5" not in text and "and 2 more" in text
    assert "{" not in text


def test_data_hashes_come_from_dvc_lock(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        "schema: '2.0'\nstages:\n  prepare:\n    outs:\n    - path: data/prepared\n      md5: abc.dir\n"
        "    - path: metrics/prepare.json\n      md5: 0123\n"  # the stage's metrics are not its data
        "  tokenize:\n    outs:\n    - path: data/tokenized\n      md5: def.dir\n"
        "    - path: metrics/tokenize.json\n      md5: 4567\n"
    )
    assert data_hashes(lock) == {"data.prepare.md5": "abc.dir", "data.tokenize.md5": "def.dir"}
