"""Bad input never costs finished work.

Each case starts from a copy of a finished tiny project (every stage ran, v1 is champion),
spoils one input (params, data, model, paths, environment) the way a user would, and runs
the command a user would: `tuneline run`, `dvc repro` or another `tuneline` command. Every
case must give one `error:` line that names the problem and the fix, a non-zero exit, no
traceback, and leave the stage outputs, dvc.lock and the registry exactly as they were.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import copy_project
from live_servers import free_port

pytestmark = pytest.mark.slow

OUTPUTS = ("data/prepared", "data/tokenized", "models", "metrics", "reports", "plots", "dvc.lock", "params.yaml")
TUNELINE = [sys.executable, "-m", "tuneline.cli"]
DVC = [sys.executable, "-m", "dvc"]


def outputs(root: Path) -> dict[str, str]:
    """sha256 of every file of every stage output (hidden files included), of dvc.lock and
    of params.yaml, and params.yaml's permissions."""
    found = {}
    for name in OUTPUTS:
        path = root / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        found |= {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    found["params.yaml mode"] = oct((root / "params.yaml").stat().st_mode)  # never chmod-ed (DVC may chmod outputs)
    return found


def debris(root: Path) -> list[str]:
    """Temporary files or directories of an atomic write left anywhere in the outputs' dirs."""
    dirs = {root, root / "data", root / "metrics", root / "reports", root / "plots"}
    return sorted(p.name for d in dirs if d.is_dir() for p in d.iterdir() if ".tmp" in p.name or ".old" in p.name)


def registry(root: Path) -> dict:
    """Versions, aliases and registered-model tags (the champion history), read from the store."""
    with sqlite3.connect(root / "mlflow.db") as db:
        return {
            "versions": db.execute("SELECT name, version, status FROM model_versions ORDER BY 1, 2").fetchall(),
            "aliases": db.execute("SELECT name, alias, version FROM registered_model_aliases ORDER BY 1, 2").fetchall(),
            "tags": db.execute("SELECT name, key, value FROM registered_model_tags ORDER BY 1, 2").fetchall(),
        }


def unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def in_namespace(mount: str, cmd: list[str]) -> list[str]:
    """Run `cmd` in a private mount namespace after `mount` (a shell line): the mount is seen
    by `cmd` alone and vanishes with it. Works as root and, with user namespaces, without."""
    return ["unshare", "-rm", "sh", "-c", f'{mount} && exec "$@"', "sh", *cmd]


# ---- the inputs each case spoils -------------------------------------------------------


def write(proj, name: str, data: str | bytes) -> str:
    path = proj.root / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return name


def sentences(n: int, start: int = 0) -> list[str]:
    return [f"The small boat number {i} sailed across the quiet lake at dawn." for i in range(start, start + n)]


def csv(column: str, rows: list[str]) -> str:
    return column + "\n" + "".join(f'"{r}"\n' for r in rows)


def edit_params(proj, text_from: str, text_to: str) -> None:
    path = proj.root / "params.yaml"
    text = path.read_text()
    assert text_from in text, text_from
    path.write_text(text.replace(text_from, text_to, 1))


def model_folder(proj, name: str, tamper: Callable[[Path], None]) -> str:
    """A copy of the built tiny-gpt2 folder (model + tokenizer), spoiled by `tamper`."""
    src = Path(proj.env["TUNELINE_CACHE"]) / "models" / "tiny-gpt2"
    dst = proj.root / name
    shutil.copytree(src, dst)
    tamper(dst)
    return name


def corrupt_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\x00\x13not a safetensors header" + weights.read_bytes()[100:2000])


def foreign_tokenizer(folder: Path) -> None:
    """The model is a small Llama with a 1,000-token embedding; the tokenizer stays GPT-2's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "config.json").unlink()
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        eos_token_id=50256,
        bos_token_id=50256,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)


def cli(*args: str) -> Callable:
    return lambda proj: [*TUNELINE, *args]


def with_params_text(text: str, *args: str) -> Callable:
    def setup(proj):
        write(proj, "params.yaml", text)
        return [*TUNELINE, *(args or ("run",))]

    return setup


def duplicate_key(proj):
    edit_params(proj, "  lr: 0.002", "  lr: 0.002\n  lr: 0.01")
    return [*TUNELINE, "run"]


def read_only_params(proj):
    (proj.root / "params.yaml").chmod(0o444)
    return run("train.lr=0.003")(proj)


def with_recipe(name: str, text: str) -> Callable:
    def setup(proj):
        write(proj, f"recipes/{name}.yaml", text)
        return [*TUNELINE, "run", "--recipe", name]

    return setup


def corrupt_store(*args: str) -> Callable:
    def setup(proj):
        write(proj, "other.db", b"this is not an SQLite database, just bytes" * 20)
        return [*TUNELINE, *args]

    return setup


def run_locked(proj):
    """A second run while another holds the project (flock(1) holds the lock around it)."""
    (proj.root / ".cache").mkdir(exist_ok=True)
    return ["flock", ".cache/run.lock", *TUNELINE, "run", "--set", "train.lr=0.003"]


def evaluate_on(name: str, data: str, *args: str) -> Callable:
    def setup(proj):
        write(proj, name, data)
        return [*TUNELINE, "evaluate", "--model", "tiny-gpt2", "--data", name, *args]

    return setup


def broken_merge(proj):
    """models/merged no longer what train folded (one weight scaled), then the register stage
    as dvc.yaml runs it: a merge bug must not reach the registry."""
    from safetensors.torch import load_file, save_file

    path = proj.root / "models/merged/model.safetensors"
    weights = load_file(path)
    name = next(k for k in weights if k.endswith("c_fc.weight"))
    weights[name] = weights[name] * 1.5
    save_file(weights, path, metadata={"format": "pt"})
    return [sys.executable, "-m", "tuneline.stages", "register"]


def long_sentence(words: int) -> str:
    return " ".join(["word"] * words) + "."


def unknown_model_type(folder: Path) -> None:
    import json

    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"model_type": "banana"}))


# ---- the cases --------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    setup: Callable  # (proj) -> the command line to run
    says: tuple[str, ...]  # what the error line must contain
    env: dict = field(default_factory=dict)  # values may use {closed_port} and {root}
    needs_unshare: bool = False
    outside: bool = False  # run from a folder outside the project
    alone: bool = False  # refused before any work: the error is all it prints


def run(*sets: str) -> Callable:
    return lambda proj: [*TUNELINE, "run", *(a for s in sets for a in ("--set", s))]


def with_file(name: str, data, *sets: str) -> Callable:
    def setup(proj):
        write(proj, name, data)
        return run(*sets)(proj)

    return setup


def with_model(tamper, *sets: str) -> Callable:
    def setup(proj):
        folder = model_folder(proj, "my-model", tamper)
        return run(f"model.name={folder}", *sets)(proj)

    return setup


def repro_after(text_from: str, text_to: str) -> Callable:
    def setup(proj):
        edit_params(proj, text_from, text_to)
        return [*DVC, "repro"]

    return setup


def repro_on_a_bare_python(proj):
    """`dvc repro` from a shell where `python` is not tuneline's environment (`.venv/bin/dvc
    repro` with the venv not activated): DVC starts the stage on that Python. -S: no
    site-packages at all, whatever the machine's Python has installed."""
    bare = proj.root.parent / "bare"
    bare.mkdir()
    (bare / "python").write_text(f'#!/bin/sh\nexec {sys._base_executable} -S "$@"\n')
    (bare / "python").chmod(0o755)
    edit_params(proj, "n_bootstrap: 1000", "n_bootstrap: 500")  # evaluate has to run
    return [*DVC, "repro"]


def read_only_data(proj):
    return in_namespace("mount -o bind,ro data data", [*TUNELINE, "run", "--set", "prepare.n_train=150"])


def disk_full(proj):
    (proj.root / "checkpoints").mkdir(exist_ok=True)
    return in_namespace("mount -t tmpfs -o size=64k tmpfs checkpoints", [*TUNELINE, "run", "--set", "train.lr=0.003"])


def store_in_git(proj):
    """A project committed without the shipped .gitignore: `git add -A` took mlflow.db."""
    proj.run("git", "add", "-f", "mlflow.db", "dvc.yaml")
    proj.run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    return [*TUNELINE, "run", "--set", "train.lr=0.003"]


TRAIN_ROWS = sentences(200)
CASES = [
    # params
    Case(
        "params-unknown-key",
        lambda p: edit_params(p, "  lr: 0.002", "  lrr: 0.002") or [*TUNELINE, "run"],
        ("unknown key 'train.lrr'", "did you mean 'train.lr'"),
    ),
    Case("params-unknown-key-set", run("trian.lr=0.1"), ("unknown key 'trian'", "train")),
    Case("params-wrong-type", run("train.batch_size=two"), ("'train.batch_size'",)),
    Case("params-negative-lr", run("train.lr=-0.001"), ("'train.lr'", "> 0")),
    Case("params-zero-epochs", run("train.epochs=0"), ("'train.epochs'",)),
    Case(
        "params-unknown-recipe",
        lambda p: [*TUNELINE, "run", "--recipe", "emotoin"],
        ("unknown recipe 'emotoin'", "did you mean 'emotion'"),
    ),
    Case("params-misspelled-task", run("prepare.task=descrambel"), ("'prepare.task'", "did you mean 'descramble'")),
    Case(
        "params-broken-yaml",
        lambda p: write(p, "params.yaml", "train: [lr: 0.1\n") and [*TUNELINE, "run"],
        ("params.yaml", "YAML"),
    ),
    Case("params-set-not-key-value", run("train.lr"), ("--set 'train.lr' is not key=value",)),
    Case("params-set-is-not-code", run("train.lr=__import__('os').system('touch pwned')"), ("'train.lr'",)),
    Case("params-metric-not-of-task", run("evaluate.primary_metric=accuracy"), ("'accuracy'", "descramble")),
    # known only once the data is packed: refused by train before the model loads
    Case(
        "params-grad-accum-beyond-an-epoch",
        run("train.grad_accum=100000"),
        ("train.grad_accum is 100000, but an epoch holds only", "set train.grad_accum to at most"),
    ),
    # data
    Case("data-missing-file", run("prepare.source=missing.csv"), ("'missing.csv' not found",)),
    Case(
        "data-missing-column",
        with_file("s.csv", csv("sentence", TRAIN_ROWS), "prepare.source=s.csv"),
        ("missing column 'target'", "sentence"),
    ),
    Case("data-empty-file", with_file("s.csv", "target\n", "prepare.source=s.csv"), ("has no rows",)),
    Case(
        "data-empty-split",
        with_file("s.csv", csv("target", sentences(20)), "prepare.source=s.csv"),
        ("the train split has 0 rows",),
    ),
    Case(
        "data-invalid-utf8",
        with_file("s.csv", b"target\nA fine first sentence is here.\n\xff\xfe broken\n", "prepare.source=s.csv"),
        ("line 3 is not valid UTF-8",),
    ),
    Case(
        "data-label-outside-set",
        with_file(
            "e.csv",
            "text,label\n" + "".join(f"i feel case {i} today,{'joy' if i % 2 else 'anger'}\n" for i in range(80)),
            "prepare.task=classify",
            "prepare.labels=[joy, sadness]",
            "prepare.source=e.csv",
        ),
        ("label 'anger'", "outside the declared set"),
    ),
    Case(
        "data-all-rows-over-long",
        repro_after("  max_length: 256", "  max_length: 16"),
        ("longer than tokenize.max_length=16",),
    ),
    Case(
        "data-duplicates-across-splits",
        lambda p: (
            write(p, "test.csv", csv("target", TRAIN_ROWS[:30]))
            and with_file("s.csv", csv("target", TRAIN_ROWS), "prepare.source=s.csv", "prepare.test_source=test.csv")(p)
        ),
        ("in both prepare.source and prepare.test_source", "on_overlap=drop"),
    ),
    Case(
        "data-source-is-a-directory",
        lambda p: (p.root / "somedir").mkdir() or run("prepare.source=somedir")(p),
        ("is a directory",),
    ),
    # models
    Case(
        "model-unknown-name-offline",
        run("model.name=gpt2-not-a-real-model"),
        ("cannot load model 'gpt2-not-a-real-model'", "HF_HUB_OFFLINE"),
    ),
    Case("model-corrupt-safetensors", with_model(corrupt_weights), ("model.safetensors", "re-create or re-download")),
    Case("model-tokenizer-mismatch", with_model(foreign_tokenizer), ("50257 tokens", "1000 rows")),
    Case(
        "model-folder-without-config",
        with_model(lambda f: (f / "config.json").unlink()),
        ("has no config.json", "model.name (or --model)"),
    ),
    # paths, environment, registry
    Case("env-read-only-output-dir", read_only_data, ("cannot write", "writable"), needs_unshare=True),
    Case("env-disk-full", disk_full, ("disk is full", "free space"), needs_unshare=True),
    # Out of memory, made certain on any host: an adapter rank or a beam count whose tensors
    # need more than any address space (a user meets it with a batch that does not fit).
    Case(
        "env-out-of-memory-in-train", run("train.lora_r=10000000000000"), ("train: out of memory", "train.batch_size")
    ),
    Case(
        "env-out-of-memory-in-validate",
        run("evaluate.num_beams=10000000000000"),
        ("validate: out of memory", "evaluate.batch_size or evaluate.num_beams"),
    ),
    Case(
        "env-unreachable-mlflow",
        run("train.lr=0.003"),
        ("does not answer", "MLFLOW_TRACKING_URI"),
        env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:{closed_port}"},
    ),
    Case(
        "env-mlflow-store-tracked-by-git",
        store_in_git,
        ("git tracks the project's local state (mlflow.db)",),
        alone=True,  # said before Prefect's temporary server starts
    ),
    Case(
        "env-sweep-with-no-git-commit",
        cli("sweep", "--grid", "train.lr=1e-3,2e-3"),
        ("no git commit yet", "git add -A && git commit -m start"),
        alone=True,
    ),
    Case(
        "env-dvc-repro-on-a-python-without-the-stack",
        repro_on_a_bare_python,
        ("evaluate: this Python", "has no module 'torch'", "not the environment", "source .venv/bin/activate"),
        env={"PATH": "{root}/../bare" + os.pathsep + os.environ.get("PATH", "")},
    ),
    Case("env-unknown-stage", lambda p: [sys.executable, "-m", "tuneline.stages", "trian"], ("unknown stage 'trian'",)),
    Case(
        "registry-promote-missing-version",
        lambda p: [*TUNELINE, "promote", "7", "--reason", "try"],
        ("has no version 7",),
    ),
    Case(
        "registry-rollback-without-history",
        lambda p: [*TUNELINE, "rollback", "--reason", "try"],
        ("no earlier champion",),
    ),
    # params: what the consumers accept (#17), duplicate keys, empty or locked files
    Case("params-negative-seed", run("seed=-1"), ("'seed' must be an integer >= 0",)),
    Case("params-infinite-epochs", run("train.epochs=.inf"), ("'train.epochs' must be a finite number",)),
    Case("params-nan-lr", run("train.lr=.nan"), ("'train.lr' must be a finite number",)),
    Case("params-seed-past-64-bits", run("seed=18446744073709551616"), ("'seed'", "<= 18446744073709551615")),
    Case(
        "params-lora-target-not-in-model",
        run("train.lora_targets=[c_atn]"),
        ("has no module named 'c_atn'", "did you mean 'c_attn'"),
    ),
    Case(
        "params-model-name-mlflow-refuses",
        run("register.model_name=team/descrambler"),
        ("register.model_name 'team/descrambler'", "'/'"),
    ),
    Case(
        "params-max-length-over-positions",
        run("tokenize.max_length=2048"),
        ("tokenize.max_length=2048", "positions for (1024)", "at most 1024"),
    ),
    Case("params-duplicate-key", duplicate_key, ("key 'lr' is given twice", "lines")),
    Case("params-empty-file", with_params_text(""), ("params.yaml is empty", "git checkout params.yaml")),
    Case("params-not-a-mapping", with_params_text("- train\n- lr\n"), ("must be a mapping", "not a list")),
    Case("params-read-only-file", read_only_params, ("params.yaml is read-only", "chmod u+w params.yaml")),
    Case("params-group-as-scalar", run("train=3"), ("'train'",)),
    Case(
        "params-recipe-duplicate-key",
        with_recipe("dup", "train:\n  lr: 0.1\n  lr: 0.2\n"),
        ("recipes/dup.yaml", "given twice"),
    ),
    Case("params-repro-negative-seed", repro_after("seed: 42", "seed: -1"), ("'seed' must be an integer >= 0",)),
    Case(
        "params-repro-lora-target-not-in-model",
        repro_after("  lora_targets: null", "  lora_targets: [q_proj]"),
        ("has no module named 'q_proj'",),
    ),
    # data as people save it
    Case(
        "data-label-near-match",
        with_file(
            "e.csv",
            "text,label\n" + "".join(f"i feel case {i} today,{'joy ' if i == 3 else 'sadness'}\n" for i in range(80)),
            "prepare.task=classify",
            "prepare.labels=[joy, sadness]",
            "prepare.source=e.csv",
        ),
        ("e.csv line 5 has label 'joy '", "did you mean 'joy'?"),
    ),
    Case(
        "data-column-in-other-case",
        with_file("s.csv", csv("Target", TRAIN_ROWS), "prepare.source=s.csv"),
        ("missing column 'target'", "'Target'", "did you mean 'Target'?"),
    ),
    Case(
        "data-bad-json-line",
        with_file(
            "s.jsonl",
            "".join(f'{{"target": "{r}"}}\n' for r in TRAIN_ROWS[:2]) + '{"target": "cut off\n',
            "prepare.source=s.jsonl",
        ),
        ("line 3 is not valid JSON",),
    ),
    Case(
        "data-not-parquet",
        with_file("s.parquet", b"PAR1 this is not really parquet", "prepare.source=s.parquet"),
        ("not a readable Parquet file",),
    ),
    Case(
        "data-text-column-is-a-number",
        with_file("s.jsonl", '{"target": 5}\n' * 30, "prepare.source=s.jsonl"),
        ("column 'target' must be text", "s.jsonl line 1 holds int"),
    ),
    Case("data-test-source-missing", run("prepare.test_source=missing.csv"), ("'missing.csv' not found",)),
    Case("data-glob-matches-nothing", run("prepare.source=nothing/*.csv"), ("nothing/*.csv",)),
    Case(
        "data-overlong-test-row-under-error",
        evaluate_on(
            "long.csv", csv("target", [long_sentence(3000)] + sentences(3)), "--set", "tokenize.overlong=error"
        ),
        ("more positions than the model has (1024)", "example 1", "tokenize.overlong: drop"),
    ),
    # models
    Case(
        "model-config-not-json",
        with_model(lambda f: (f / "config.json").write_text("{not json")),
        ("config.json is not valid JSON", "save_pretrained"),
    ),
    Case(
        "model-config-unknown-type",
        with_model(unknown_model_type),
        ("no known LoRA targets for architecture 'banana'", "train.lora_targets"),
    ),
    Case(
        "model-config-unknown-type-full",
        with_model(unknown_model_type, "train.method=full"),
        ("transformers cannot read",),
    ),
    # registry commands: one project, one checked store, names that exist
    Case(
        "registry-promote-unknown-name",
        cli("promote", "1", "--name", "descramblr", "--reason", "try"),
        ("no registered model 'descramblr'", "did you mean 'descrambler'"),
    ),
    Case(
        "registry-history-unknown-name",
        cli("history", "--name", "descramblr"),
        ("no registered model 'descramblr'", "did you mean 'descrambler'"),
    ),
    Case(
        "registry-rollback-unknown-name",
        cli("rollback", "--name", "descramblr", "--reason", "try"),
        ("no registered model 'descramblr'",),
    ),
    Case("registry-empty-reason", cli("promote", "1", "--reason", " "), ("--reason is empty",)),
    Case(
        "registry-corrupt-store-promote",
        corrupt_store("promote", "1", "--reason", "try"),
        ("not a usable SQLite database",),
        env={"MLFLOW_TRACKING_URI": "sqlite:///{root}/other.db"},
    ),
    Case(
        "registry-corrupt-store-predict",
        corrupt_store("predict", "sat the cat"),
        ("not a usable SQLite database",),
        env={"MLFLOW_TRACKING_URI": "sqlite:///{root}/other.db"},
    ),
    Case(
        "registry-unreachable-store-history",
        cli("history"),
        ("does not answer", "MLFLOW_TRACKING_URI"),
        env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:{closed_port}"},
    ),
    Case("registry-history-outside-project", cli("history"), ("not inside a tuneline project",), outside=True),
    # the command line
    Case("cli-run-outside-project", cli("run"), ("not inside a tuneline project",), outside=True),
    Case("cli-ui-outside-project", cli("ui"), ("not inside a tuneline project",), outside=True),
    Case("cli-predict-empty-input", cli("predict", " "), ("the input is empty", "tuneline predict 'cat the on sat")),
    Case(
        "cli-export-into-a-full-folder",
        cli("export", "data"),
        ("'data' already exists and is not an empty folder",),
        alone=True,
    ),
    Case(
        "cli-export-to-the-hub-offline", cli("export", "hf", "--hub", "me/descrambler"), ("the hub is off",), alone=True
    ),
    Case(
        "cli-export-to-a-bad-hub-name",
        cli("export", "hf", "--hub", "me/my model"),
        ("--hub 'me/my model' is not a hub repository id",),
        env={"HF_HUB_OFFLINE": "0"},
    ),
    Case(
        "registry-export-unknown-version",
        cli("export", "hf", "--version", "7"),
        ("model 'descrambler' has no version 7", "choose one of: 1"),
    ),
    Case(
        "model-broken-merge",
        broken_merge,
        ("the merged model does not reproduce the adapted one", "register.parity_tol", "dvc repro -f train"),
    ),
    Case(
        "cli-predict-input-too-long",
        cli("predict", long_sentence(3000)),
        ("the input is", "positions for 1024", "shorten it"),
    ),
    Case(
        "cli-evaluate-negative-limit",
        evaluate_on("t.csv", csv("target", sentences(5)), "--limit", "-1"),
        ("--limit -1 is negative",),
    ),
    Case(  # the last --model counts: '' was read as the working directory, "has no config.json"
        "cli-evaluate-empty-model",
        evaluate_on("t.csv", csv("target", sentences(5)), "--model", ""),
        ("--model is empty",),
    ),
    Case(
        "cli-evaluate-out-is-a-folder",
        evaluate_on("t.csv", csv("target", sentences(5)), "--out", "reports"),
        ("--out 'reports' is a folder",),
    ),
    Case(
        "cli-evaluate-out-through-a-file",  # found only after the evaluation, before the check
        evaluate_on("t.csv", csv("target", sentences(5)), "--out", "t.csv/ev.json"),
        ("--out 't.csv/ev.json' goes through 't.csv', which is a file",),
    ),
    Case("cli-two-runs-in-one-project", run_locked, ("another tuneline run is in progress", "wait for it")),
    Case(
        "cli-prefect-server-down",
        run("train.lr=0.003"),
        ("Prefect server", "does not answer", "PREFECT_API_URL"),
        env={"PREFECT_API_URL": "http://127.0.0.1:{closed_port}/api"},
    ),
]


def test_there_are_at_least_60_cases_across_every_kind():
    kinds = {c.id.split("-")[0] for c in CASES}
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    assert kinds == {"params", "data", "model", "env", "registry", "cli"}


@dataclass
class Outcome:
    """What one case's command did, and the project before and after it."""

    proc: subprocess.CompletedProcess
    before: tuple
    after: tuple
    debris: list[str]
    root: Path
    cwd: Path


def attempt(case: Case, built, prefect_api: str, tmp_path: Path) -> Outcome:
    """Run one case on its own copy of the finished project."""
    proj = copy_project(built, tmp_path / "proj")
    cmd = case.setup(proj)
    before = (outputs(proj.root), registry(proj.root))
    env = (
        proj.env
        | {"PREFECT_API_URL": prefect_api}
        | {k: v.format(closed_port=free_port(), root=proj.root) for k, v in case.env.items()}
    )
    cwd = tmp_path / "elsewhere" if case.outside else proj.root
    cwd.mkdir(exist_ok=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return Outcome(proc, before, (outputs(proj.root), registry(proj.root)), debris(proj.root), proj.root, cwd)


TEST = "test_bad_input_is_one_line_a_nonzero_exit_and_changes_nothing"


@pytest.fixture(scope="module")
def outcomes(request, built, prefect_api, tmp_path_factory) -> dict[str, Outcome]:
    """Every selected case, two at a time: each is a separate project and process, and most
    of a case is a Python process importing its libraries, which two cores do side by side
    (cases that train still take the machine's train lock in turn)."""
    from concurrent.futures import ThreadPoolExecutor

    chosen = {
        item.callspec.params["case"].id
        for item in request.session.items
        if getattr(item, "originalname", None) == TEST and hasattr(item, "callspec")
    }
    runnable = [c for c in CASES if c.id in chosen and not (c.needs_unshare and not unshare_works())]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {c.id: pool.submit(attempt, c, built, prefect_api, tmp_path_factory.mktemp(c.id)) for c in runnable}
        return {case_id: f.result() for case_id, f in futures.items()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_a_nonzero_exit_and_changes_nothing(case, outcomes):
    if case.needs_unshare and not unshare_works():
        pytest.skip("needs `unshare -rm` (mount namespaces) to fake a read-only directory or a full disk")
    o = outcomes[case.id]
    said = o.proc.stdout + o.proc.stderr
    errors = [line for line in said.splitlines() if line.startswith("error:")]

    assert o.proc.returncode != 0, said[-3000:]
    assert len(errors) == 1, said[-3000:]
    assert "Fix:" in errors[0] and all(s in errors[0] for s in case.says), errors[0]
    assert "Traceback" not in said, said[-3000:]
    # At most the failed task's and the flow's "Finished in state Failed('…')" and `error:` (Prefect's
    # "Task run failed with state: Failed(message='…', …)" made it four long lines)
    assert said.count(errors[0].removeprefix("error: ")[:50]) <= 3, said[-3000:]
    assert not case.alone or said.strip() == errors[0], said[-3000:]
    changed = sorted(k for k in {*o.before[0], *o.after[0]} if o.before[0].get(k) != o.after[0].get(k))
    assert o.after == o.before, (
        changed,
        said[-4000:].splitlines(),
    )  # outputs, dvc.lock, params.yaml, versions, aliases, history
    assert o.debris == []
    assert not (o.root / "pwned").exists()
    assert not list(o.cwd.glob("mlflow.db")) or o.cwd == o.root  # no new store where the command ran


def test_files_as_people_save_them_work_and_so_do_subfolders(built, tmp_path):
    """Excel's "CSV UTF-8" (a byte-order mark, CRLF line ends) with a row longer than the
    model's positions evaluates, dropping and counting that row; a registry command run from
    a subfolder answers from the project's store and creates none there."""
    import json

    proj = copy_project(built, tmp_path / "proj")
    rows = [*sentences(4), long_sentence(3000)]
    (proj.root / "excel.csv").write_bytes(("\ufefftarget\r\n" + "".join(f'"{r}"\r\n' for r in rows)).encode())
    proj.run(*TUNELINE, "evaluate", "--model", "tiny-gpt2", "--data", "excel.csv", "--out", "ev.json")
    result = json.loads((proj.root / "ev.json").read_text())
    assert (result["n_examples"], result["n_dropped_overlong"]) == (4, 1)
    here = proj.root / "data"
    proc = subprocess.run(
        [*TUNELINE, "history"], cwd=here, env=proj.env, capture_output=True, text=True, timeout=300, check=True
    )
    assert "none -> v1" in proc.stdout and not (here / "mlflow.db").exists()
