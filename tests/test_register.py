"""The champion/challenger gate against a real (sqlite) MLflow registry."""

import math

import mlflow
import pytest

from components.register import CHAMPION, data_hashes, gate


@pytest.fixture
def client(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    c = mlflow.MlflowClient(uri)
    c.create_registered_model("m")
    return c


def _version(client, score: float, metric: str = "exact_match") -> str:
    v = client.create_model_version("m", source="file:///nowhere").version
    client.set_model_version_tag("m", v, f"metric.{metric}", str(score))
    return v


def _champion(client) -> str:
    return client.get_model_version_by_alias("m", CHAMPION).version


def test_first_becomes_champion_worse_does_not_better_does(client):
    v1 = _version(client, 0.30)
    assert gate(client, "m", v1, "exact_match", 0.30)[0] and _champion(client) == v1
    v2 = _version(client, 0.20)
    promoted, why = gate(client, "m", v2, "exact_match", 0.20)
    assert not promoted and _champion(client) == v1 and "<=" in why
    assert client.get_model_version("m", v2).tags["gate.decision"] == "kept champion"
    v3 = _version(client, 0.45)
    assert gate(client, "m", v3, "exact_match", 0.45)[0] and _champion(client) == v3


def test_a_tie_keeps_the_champion(client):
    v1 = _version(client, 0.5)
    gate(client, "m", v1, "exact_match", 0.5)
    v2 = _version(client, 0.5)
    assert not gate(client, "m", v2, "exact_match", 0.5)[0] and _champion(client) == v1


def test_a_nan_evaluation_never_promotes(client):
    v1 = _version(client, math.nan)
    promoted, why = gate(client, "m", v1, "exact_match", math.nan)
    assert not promoted and "never promotes" in why
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias("m", CHAMPION)


def test_perplexity_gate_promotes_the_lower_one(client):
    v1 = _version(client, 80.0, "perplexity")
    gate(client, "m", v1, "perplexity", 80.0)
    v2 = _version(client, 95.0, "perplexity")
    assert not gate(client, "m", v2, "perplexity", 95.0)[0] and _champion(client) == v1
    v3 = _version(client, 60.0, "perplexity")
    promoted, why = gate(client, "m", v3, "perplexity", 60.0)
    assert promoted and _champion(client) == v3 and "60 < champion" in why


def test_a_dry_run_decides_but_moves_and_tags_nothing(client):
    v1 = _version(client, 0.3)
    gate(client, "m", v1, "exact_match", 0.3)
    promoted, why = gate(client, "m", None, "exact_match", 0.9)
    assert promoted and _champion(client) == v1
    assert "gate.decision" not in client.get_model_version("m", v1).tags or \
        client.get_model_version("m", v1).tags["gate.decision"] == "promoted"  # v1's own decision only


def test_data_hashes_come_from_dvc_lock(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text("schema: '2.0'\nstages:\n  prepare:\n    outs:\n    - path: data/prepared\n      md5: abc.dir\n"
                    "  tokenize:\n    outs:\n    - path: data/tokenized\n      md5: def.dir\n")
    assert data_hashes(lock) == {"data.prepare.md5": "abc.dir", "data.tokenize.md5": "def.dir"}
