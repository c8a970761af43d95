"""The `champion` alias and its history.

Every move of `champion` (by the gate, `tuneline promote` or `tuneline rollback`) is kept
as a registered-model tag `champion.history.<ns timestamp>` holding who (the OS user),
when (UTC), why, the version and the one before it. MLflow keeps only an alias's current
target; these tags are the audit trail, shown in the UI and by `tuneline history`.
"""

from __future__ import annotations

import getpass
import json
import time
from datetime import UTC, datetime

from tuneline.errors import TunelineError

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY = "champion.history."


def gate_lock(name: str):
    """One champion gate at a time per (store, model) on this machine. Two pipeline runs that
    finish together then gate one after the other: the second challenger faces the first's
    outcome, so `champion` ends on the better of the two whatever the order."""
    import hashlib

    from tuneline.lock import machine_lock
    from tuneline.store import tracking_uri

    return machine_lock(f"gate-{hashlib.sha256(f'{tracking_uri()}|{name}'.encode()).hexdigest()[:12]}")


def exists(client, name: str) -> bool:
    """Whether the registry holds a model `name` (with or without versions)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False


def require_model(client, name: str) -> None:
    """One line for a name the registry does not hold, with the nearest one it does and how
    to ask for it (every command that reads the registry takes --name)."""
    import difflib

    if exists(client, name):
        return
    known = sorted(m.name for m in client.search_registered_models(max_results=1000))
    close = difflib.get_close_matches(name, known, n=1)
    raise TunelineError(
        f"no registered model '{name}'",
        f"did you mean '{close[0]}'? (--name {close[0]})"
        if close
        else (
            "ask for one of the registered models: " + ", ".join(f"--name {k}" for k in known[:5])
            if known
            else "run the pipeline first (`tuneline run`)"
        ),
    )


def check_reason(reason: str) -> str:
    if not reason.strip():
        raise TunelineError(
            "--reason is empty: the history must say why the champion moved",
            "say why, e.g. --reason 'v3 truncates long answers'",
        )
    return reason.strip()


def champion(client, name: str):
    """The champion ModelVersion, or None when there is none (or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def require_champion(client, name: str, what: str) -> None:
    """One line when `name` has versions but none was promoted, naming the newest (which
    `tuneline predict --model` can answer with) and how to promote it. `what`: the fix's use."""
    if champion(client, name) is not None:
        return
    versions = [int(v.version) for v in client.search_model_versions(f"name = '{name}'")]
    if not versions:
        raise TunelineError(f"model '{name}' has no version yet", "run the pipeline first (`tuneline run`)")
    newest = max(versions)
    raise TunelineError(
        f"model '{name}' has no champion yet (the gate promoted none of its {len(versions)} version(s))",
        what.format(name=name, version=newest) + f", or promote it: tuneline promote {newest} --reason '...'",
    )


def version(client, name: str, ref: str | int):
    """A version of `name` by number (3 or v3) or by alias (champion, challenger)."""
    import re

    from mlflow.exceptions import MlflowException

    ref = str(ref).strip()
    if num := re.fullmatch(r"v?(\d+)", ref):
        return _existing(client, name, num.group(1))
    try:
        return client.get_model_version_by_alias(name, ref)
    except MlflowException:
        raise TunelineError(
            f"'{ref}' is not a version or alias of model '{name}'",
            "name a version (3 or v3) or an alias (champion, challenger); see `tuneline history`",
        ) from None


def decisions_on(client, name: str, examples_key: str) -> int:
    """How many gate decisions registered versions of `name` record on these test examples
    (the tag `eval.examples_key`): the gate spends its alpha over them."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:  # no such model yet
        return 0
    return sum(v.tags.get("eval.examples_key") == examples_key for v in versions)


def history(client, name: str) -> list[dict]:
    """Every champion move, oldest first."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(name).tags
    except MlflowException:
        return []
    return [json.loads(tags[k]) for k in sorted(tags) if k.startswith(HISTORY)]


def kept_decisions(client, name: str) -> list[dict]:
    """The gate's decisions that left the champion where it was (promotions are champion
    moves already), as history events: from each version's `gate.*` tags."""
    events = []
    for v in client.search_model_versions(f"name='{name}'"):
        tags = v.tags
        if "gate.decision" not in tags or tags["gate.decision"] == "promoted":
            continue
        level, reason = tags.get("gate.level"), tags.get("gate.reason", "")
        # "not better" states no test; "not significant (p=… >= level, …)" already does
        said = "(p=" in reason
        evidence = f" (p={float(tags['gate.p_value']):.3g}, level {float(level):.3g})" if level and not said else ""
        events.append(
            {
                "when": datetime.fromtimestamp(v.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
                "action": "gate",
                "version": str(v.version),
                "decision": tags["gate.decision"],
                "who": tags.get("registered_by") or v.user_id or "-",
                "why": reason + evidence,
            }
        )
    return events


def user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"


def move_champion(client, name: str, version: str, action: str, why: str) -> dict:
    """Point `champion` at `version` and record the move."""
    before = champion(client, name)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    event = {
        "action": action,
        "version": str(version),
        "previous": str(before.version) if before else None,
        "who": user(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "why": why,
    }
    client.set_registered_model_tag(name, f"{HISTORY}{time.time_ns()}", json.dumps(event))
    return event


def withdraw(client, name: str, version: str, new_model: bool) -> None:
    """Delete a version whose registration failed half-way (and its registered model, where
    this registration created it: `new_model`), so the registry is as it was before."""
    try:
        if new_model:
            client.delete_registered_model(name)
        else:
            client.delete_model_version(name, str(version))
    except Exception as e:  # the store failing too: say so, and let the first error be the one reported
        print(
            f"[register] {name} v{version} could not be withdrawn ({type(e).__name__}); it has no gate "
            "decision: delete it in the MLflow UI",
            flush=True,
        )
        return
    print(f"[register] {name} v{version} withdrawn: its registration did not finish", flush=True)


def _existing(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        known = sorted((int(v.version) for v in client.search_model_versions(f"name = '{name}'")), reverse=True)
        raise TunelineError(
            f"model '{name}' has no version {version}",
            f"choose one of: {', '.join(map(str, known[:10])) or '(none registered)'}",
        ) from None


def promote(client, name: str, ref: str | int, why: str) -> dict:
    """Make the version `ref` names (3, v3 or an alias) the champion by hand."""
    chosen = str(version(client, name, ref).version)
    current = champion(client, name)
    if current is not None and str(current.version) == chosen:
        raise TunelineError(f"{name} v{chosen} is already the champion", "nothing to do")
    return move_champion(client, name, chosen, "promote", why)


def rollback_target(client, name: str) -> str:
    """The champion before the current one: the `previous` of the latest non-rollback move
    to the current champion. Rolling back again walks further back."""
    current = champion(client, name)
    if current is None:
        raise TunelineError(f"model '{name}' has no champion", "run the pipeline or `tuneline promote VERSION` first")
    moves = [e for e in history(client, name) if e["version"] == str(current.version) and e["action"] != "rollback"]
    if not moves or not moves[-1]["previous"]:
        raise TunelineError(
            f"{name} v{current.version} has no earlier champion to roll back to",
            "use `tuneline promote VERSION` to pick one",
        )
    return moves[-1]["previous"]


def rollback(client, name: str, why: str) -> dict:
    target = rollback_target(client, name)
    _existing(client, name, target)
    return move_champion(client, name, target, "rollback", why)
