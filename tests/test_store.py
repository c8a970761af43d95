import sqlite3
import time

import pytest

from tuneline import store
from tuneline.errors import TunelineError


@pytest.mark.parametrize(
    "ref, stored",
    [
        ("models:/descrambler@champion", True),
        ("models:/descrambler/3", True),
        ("runs:/0123abcd/model", True),
        ("smollm2-135m-instruct", False),
        ("models/merged", False),  # a local folder, however it is named
        ("HuggingFaceTB/SmolLM2-135M-Instruct", False),
    ],
)
def test_a_store_uri_is_told_from_a_model_name(ref, stored):
    assert store.in_store(ref) is stored


def test_a_file_that_is_not_a_database_is_one_line_naming_the_way_out(tmp_path):
    (tmp_path / "mlflow.db").write_text("not a database\n" * 100)
    with pytest.raises(TunelineError, match=r"is not a usable SQLite database.*Fix: move it aside \(mv "):
        store.check_store(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_a_server_that_does_not_answer_fails_in_seconds_without_its_password(tmp_path):
    t = time.time()
    with pytest.raises(TunelineError, match="does not answer") as e:
        store.check_store("http://user:s3cret@127.0.0.1:9/")  # the discard port: refused
    assert time.time() - t < 10 and "s3cret" not in str(e.value)


def test_opening_a_new_store_creates_its_tables_once_and_points_mlflow_at_it(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("TUNELINE_LOCK_DIR", str(tmp_path / "locks"))
    assert store.open_store() == uri and mlflow.get_tracking_uri() == uri
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"experiments", "runs", "registered_models", "model_versions"} <= tables
    assert store.open_store() == uri  # a second use finds the tables
