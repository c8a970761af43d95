"""End to end on tiny data, in a throwaway project: Prefect flow, DVC, MLflow, registry."""

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from conftest import copy_project

from tuneline.tasks import same_words

pytestmark = pytest.mark.slow

STAGES = ["prepare", "tokenize", "train", "validate", "evaluate", "register"]


def _runs(proj, experiment="tuneline"):
    code = f"""
import json, mlflow
mlflow.set_tracking_uri('sqlite:///mlflow.db')
exp = mlflow.get_experiment_by_name('{experiment}')
runs = mlflow.search_runs([exp.experiment_id], output_format='list')
print(json.dumps([dict(id=r.info.run_id, status=r.info.status, tags=r.data.tags,
                       params=r.data.params, metrics=r.data.metrics) for r in runs]))
"""
    return json.loads(proj.python(code).strip().splitlines()[-1])


def _version(proj, name="descrambler", ref="champion"):
    """A registered version's number, aliases, tags and description (ref: alias or number)."""
    get = (
        f"c.get_model_version_by_alias('{name}', '{ref}')"
        if not ref.isdigit()
        else f"c.get_model_version('{name}', '{ref}')"
    )
    out = proj.python(
        "import json, mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db'); c = mlflow.MlflowClient()\n"
        f"v = {get}\n"
        "print(json.dumps([str(v.version), sorted(v.aliases), v.tags, v.description]))"
    )
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def project(built, tmp_path_factory):
    """A copy of the session's finished tiny project (`tuneline run` ran every stage)."""
    return copy_project(built, tmp_path_factory.mktemp("pipeline") / "proj")


def test_the_flow_runs_every_stage_and_registers_a_champion(project):
    out = project.flow_out
    assert "pipeline finished" in out
    assert "try it:      tuneline predict 'cat the on sat mat the'   (descrambler v1, the champion)" in out
    # MLflow's INFO chatter ("Creating initial MLflow database tables...", "Validating input
    # example against model signature") is not in what the user reads.
    # Nor is MLflow's own "Successfully registered model 'x'." (the [register] line says it).
    chatter = [
        line
        for line in (out + project.flow_err).splitlines()
        if " INFO mlflow" in line or "Successfully registered model" in line
    ]
    assert chatter == [], chatter
    assert "[register] descrambler v1 -> champion" in out
    runs = _runs(project)
    parents = [r for r in runs if r["tags"].get("tuneline.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0]["status"] == "FINISHED"
    children = [r for r in runs if r["tags"].get("mlflow.parentRunId") == parents[0]["id"]]
    assert sorted(r["tags"]["tuneline.stage"] for r in children) == sorted(STAGES)
    assert all(r["params"]["train.lr"] == "0.002" for r in children + parents)  # flattened params everywhere
    assert {"base_exact_match", "tuned_bleu", "tuned_perplexity"} <= set(parents[0]["metrics"])
    train_run = next(r for r in children if r["tags"]["tuneline.stage"] == "train")
    assert {"train_loss", "val_loss", "tokens_per_s", "trainable_tokens_per_s", "mfu", "peak_memory_mb"} <= set(
        train_run["metrics"]
    )  # logged per logging step

    # Artifacts a user looks for: the loss curve PNG and the predictions table.
    arts = project.python(
        "import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db'); c = mlflow.MlflowClient()\n"
        f"print([a.path for r in {[r['id'] for r in children]!r} for a in c.list_artifacts(r)])"
    )
    assert "loss_curve.png" in arts and "predictions.json" in arts

    # The registered champion answers through the generic pyfunc interface, offline.
    answer = project.python(
        "import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db')\n"
        "m = mlflow.pyfunc.load_model('models:/descrambler@champion')\n"
        "print(repr(m.predict(['sat cat the'])))\n"
        "c = mlflow.MlflowClient(); v = c.get_model_version_by_alias('descrambler', 'champion')\n"
        "import json; print(json.dumps([v.version, sorted(v.aliases), v.tags['git.commit'], v.tags['data.prepare.md5']]))"
    )
    pred, meta = answer.strip().splitlines()[-2:]
    assert isinstance(ast.literal_eval(pred)[0], str)
    version, aliases, commit, data_md5 = json.loads(meta)
    assert str(version) == "1" and aliases == ["challenger", "champion"] and commit
    assert re.fullmatch(r"[0-9a-f]{32}(\.dir)?", data_md5)
    # safetensors weights, no pickles
    files = project.run("find", "mlartifacts", "-name", "*.safetensors").stdout
    assert "model.safetensors" in files
    # Nothing pickled among the artifacts: no pickle stream, no torch.save zip.
    heads = {p: p.read_bytes()[:4] for p in (project.root / "mlartifacts").rglob("*") if p.is_file()}
    assert [p.name for p, h in heads.items() if h[:1] == b"\x80" or h == b"PK\x03\x04"] == []

    # The gate compared v1 with the base model at its best (of plain and few-shot: GPT-2 has no
    # chat template), and says so on the version and in its card.
    _, _, tags, card = _version(project)
    evals = json.loads((project.root / "metrics/eval.json").read_text())
    assert set(evals["base_by_prompting"]) == {"plain", "few_shot"}
    best = min(evals["base_by_prompting"], key=lambda k: evals["base_by_prompting"][k]["perplexity"])
    assert evals["base_prompting"] == best and evals["base"] == evals["base_by_prompting"][best]
    assert tags["gate.decision"] == "promoted"
    # The merged model was checked against the adapted one before it was logged.
    assert re.fullmatch(r"(\d+)/\1", tags["parity.greedy_agree"]) and float(tags["parity.max_logit_diff"]) <= 1e-3
    assert tags["gate.compared_with"] == f"base model tiny-gpt2 ({best} prompting)"
    assert float(tags["gate.p_value"]) < 0.05 and float(tags["gate.delta"]) < 0  # lower perplexity
    for section in (
        "# descrambler v1",
        "## Gate decision",
        "| perplexity (primary) |",
        "## Data lineage",
        "(dvc.lock md5)",
        "near-duplicate audit (word uni+bigram Jaccard >= 0.5 with a val/test row): 0 training rows",
        "## Params",
        "## Sample predictions (5)",
        "## Intended use",
        "## Limits",
    ):
        assert section in card, section
    hist = project.run(sys.executable, "-m", "tuneline.cli", "history").stdout
    assert re.search(r"gate +none -> v1 +by \S+: perplexity", hist), hist

    # Every value DVC tables (`dvc metrics show` / `diff`, `dvc exp show`) fits a column: the
    # gate's reason, a sentence in metrics/register.json, made each line of `dvc metrics diff`
    # 472 characters wide. It is said where sentences are read (above: history, the card).
    def leaves(d):
        for v in d.values():
            yield from leaves(v) if isinstance(v, dict) else [v]

    metrics = {p.name: json.loads(p.read_text()) for p in (project.root / "metrics").glob("*.json")}
    assert "register.json" in metrics
    long = [(n, v) for n, m in metrics.items() for v in leaves(m) if isinstance(v, str) and len(v) > 64]
    assert long == [], long


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_champion_answers_over_http(project):
    """The issue's command, as a user types it in the project, offline; a real POST."""
    port = _free_port()
    server = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", "models:/descrambler@champion", "--env-manager", "local", "-p", str(port)],
        cwd=project.root,
        env=project.env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 180
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "the model server did not start in 180 s"
                time.sleep(1)

        def post(body: dict) -> list[str]:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                method="POST",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            return json.loads(urllib.request.urlopen(request, timeout=120).read())["predictions"]

        kept = post({"inputs": ["sat cat the"]})
        free = post({"inputs": ["sat cat the"], "params": {"constrain": "none"}})
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    local = project.python(
        "import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db')\n"
        "m = mlflow.pyfunc.load_model('models:/descrambler@champion')\n"
        "print(repr(m.predict(['sat cat the'])))\n"
        "print(repr(m.predict(['sat cat the'], params={'constrain': 'none'})))"
    )
    assert [kept, free] == [ast.literal_eval(line) for line in local.strip().splitlines()[-2:]]  # the same answers
    assert same_words(kept[0], "sat cat the") and not same_words(free[0], "sat cat the")  # served as evaluated


def test_predict_answers_a_descrambler_with_the_inputs_words(project):
    """`tuneline predict` answers as the served model does, both as evaluate scored (under
    the word constraint): even this untrained tiny model answers with exactly the input's
    words, by beam search too (`--beams`); `--free` asks the served model to decode freely.
    Several inputs, as arguments or stdin's lines ('-'), get one answer per line, in order."""
    texts = ["sat cat the mat on the", "dog the ran"]
    cli = [sys.executable, "-m", "tuneline.cli", "predict"]
    kept = project.run(*cli, "--beams", "3", *texts).stdout.strip().splitlines()[-2:]
    free = project.run(*cli, "--free", "-", stdin="\n".join(texts) + "\n").stdout.strip().splitlines()[-2:]
    served = project.python(
        "import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db')\n"
        "m = mlflow.pyfunc.load_model('models:/descrambler@champion')\n"
        f"print(*m.predict({texts!r}, params={{'num_beams': 3}}), sep='\\n')\n"
        f"print(*m.predict({texts!r}, params={{'constrain': 'none'}}), sep='\\n')"
    )
    assert kept + free == served.strip().splitlines()[-4:]
    assert all(same_words(k, t) for k, t in zip(kept, texts)) and not same_words(free[0], texts[0]), (kept, free)


def test_export_writes_the_champion_as_a_folder_that_transformers_loads(project, tmp_path):
    """`tuneline export` from the project's registry (its checks: tests/test_export.py)."""
    out = project.run(sys.executable, "-m", "tuneline.cli", "export", str(tmp_path / "hf")).stdout
    assert f"descrambler v1 exported to {tmp_path / 'hf'}" in out and "as tuneline does" in out, out
    meta = yaml.safe_load((tmp_path / "hf" / "README.md").read_text().split("---\n")[1])
    assert meta["tags"] == ["tuneline", "descramble", "lora", "custom_generate"]
    assert json.loads((tmp_path / "hf" / "tuneline_params.json").read_text())["model"]["name"] == "tiny-gpt2"
    assert (tmp_path / "hf" / "custom_generate" / "generate.py").is_file()  # a descrambler keeps to the words


def test_dvc_skips_then_a_train_change_reruns_train_and_gates_against_the_champion(project):
    # Right after, `dvc repro` skips every stage, fast, and nothing is out of date.
    t = time.time()
    out = project.run(sys.executable, "-m", "dvc", "repro").stdout
    assert time.time() - t < 10, "a no-op dvc repro must take at most 10 s"
    assert all(f"'{s}' didn't change" in out for s in STAGES), out
    assert "up to date" in project.run(sys.executable, "-m", "dvc", "status").stdout

    # The gate run again (another register.alpha) on the champion's own model registers no
    # copy of it: register runs, and says the model is v1.
    project.set_params({"register": {"alpha": 0.1}})
    out = project.run(sys.executable, "-m", "dvc", "repro").stdout
    assert "Running stage 'register'" in out and "Running stage 'train'" not in out, out
    assert "the trained model is descrambler v1, the champion" in out and "created descrambler" not in out, out
    assert json.loads((project.root / "metrics/register.json").read_text())["same_as_champion"]

    # A train.* change re-runs only train, validate, evaluate and register.
    before = {r["id"] for r in _runs(project)}
    project.set_params({"train": {"lr": 0.001}})
    status = json.loads(project.run(sys.executable, "-m", "dvc", "status", "--json").stdout)
    assert set(status) == {"train"}  # what DVC sees as changed
    out = project.run(sys.executable, "-m", "dvc", "repro").stdout
    for s in ("prepare", "tokenize"):
        assert f"'{s}' didn't change" in out
    for s in ("train", "validate", "evaluate", "register"):
        assert f"Running stage '{s}'" in out
    lock = yaml.safe_load((project.root / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train.lr"] == 0.001
    # DVC-started runs also get one parent with a child per stage that ran
    runs = _runs(project)
    dvc_parent = [r for r in runs if r["tags"].get("tuneline.source") == "dvc" and r["id"] not in before]
    assert len(dvc_parent) == 1
    kids = [r["tags"]["tuneline.stage"] for r in runs if r["tags"].get("mlflow.parentRunId") == dvc_parent[0]["id"]]
    assert sorted(kids) == ["evaluate", "register", "train", "validate"]
    # v2 faced champion v1 on the same examples, through v1's logged per-example results
    # (not by evaluating v1 again).
    assert "evaluating it on these" not in out and "unreadable" not in out, out
    _, aliases, tags, card = _version(project, ref="2")
    assert tags["gate.compared_with"] == "champion v1" and "challenger" in aliases
    assert tags["gate.decision"] in ("promoted", "kept champion")
    assert (_version(project)[0] == "2") == (tags["gate.decision"] == "promoted")
    # register wrote the review of v2 against v1 into v2's run, and the card points to it
    assert "`review/diff.md` (and `.html`) in this version's MLflow run" in card
    review = project.python(
        "import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db')\n"
        "from tuneline.provenance import artifact_text\n"
        f"run = '{tags['run_id']}'\n"
        "md, page = artifact_text(run, 'review/diff.md'), artifact_text(run, 'review/diff.html')\n"
        "print(md.splitlines()[0], '|', '<table>' in page and '<h2>What changed</h2>' in page)"
    )
    assert review.strip().splitlines()[-1] == "# v2 against v1 | True"
    # ... and the champion's answers its gate compared, which the review pairs (v1's own, on these examples)
    faced = project.python(
        "import json, mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db')\n"
        "from tuneline.provenance import artifact_text\n"
        f"faced = json.loads(artifact_text('{tags['run_id']}', 'eval/faced.json'))\n"
        "own = json.loads(artifact_text(faced['run_id'], 'eval/examples.json'))['tuned']\n"
        "print(faced['version'], faced['tuned']['outputs'] == own['outputs'] and len(own['outputs']) > 0)"
    )
    assert faced.strip().splitlines()[-1] == "1 True"
    assert "`train.lr`: 0.002 -> 0.001" in project.python(
        "import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db')\n"
        f"from tuneline.provenance import artifact_text; print(artifact_text('{tags['run_id']}', 'review/diff.md'))"
    )


def test_a_stage_started_by_the_flow_starts_with_sigint_blocked_whatever_the_users_shell(monkeypatch):
    # DVC runs a stage's cmd as `$SHELL -c cmd`; dash (/bin/sh here) clears the signal mask,
    # which reopened the start-up window in which a Ctrl-C became an import's traceback.
    from dvc.stage.run import _make_cmd, get_executable

    from flows.dvc_tasks import sigint_held_for_stages

    probe = f"{sys.executable} -c 'import signal; print(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))'"
    monkeypatch.setenv("SHELL", "/bin/sh")
    with sigint_held_for_stages():
        inside = subprocess.run(_make_cmd(get_executable(), probe), capture_output=True, text=True, close_fds=True)
    assert inside.stdout.strip() == "True", inside
    assert os.environ["SHELL"] == "/bin/sh"  # the user's shell is back, and so is the flow's mask
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_a_half_written_dvc_rwlock_is_removed_and_a_valid_one_kept(tmp_path):
    """A Ctrl-C inside DVC's in-place rewrite of .dvc/tmp/rwlock left it empty or cut short,
    and the next run failed with RWLockFileCorruptedError (seen in CI); it is removed first."""
    from dvc.fs import LocalFileSystem
    from dvc.rwlock import rwlock

    from flows.dvc_tasks import heal_rwlock

    lock = tmp_path / ".dvc" / "tmp" / "rwlock"
    lock.parent.mkdir(parents=True)
    assert heal_rwlock(tmp_path) is False  # none yet
    for cut in ("", '{"read": {}, "wri'):
        lock.write_text(cut)
        assert heal_rwlock(tmp_path) is True and not lock.exists()
        with rwlock(str(lock.parent), LocalFileSystem(), "dvc status", [], [], False):  # DVC can lock again
            pass
    lock.write_text('{"read": {}, "write": {}}')
    assert heal_rwlock(tmp_path) is False and lock.read_text() == '{"read": {}, "write": {}}'


def test_a_run_dvc_cannot_save_says_why_in_one_line_not_dvcs_support_footer(tmp_path, monkeypatch, capsys):
    """`git init` with no commit yet: the run works, DVC cannot save it as an experiment; the
    note read "(['Having any troubles? Hit us up at https://dvc.org/support, ...'])"."""
    import flows.dvc_tasks as dt

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.setattr(dt, "ROOT", tmp_path)
    assert dt.save_experiment.fn("run-1", "tuneline run") is None
    (note,) = [line for line in capsys.readouterr().out.splitlines() if "note:" in line]
    assert note == (
        "[tuneline] note: not saved as a DVC experiment (Empty git repo; commit the project once "
        "(`git add -A && git commit -m start`) to keep each run as one)"
    )
