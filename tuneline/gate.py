"""The champion gate: compare a challenger with the champion (or the base model) on the
same test examples, register it, and move the aliases.

The `champion` alias moves only if the challenger is better on the primary metric, by at
least register.min_delta, significantly (paired bootstrap or McNemar), and, against a
champion, no guardrail metric is worse by more than its margin (non-inferiority tests,
Holm-corrected with the primary test). The level is register.alpha spent over the gate
decisions made on the same test examples (alpha·6/(π²k²) for the k-th). A failed or NaN
evaluation never promotes. The champion's per-example results come from the
artifact logged with it (`eval/examples.json`); if it was evaluated on other examples or
settings, it is re-evaluated on these. The evidence is tagged on the version (`gate.*`),
and the version's description is its model card (tuneline/card.py). Every new version
gets `challenger`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import asdict

from tuneline import card, registry, scoring, serving
from tuneline.config import Params, RegisterCfg, flatten
from tuneline.data import LINEAGE, MERGED, PREDICTIONS, metrics_file
from tuneline.evaluation import compare, evaluate_model, load_any
from tuneline.io import read_json, write_json
from tuneline.provenance import EVAL_ARTIFACT, FACED_ARTIFACT, artifact_text, data_hashes, git_commit
from tuneline.registry import CHALLENGER
from tuneline.secrets import redact


def decide(
    c: scoring.Comparison, cfg: RegisterCfg, against: str, decision: int = 1, guards: list[dict] = ()
) -> tuple[bool, str]:
    """Promote only if every condition holds; the reason names the one that failed. This is
    the `decision`-th gate decision on these test examples: the tests run at its spent
    alpha (scoring.spent_alpha), the primary test and each guardrail's non-inferiority test
    (`guards`, from `guardrail_tests`) Holm-corrected together; each guard gets `holds`."""
    if not all(math.isfinite(x) for x in (c.a, c.b, c.p_value)):
        return False, f"{c.metric} is {c.a} against {c.b}: a failed evaluation never promotes"
    gain = c.improvement()
    lower = " (lower is better)" if c.metric in scoring.LOWER_IS_BETTER else ""
    shown = (
        f"{c.metric} {c.a:.4g} vs {against}'s {c.b:.4g}{lower}: delta {c.delta:+.4g}, "
        f"95% CI [{c.ci_low:+.4g}, {c.ci_high:+.4g}]"
    )
    if gain <= 0:
        return False, f"{shown}; not better"
    if gain < cfg.min_delta:
        return False, f"{shown}; the gain {gain:.4g} is below register.min_delta={cfg.min_delta}"
    level = level_of(cfg, decision)
    at = f"{level:.3g}" + (f" (register.alpha={cfg.alpha}, decision {decision} on these examples)" if level < 1 else "")
    rejected = scoring.holm([c.p_value, *(g["p_value"] for g in guards)], level)
    for g, ok in zip(guards, rejected[1:]):
        g["holds"] = ok
    holm = f", Holm over {len(guards) + 1} tests" if guards else ""
    if not rejected[0]:
        return False, f"{shown}; not significant (p={c.p_value:.3g} >= {at}, {c.test}{holm})"
    for g in guards:
        if not g["holds"]:
            return False, (
                f"{shown}; but guardrail {g['metric']} is not shown within its margin {g['margin']:g}: "
                f"{g['challenger']:.4g} vs {g['champion']:.4g} (p={g['p_value']:.3g}{holm})"
            )
    return True, f"{shown}; p={c.p_value:.3g} < {at} ({c.test}{holm})" + (
        f"; guardrails hold: {', '.join(g['metric'] for g in guards)}" if guards else ""
    )


def level_of(cfg: RegisterCfg, decision: int) -> float:
    """The significance level of the `decision`-th decision on the same test examples
    (register.alpha spent over decisions; alpha 1 keeps the test off)."""
    return 1.0 if cfg.alpha >= 1 else scoring.spent_alpha(cfg.alpha, decision)


def guardrail_tests(params: Params, rows: list[dict], ev: dict, ref: dict) -> list[dict]:
    """The non-inferiority test of each guardrail (params.guardrails()), challenger `ev`
    against champion `ref` on `rows`. One the champion's record cannot score (registered
    before it was recorded) or with no example (a label absent from the test split) is left
    out, and said."""
    from tuneline.tasks import TASKS

    task, labels, out = TASKS[params.prepare.task], params.prepare.labels, []
    for metric, margin in params.guardrails().items():
        try:
            a, b = (scoring.stat(task, metric, rows, e, labels) for e in (ev, ref))
        except KeyError:
            print(f"[register] guardrail {metric}: the champion's evaluation does not record it; not tested")
            continue
        c = scoring.compare(a, b, metric, "bootstrap", params.evaluate.n_bootstrap, params.seed, margin=margin)
        if not (math.isfinite(c.a) and math.isfinite(c.b)):
            print(f"[register] guardrail {metric}: no test example to measure it on; not tested")
            continue
        out.append(
            {
                "metric": metric,
                "margin": margin,
                "challenger": c.a,
                "champion": c.b,
                "delta": c.delta,
                "p_value": c.p_value,
            }
        )
    return out


def facing(champ, params: Params, record: dict) -> str:
    """What the gate compares a challenger with, as its `gate.compared_with` tag names it:
    the champion version `champ`, or (None) the base model at the prompting evaluate found best."""
    if champ is None:
        return f"base model {params.model.name} ({record.get('base_prompting', 'plain')} prompting)"
    return f"champion v{champ.version}"


def reference(client, name: str, rows: list[dict], params: Params, record: dict) -> tuple[str, str | None, dict]:
    """(what the challenger is compared with, its version or None, its evaluation record)."""
    # A dry run (--smoke) faces the base model: it must not spend minutes re-evaluating a
    # real champion on a toy slice.
    champ = None if params.register.dry_run else registry.champion(client, name)
    label = facing(champ, params, record)
    if champ is None:
        return label, None, record["base"]
    if champ.tags.get("eval.examples_key") == record["examples_key"] and champ.run_id:
        try:
            return label, str(champ.version), json.loads(artifact_text(champ.run_id, EVAL_ARTIFACT))["tuned"]
        except Exception as e:  # artifacts gone: re-evaluating below is still correct
            print(f"[register] {label}'s evaluation artifact is unreadable ({type(e).__name__}); re-evaluating it")
    print(
        f"[register] {label} was evaluated on other examples or settings: evaluating it on these {len(rows)}",
        flush=True,
    )
    model, tok = load_any(f"models:/{name}/{champ.version}")
    return label, str(champ.version), evaluate_model(model, tok, rows, params)


def log_model(params: Params):
    """Log models/merged to the active run, as the model that answers as evaluate scored
    (tuneline/serving.py)."""
    return serving.log_model(params, MERGED)


def write_result(result: dict) -> None:
    """metrics/register.json: the decision and its numbers. The gate's reason, a sentence,
    is left out: DVC tables every value of a metrics file, and that one column made each
    line of `dvc metrics diff` (and a column of `dvc exp show`) hundreds of characters
    wide. It is in the stage's output, the version's `gate.reason` tag, `tuneline history`
    and the model card."""
    gate = {k: v for k, v in result.get("gate", {}).items() if k != "reason"}
    write_json(metrics_file("register"), result | {"gate": gate})


# What decides a gate's outcome besides the model, the examples and what it faces (flatten's keys).
GATE_SETTINGS = (
    "register.min_delta",
    "register.alpha",
    "register.test",
    "register.guardrails",
    "evaluate.primary_metric",
    "evaluate.n_bootstrap",
    "seed",
)


def _judged_alike(version, settings: dict, record: dict, against: str) -> bool:
    """Whether the gate kept `version` out against `against` on these test examples, with
    these `settings` (flattened params): then it would keep the same model out again (a
    later decision is held to a lower level, never a higher one)."""
    tags = version.tags
    if tags.get("gate.decision") in (None, "promoted") or tags.get("gate.compared_with") != against:
        return False
    if tags.get("eval.examples_key") != record["examples_key"]:
        return False
    try:
        then = json.loads(tags.get("params", ""))
    except ValueError:  # cut at the tag's length, or not recorded: judged anew
        return False
    return all(k in then and then[k] == settings.get(k) for k in GATE_SETTINGS)


def already_registered(params: Params, evals: dict, record: dict) -> dict | None:
    """register's result when the trained model is already a registered version (the same
    weights and served settings: `serving.identity`) that the gate would judge as before,
    else None. That is the champion itself (the gate would compare it with itself: delta
    0, never promoted), or a version the gate kept out against the same champion (or base
    model) on these examples with these settings: a re-run that trains nothing new (the
    same seed and data, a train.max_steps past what train.epochs gives, an evaluate.* or
    register.* change that re-runs evaluate and register alone). Registered again, the copy
    would lose again and spend one of the gate's decisions on these examples (each later
    one is held to a lower level). Nothing is registered or uploaded."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if params.register.dry_run:
        return None
    client, name = mlflow.MlflowClient(), params.register.model_name
    champ = registry.champion(client, name)
    identity = serving.identity(params, MERGED)
    primary = params.primary_metric()
    if champ is not None and champ.tags.get(serving.IDENTITY_TAG) == identity:
        found, flag = champ, "same_as_champion"
        why = f"the trained model is {name} v{champ.version}, the champion: the same weights and served settings"
    else:
        against = facing(champ, params, record)
        try:
            versions = client.search_model_versions(f"name='{name}'")
        except MlflowException:  # no such model yet
            versions = []
        same = sorted(
            (v for v in versions if v.tags.get(serving.IDENTITY_TAG) == identity), key=lambda v: int(v.version)
        )
        settings = json.loads(json.dumps(flatten(params)))  # as a version's `params` tag holds them
        found = next((v for v in same if _judged_alike(v, settings, record, against)), None)
        if found is None:
            return None
        flag = "same_as_version"
        why = (
            f"the trained model is {name} v{found.version} (the same weights and served settings), which the gate "
            f"kept out against {against} on these test examples with these settings (`tuneline history` says why; "
            f"`tuneline promote {found.version}` promotes it by hand)"
        )
    print(f"[register] {why}; nothing registered", flush=True)
    result = {"version": int(found.version), "promoted": False, flag: True, primary: evals["tuned"][primary]}
    result["gate"] = {
        "decision": "same as champion" if flag == "same_as_champion" else f"same as v{found.version}",
        "reason": why,
    }
    write_result(result)
    return result


def gate(params: Params, info, evals: dict, record: dict, rows: list[dict], parity: dict | None = None) -> dict:
    """Compare with the champion (or base model), register the version, move the aliases.
    `parity` (tuneline/parity.py's tags) is recorded with the decision."""
    import mlflow

    primary, name, cfg = params.primary_metric(), params.register.model_name, params.register
    client = mlflow.MlflowClient()
    against, against_version, ref = reference(client, name, rows, params, record)
    c = compare(record["tuned"], ref, rows, params, cfg.test)
    # Guardrails protect what the champion already does; the base model has no users to protect.
    guards = guardrail_tests(params, rows, record["tuned"], ref) if against_version else []
    decision = registry.decisions_on(client, name, record["examples_key"]) + 1
    promote, why = decide(c, cfg, against, decision, guards)
    level = level_of(cfg, decision)
    gate = {
        "decision": "promoted" if promote else "kept champion" if against_version else "not promoted",
        "reason": why,
        "compared_with": against,
        "challenger_value": c.a,
        "reference_value": c.b,
        **{k: v for k, v in asdict(c).items() if k not in ("a", "b")},
        "decision_on_these_examples": decision,
        "level": level,
        # the smallest true gain this test finds 80% of the time, at this level, on these examples
        "detectable_effect": scoring.detectable(c.ci_low, c.ci_high, level) if math.isfinite(c.ci_low) else math.nan,
        "guardrails": guards,
    }
    if cfg.dry_run:  # smoke runs: the model is logged to the run, the registry untouched
        print(
            f"[register] dry run: model logged to the run, not registered (gate would "
            f"{'promote' if promote else 'not promote'}: {why})",
            flush=True,
        )
        result = {"version": 0, "promoted": False, "dry_run": True, "gate": gate, "parity": parity or {}, primary: c.a}
        result["model_uri"] = info.model_uri  # what `tuneline predict --model` answers with (the run's summary)
        write_result(result)
        return result

    # MLflow prints "Successfully registered model ..." / "... already exists. Creating a new
    # version" to stderr itself; ours says the same in the stage's voice.
    new_model = not registry.exists(client, name)
    with contextlib.redirect_stderr(io.StringIO()):
        version = mlflow.register_model(info.model_uri, name).version
    print(f"[register] created {name} v{version}; recording its evidence", flush=True)
    try:  # its evidence: tags, the review against the champion it faced, the model card
        gate["challenger"] = f"v{version}"
        flat = flatten(params)
        identity = serving.identity(params, MERGED)
        tags = {
            "git.commit": git_commit(),
            **data_hashes(),
            "params": redact(json.dumps(flat, sort_keys=True))[:5000],
            "base_model": params.model.name,
            "method": params.train.method,
            "primary_metric": primary,
            "run_id": mlflow.active_run().info.run_id,
            "registered_by": registry.user(),  # who ran the gate: `tuneline history` shows it
            "eval.examples_key": record["examples_key"],
            serving.IDENTITY_TAG: identity,  # the champion trained again is not registered again
            **(parity or {}),
        }
        tags |= {f"metric.{k}": str(v) for k, v in evals["tuned"].items()}
        tags |= {f"gate.{k}": str(v) for k, v in gate.items()}
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
        samples = [json.loads(line) for line in PREDICTIONS.read_text().splitlines()[:5]]
        lineage = read_json(LINEAGE) if LINEAGE.is_file() else {}
        facts = dict(
            name=name,
            version=version,
            params=params,
            flat=flat,
            evals=evals,
            gate=gate,
            samples=samples,
            lineage=lineage,
            data_hashes=data_hashes(),
            commit=tags["git.commit"],
            train=read_json(metrics_file("train")) if metrics_file("train").is_file() else {},
            prepared=read_json(metrics_file("prepare")) if metrics_file("prepare").is_file() else None,
        )
        if against_version is not None:  # what it fixed and broke against the champion, for the reviewer
            from tuneline import review

            faced = {"version": against_version, "run_id": client.get_model_version(name, against_version).run_id}
            mlflow.log_text(json.dumps(faced | {"tuned": ref}, default=str), FACED_ARTIFACT)
            facts["review"] = review.log_for_version(client, name, against_version, str(version))
        client.update_model_version(name, version, description=card.description(**facts))
        mlflow.log_text(card.render(**facts), "model_card.md")
    except BaseException:  # an error or Ctrl-C: no version is left without its evidence
        registry.withdraw(client, name, version, new_model)
        raise
    client.set_registered_model_alias(name, CHALLENGER, version)
    if promote:
        registry.move_champion(client, name, version, "gate", why)
    print(f"[register] {name} v{version} -> {'champion' if promote else 'challenger only'} ({why})", flush=True)
    result = {"version": int(version), "promoted": promote, "gate": gate, "parity": parity or {}, primary: c.a}
    write_result(result)
    return result
