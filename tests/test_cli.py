import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "tuneline.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_doctor_finds_every_offline_asset():
    proc = _cli("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for label in ("GPT-2 tokenizer", "SmolLM2-135M-Instruct", "Wikipedia dump sample", "params.yaml", "git"):
        assert f"ok   {label}" in proc.stdout


def test_bad_params_give_one_line_and_exit_2(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  lrr: 0.1\n")
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    proc = _cli("run", cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: params.yaml: unknown key 'train.lrr'. Fix: did you mean 'train.lr'?"]
    assert not (tmp_path / "mlflow.db").exists()  # nothing started


def test_help_lists_the_commands():
    out = _cli("--help").stdout
    for cmd in ("run", "ui", "predict", "doctor"):
        assert cmd in out


def test_version_names_tuneline_and_the_stack_that_decides_results(tmp_path):
    """For a bug report, from anywhere (no project needed), and nothing else runs."""
    from importlib.metadata import version

    proc = _cli("--version", "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"tuneline {version('tuneline')} (Python {sys.version.split()[0]}; torch ")
    assert f"transformers {version('transformers')}" in proc.stdout and f"dvc {version('dvc')}" in proc.stdout
    assert len(proc.stdout.splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_an_unknown_recipe_is_one_line_with_a_suggestion(tmp_path):
    import shutil

    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    proc = _cli("run", "--recipe", "emotoin", "--smoke", cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: unknown recipe 'emotoin' (no recipes/emotoin.yaml). Fix: did you mean 'emotion'?"]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".smoke").exists()


def test_a_recipe_named_by_its_file_runs_as_that_recipe_and_a_file_elsewhere_is_refused_with_the_copy(tmp_path):
    import shutil

    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    # as a shell completes it: the recipe is read (its key typo is what stops the run)
    proc = _cli("run", "--recipe", "recipes/emotion.yaml", "--set", "train.lrr=1", "--smoke", cwd=tmp_path)
    assert proc.returncode == 2 and "error: recipes/emotion.yaml with --set: unknown key 'train.lrr'" in proc.stderr
    mine = tmp_path / "elsewhere" / "mine.yml"
    mine.parent.mkdir()
    mine.write_text("train:\n  lr: 0.001\n")
    for command in (["run", "--smoke"], ["sweep", "--grid", "train.lr=0.1,0.2"], ["schedule", "--cron", "0 3 * * *"]):
        proc = _cli(*command, "--recipe", str(mine), cwd=tmp_path)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and lines == [
            f"error: --recipe '{mine}' is not a file recipes/<name>.yaml, and a recipe is one of those, run by its "
            f"name. Fix: copy it there: cp {mine} recipes/mine.yaml, then --recipe mine"
        ], command
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".smoke").exists()


def test_recipes_are_listed_with_what_they_do():
    import os

    from tuneline import recipes

    proc = subprocess.run(
        [sys.executable, "-m", "tuneline.cli", "recipes"],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"COLUMNS": "400"},  # one row per recipe
    )
    rows = [" ".join(line.split()) for line in proc.stdout.splitlines()]
    assert rows == [f"{name} {recipes.summary(name)}" for name in recipes.names()]
    assert "emotion 6-class emotion classification as text" in rows[3]


def _workdir(tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    for f in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / f, tmp_path / f)
    return tmp_path


def test_an_evaluation_is_saved_under_a_name_made_of_the_model_and_the_data():
    from tuneline.cli.models import default_out

    named = {
        ("tiny-gpt2", "data/sentences.csv", "plain"): "tiny-gpt2-sentences.json",
        ("models:/descrambler@champion", "../x/test.parquet", "chat"): "models_descrambler_champion-test-chat.json",
        ("tiny-gpt2", "/data/*.csv", "plain"): "tiny-gpt2-all.json",  # was 'tiny-gpt2-.json'
        ("tiny-gpt2", "shards/part-*.jsonl.gz", "plain"): "tiny-gpt2-part-all.jsonl.json",
        ("tiny-gpt2", "hf:dair-ai/emotion#validation", "plain"): "tiny-gpt2-emotion_validation.json",
        # a relative folder: the file is not hidden (it was '.._models_merged-test.json')
        ("../models/merged", "test.jsonl", "plain"): "models_merged-test.json",
        ("./models/merged", "test.jsonl", "plain"): "models_merged-test.json",
    }
    for args, name in named.items():
        assert default_out(*args) == REPO / "reports" / "evaluate" / name


def test_a_default_report_is_replaced_only_by_the_same_model_on_the_same_data(tmp_path):
    """`emotion/validation.jsonl` and `sst2/validation.jsonl` share a default report name:
    the second evaluation used to overwrite the first without a word."""
    import json

    from tuneline.cli.models import free_out

    report = tmp_path / "tiny-gpt2-validation.json"
    assert free_out(report, "/d/emotion/validation.jsonl") == report  # nothing there yet
    report.write_text(json.dumps({"data": {"source": "/d/emotion/validation.jsonl"}}))
    assert free_out(report, "/d/emotion/validation.jsonl") == report  # the same data again: the newer replaces it
    second = tmp_path / "tiny-gpt2-validation-2.json"
    assert free_out(report, "/d/sst2/validation.jsonl") == second
    second.write_text(json.dumps({"data": {"source": "/d/sst2/validation.jsonl"}}))
    assert free_out(report, "/d/sst2/validation.jsonl") == second
    assert free_out(report, "/d/mnli/validation.jsonl") == tmp_path / "tiny-gpt2-validation-3.json"
    report.write_text("not a report")  # a file of the user's under that name is left alone
    assert free_out(report, "/d/emotion/validation.jsonl") == tmp_path / "tiny-gpt2-validation-3.json"


def test_evaluate_any_model_on_a_new_file_prints_saves_and_logs(tmp_path, model_cache):
    """Typed in a subfolder of the project, --data is a path from there (as any shell path
    is), not from the project root, where another file of the same name may sit."""
    import json
    import os

    work = _workdir(tmp_path)
    (work / "data").mkdir()
    data = work / "data" / "sentences.csv"
    data.write_text(
        "sentence\nThe old mill stood by the river for a century.\nShe painted the door a bright green.\n"
        "Rain fell on the quiet town all night long.\n"
    )
    (work / "sentences.csv").write_text("sentence\nAnother file at the root of the project.\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"TUNELINE_CACHE": str(model_cache)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuneline.cli",
            "evaluate",
            "--model",
            "tiny-gpt2",
            "--recipe",
            "descramble",
            "--data",
            "sentences.csv",
            "--set",
            "prepare.columns.target=sentence",
            "--set",
            "evaluate.max_new_tokens=8",
        ],
        cwd=work / "data",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "chrf" in proc.stdout and "(primary)" in proc.stdout and "on 3 examples" in proc.stdout
    saved = json.loads((work / "reports" / "evaluate" / "tiny-gpt2-sentences.json").read_text())
    assert saved["n_examples"] == 3 and set(saved["metrics"]) >= {"chrf", "exact_match", "perplexity"}
    runs = subprocess.run(
        [
            sys.executable,
            "-c",
            "import mlflow, json; mlflow.set_tracking_uri('sqlite:///mlflow.db');"
            "r = mlflow.search_runs(experiment_names=['tuneline'], output_format='list')[0];"
            "print(json.dumps([r.data.tags['tuneline.kind'], r.data.metrics['chrf']]))",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
    )
    kind, chrf = json.loads(runs.stdout.strip().splitlines()[-1])
    assert kind == "evaluation" and chrf == saved["metrics"]["chrf"]


def test_a_missing_data_file_or_version_is_one_line(tmp_path):
    work = _workdir(tmp_path)
    proc = _cli("evaluate", "--model", "tiny-gpt2", "--data", "nope.csv", cwd=work)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "nope.csv" in lines[0] and "Fix:" in lines[0]
    proc = _cli("promote", "4", "--reason", "try", cwd=work)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "INFO" not in line]
    assert proc.returncode == 2 and lines == [
        "error: no registered model 'descrambler'. Fix: run the pipeline first (`tuneline run`)"
    ]


def test_a_tuned_model_is_evaluated_only_as_the_task_and_labels_it_was_tuned_for(tmp_path):
    """With params.yaml on the emotion recipe, `tuneline evaluate -m models:/descrambler@champion`
    scored the descrambler's answers to a classify prompt: accuracy 0, and no word of why."""
    import json

    import pytest

    from tuneline import recipes
    from tuneline.cli.models import check_tuned_for
    from tuneline.errors import TunelineError
    from tuneline.modeling import TRAINED_PARAMS

    work = _workdir(tmp_path / "project")
    emotion = recipes.build("emotion", [], False, None)
    folder = tmp_path / "exported"  # `tuneline export`'s folder (its weights are not read first)
    folder.mkdir()
    (folder / TRAINED_PARAMS).write_text(json.dumps(emotion.model_dump()))
    (work / "tweets.jsonl").write_text('{"text": "i feel great", "label": "joy"}\n')
    proc = _cli("evaluate", "--model", str(folder), "--data", "tweets.jsonl", cwd=work)  # params.yaml: descramble
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines == [
        f"error: {folder} was tuned for the classify task, and params.yaml reads the data as descramble rows. "
        "Fix: pass --recipe emotion"
    ]  # not the data's "missing column 'target'" with a fix that maps it
    with pytest.raises(TunelineError, match="and the recipe mnli reads the data as entail rows"):
        check_tuned_for(str(folder), recipes.build("mnli", [], False, None), "the recipe mnli")
    with pytest.raises(
        TunelineError,
        match=r"answers with the labels \['sadness', .*declares \['joy', 'sad'\]. "
        r"Fix: .*--set prepare.labels=\[sadness,joy,love,anger,fear,surprise\]",
    ):
        check_tuned_for(str(folder), recipes.build("emotion", ["prepare.labels=[joy,sad]"], False, None), "params.yaml")
    reordered = recipes.build("emotion", ["prepare.labels=[joy,sadness,love,anger,fear,surprise]"], False, None)
    for fits in (emotion, reordered):  # a file's label ids may come in another order
        check_tuned_for(str(folder), fits, "params.yaml")
    check_tuned_for("tiny-gpt2", emotion, "params.yaml")  # a base model: any task


def test_an_unforeseen_error_is_one_line_and_its_traceback_is_saved(tmp_path, monkeypatch, capsys):
    import pytest

    import tuneline
    from tuneline import cli, registry

    def broken(client, name):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(registry, "history", broken)
    monkeypatch.setattr(registry, "require_model", lambda client, name: None)
    monkeypatch.setattr(tuneline, "ROOT", tmp_path)  # where .cache/errors/ goes
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setattr(sys, "argv", ["tuneline", "history", "--name", "m"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err  # (MLflow may log that it created the store first)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "error: tuneline: unexpected ZeroDivisionError: division by zero" in lines[0]
    assert "Traceback" not in err
    saved = list((tmp_path / ".cache" / "errors").glob("*-tuneline.log"))
    assert len(saved) == 1 and saved[0].name in lines[0] and "Traceback" in saved[0].read_text()
    # --debug shows the traceback instead
    monkeypatch.setattr(sys, "argv", ["tuneline", "--debug", "history", "--name", "m"])
    with pytest.raises(ZeroDivisionError):
        cli.main()


def test_ctrl_c_in_any_command_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    """typer turns a KeyboardInterrupt inside a command into a silent exit 130: `tuneline
    export` or `tuneline evaluate` stopped by Ctrl-C said nothing at all."""
    import pytest

    from tuneline import cli, registry

    def interrupted(client, name):
        raise KeyboardInterrupt

    monkeypatch.setattr(registry, "history", interrupted)
    monkeypatch.setattr(registry, "require_model", lambda client, name: None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setattr(sys, "argv", ["tuneline", "history", "--name", "m"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 130
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert lines == ["error: interrupted. Fix: run the same command again"]


def test_doctor_calls_an_empty_params_file_invalid(tmp_path):
    (tmp_path / "params.yaml").write_text("# nothing but a comment\n")
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    proc = _cli("doctor", cwd=tmp_path)
    assert proc.returncode == 1
    assert "FAIL params.yaml: params.yaml is empty" in proc.stdout
    # no repository: a warning (runs work), with the command that makes one
    assert "warn git: " in proc.stdout and "is not a git repository" in proc.stdout
    assert "ok   git" not in proc.stdout  # no "local state is not tracked" where there is no repository
    assert "git init && git add -A && git commit -m start" in proc.stdout


def _interrupt(proj, sets: list[str], after: list[str], delay: float, sig=None, group: bool = True):
    """`tuneline run` in a process group of its own, as a terminal runs it; `delay` s after
    its output has shown each marker of `after` in turn, `sig` (SIGINT) goes to the whole
    group (Ctrl-C), or only to the tuneline process (`kill PID`, `docker stop`). Returns
    (exit code, seconds from the signal to exit, all output)."""
    import os
    import signal
    import time

    sig = sig or signal.SIGINT

    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneline.cli", "run", *(a for s in sets for a in ("--set", s))],
        cwd=proj.root,
        env=proj.env,  # no PREFECT_API_URL: the temporary Prefect server, which Ctrl-C used to kill
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen, waiting = [], list(after)
    try:
        for line in proc.stdout:
            seen.append(line)
            if waiting and waiting[0] in line:
                waiting.pop(0)
                if not waiting:
                    break
        assert not waiting, "".join(seen[-40:])
        time.sleep(delay)
        (os.killpg if group else os.kill)(proc.pid, sig)
        t = time.time()
        rest, _ = proc.communicate(timeout=120)
        return proc.returncode, time.time() - t, "".join(seen) + rest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_ctrl_c_during_tokenize_or_train_ends_the_run_in_seconds_and_a_rerun_resumes(built, tmp_path):
    import sqlite3

    from conftest import copy_project

    proj = copy_project(built, tmp_path / "proj")
    # An empty model cache: the first run builds tiny-gpt2 while Prefect's temporary server
    # starts, and its flow must use that server (a second one would say it is starting).
    proj.env["TUNELINE_CACHE"] = str(tmp_path / "cache")
    sets = ["tokenize.max_length=128", "train.max_steps=30"]  # tokenize onwards must run again
    # tokenize while its process starts (SIGINT then used to hit an import: a traceback and exit 1),
    # train once a checkpoint is written
    for after, delay in ((["Running stage 'tokenize'"], 0.1), (["val_loss", "[train] step"], 0)):
        code, took, said = _interrupt(proj, sets, after, delay)
        errors = [line for line in said.splitlines() if line.startswith("error:")]
        assert code == 130 and took < 10, (code, took, said[-3000:])
        assert len(errors) == 1 and "interrupted" in errors[0], said[-3000:]
        assert "ConnectError" not in said and "Traceback" not in said, said[-3000:]
        if after[0].startswith("Running stage 'tokenize'"):
            assert "preparing built-in model 'tiny-gpt2'" in said, said[-3000:]
            assert "Starting temporary server" not in said, said[-3000:]
    with sqlite3.connect(proj.root / ".prefect" / "prefect.db") as db:
        states = db.execute("SELECT state_type FROM flow_run").fetchall()
    assert states and ("RUNNING",) not in states
    done = proj.run(sys.executable, "-m", "dvc", "repro", "train")  # the interrupted stage, run again
    assert "resuming from checkpoint at step" in done.stdout, done.stdout[-3000:]


def test_sigterm_to_the_run_alone_stops_it_like_ctrl_c_and_exits_143(built, tmp_path):
    """`kill PID`, `docker stop` and a cancelled scheduler send SIGTERM to tuneline only: it
    used to end on Prefect's "Crash detected!" lines, with no line of ours; now it stops as
    Ctrl-C does, with the one line, and exits 143 (128 + SIGTERM). The stage under it is
    interrupted first (dvc_tasks.reproduce), and nothing is left running."""
    import signal
    import sqlite3

    import psutil
    from conftest import copy_project

    proj = copy_project(built, tmp_path / "proj")
    code, took, said = _interrupt(
        proj, ["train.max_steps=30"], ["val_loss", "[train] step"], 0, sig=signal.SIGTERM, group=False
    )
    lines = said.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 143 and took < 15, (code, took, said[-3000:])
    assert len(errors) == 1 and "interrupted" in errors[0], said[-3000:]
    # the stage stopped before the command said so (it used to train on until tuneline exited)
    after = lines[lines.index(errors[0]) :]
    assert not [line for line in after if line.startswith("[train]")], said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    # the stages run in the project (their command line does not name it)
    left = [
        p for p in psutil.process_iter(["cmdline", "cwd"]) if str(proj.root) in f"{p.info['cwd']} {p.info['cmdline']}"
    ]
    assert not left, [p.info["cmdline"] for p in left]
    with sqlite3.connect(proj.root / ".prefect" / "prefect.db") as db:
        assert ("RUNNING",) not in db.execute("SELECT state_type FROM flow_run").fetchall()


def test_a_missing_data_file_fails_before_a_built_in_model_is_built(tmp_path):
    """Converting a built-in model takes ~20 s on first use (SmolLM2); a misspelled path must
    not wait for it. An empty model cache: nothing may be built into it."""
    from conftest import make_project

    proj = make_project(tmp_path / "proj", tmp_path / "cache")
    proc = proj.run(
        sys.executable, "-m", "tuneline.cli", "run", "--set", "prepare.source=nope.csv", check=False, timeout=300
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "data file 'nope.csv' not found" in lines[0], proc.stderr
    assert not (tmp_path / "cache" / "models").exists()
    assert "preparing built-in model" not in proc.stdout


def test_a_path_set_in_a_subfolder_names_the_file_there(tmp_path, monkeypatch, capsys):
    """Params paths are read from the project root; a `--set` path typed in a subfolder means
    the file beside the user (as `evaluate --data` does), so it is recorded from the root."""
    import importlib

    cli = importlib.import_module("tuneline.cli.app")  # the module (the package's `app` is the Typer app)
    root = tmp_path.resolve()
    (root / "corpus").mkdir()
    for name in ("a.txt", "b.txt", "chat.json"):
        (root / "corpus" / name).write_text("x")
    (root / "top.csv").write_text("x")
    monkeypatch.setattr(cli, "ROOT", root)
    sets = [
        "prepare.source=*.txt",
        "prepare.test_source=alpaca-chat:chat.json",
        "prepare.source=../top.csv",
        "prepare.source=top.csv",  # not here: meant from the root, as params are
        "model.name=gpt2",  # a hub id
        "prepare.n_train=5",
    ]
    monkeypatch.chdir(root)
    assert cli.typed_here(sets) == sets
    monkeypatch.chdir(root / "corpus")
    assert cli.typed_here(sets) == [
        "prepare.source=corpus/*.txt",
        "prepare.test_source=alpaca-chat:corpus/chat.json",
        "prepare.source=top.csv",
        *sets[3:],
    ]
    assert (
        "prepare.source: '*.txt' (typed in corpus/) is 'corpus/*.txt' from the project root" in capsys.readouterr().out
    )


def test_every_commands_help_shows_each_paragraph_whole_for_the_terminal_to_wrap(monkeypatch):
    """Not the source's line breaks: at 80 columns they left stubs ("one answer per" / "line
    in their order"). On a 400-column terminal each paragraph is one line."""
    import inspect

    import typer.rich_utils
    from typer.testing import CliRunner

    from tuneline.cli import app

    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 400)
    for command in app.registered_commands:
        name = command.name or command.callback.__name__.replace("_", "-")
        shown = {line.strip() for line in CliRunner().invoke(app, [name, "--help"]).output.splitlines()}
        for paragraph in inspect.getdoc(command.callback).split("\n\n"):
            assert " ".join(paragraph.split()) in shown, (name, paragraph)


def test_history_says_each_gate_decision_once(tmp_path, monkeypatch, capsys):
    import pytest

    from tuneline import cli, registry

    moved = {"when": "2026-01-01T00:00:00+00:00", "action": "gate", "previous": None, "version": "1"}
    kept = {"when": "2026-01-02T00:00:00+00:00", "action": "gate", "version": "2", "decision": "kept champion"}
    first = {"when": "2025-12-31T00:00:00+00:00", "action": "gate", "version": "0", "decision": "not promoted"}
    monkeypatch.setattr(registry, "require_model", lambda client, name: None)
    monkeypatch.setattr(registry, "history", lambda client, name: [moved | {"who": "ana", "why": "better"}])
    monkeypatch.setattr(
        registry,
        "kept_decisions",
        lambda client, name: [e | {"who": "ana", "why": "not better"} for e in (kept, first)],
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setattr(sys, "argv", ["tuneline", "history", "--name", "m"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 0
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    assert [line.split(" ", 2)[2] for line in lines] == [
        "v0 not promoted by ana: not better",
        "none -> v1 by ana: better",
        "v2 not promoted (kept champion) by ana: not better",
    ]


def test_the_run_ends_with_a_predict_command_for_the_version_it_registered(tmp_path):
    import json

    from tuneline.cli.pipeline import try_it
    from tuneline.params_file import parse_params

    params = parse_params({})
    (tmp_path / "metrics").mkdir()

    def hint(result: dict) -> str | None:
        (tmp_path / "metrics" / "register.json").write_text(json.dumps(result))
        return try_it(params, tmp_path)

    assert hint({"version": 1, "promoted": True}).startswith(
        "tuneline predict 'cat the on sat mat the'   (descrambler v1"
    )
    kept = hint({"version": 2, "promoted": False, "gate": {"decision": "kept champion"}})
    assert kept.startswith("tuneline predict --model models:/descrambler/2 'cat the on sat mat the'")
    assert "`tuneline diff`" in kept
    first = hint({"version": 1, "promoted": False, "gate": {"decision": "not promoted"}})
    assert "models:/descrambler/1" in first and "tuneline history" in first and "diff" not in first
    smoke = {"version": 0, "promoted": False, "dry_run": True}  # nothing registered: the model logged to the run
    assert hint(smoke) is None  # (a smoke run of older tuneline did not say where)
    assert hint(smoke | {"model_uri": "models:/m-1a2b"}) == (
        "tuneline predict --model models:/m-1a2b 'cat the on sat mat the'   (this smoke run's model: logged, not registered)"
    )
