"""Bad input never costs finished work.

Each case starts from a copy of a finished tiny project (every stage ran, v1 is champion),
spoils one input (params, data, model, paths, environment) the way a user would, and runs
the command a user would: `tuneline run`, `dvc repro` or another `tuneline` command. Every
case must give one `error:` line that names the problem and the fix, a non-zero exit, no
traceback, and leave the stage outputs, dvc.lock and the registry exactly as they were.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import copy_project, free_port

pytestmark = pytest.mark.slow

OUTPUTS = ("data/prepared", "data/tokenized", "models", "metrics", "reports", "plots", "dvc.lock")
TUNELINE = [sys.executable, "-m", "tuneline.cli"]
DVC = [sys.executable, "-m", "dvc"]


def outputs(root: Path) -> dict[str, str]:
    """sha256 of every file of every stage output (hidden files included) and of dvc.lock."""
    found = {}
    for name in OUTPUTS:
        path = root / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        found |= {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
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


# ---- the cases --------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    setup: Callable  # (proj) -> the command line to run
    says: tuple[str, ...]  # what the error line must contain
    env: dict = field(default_factory=dict)
    needs_unshare: bool = False


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


def read_only_data(proj):
    return in_namespace("mount -o bind,ro data data", [*TUNELINE, "run", "--set", "prepare.n_train=150"])


def disk_full(proj):
    (proj.root / "checkpoints").mkdir(exist_ok=True)
    return in_namespace("mount -t tmpfs -o size=64k tmpfs checkpoints", [*TUNELINE, "run", "--set", "train.lr=0.003"])


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
    Case("model-folder-without-config", with_model(lambda f: (f / "config.json").unlink()), ("has no config.json",)),
    # paths, environment, registry
    Case("env-read-only-output-dir", read_only_data, ("cannot write", "writable"), needs_unshare=True),
    Case("env-disk-full", disk_full, ("disk is full", "free space"), needs_unshare=True),
    Case(
        "env-unreachable-mlflow",
        run("train.lr=0.003"),
        ("does not answer", "MLFLOW_TRACKING_URI"),
        env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:{closed_port}"},
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
]


def test_there_are_at_least_25_cases_across_params_data_models_and_environment():
    kinds = {c.id.split("-")[0] for c in CASES}
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    assert kinds == {"params", "data", "model", "env", "registry"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_a_nonzero_exit_and_changes_nothing(case, built, prefect_api, tmp_path):
    if case.needs_unshare and not unshare_works():
        pytest.skip("needs `unshare -rm` (mount namespaces) to fake a read-only directory or a full disk")
    proj = copy_project(built, tmp_path / "proj")
    cmd = case.setup(proj)
    before = (outputs(proj.root), registry(proj.root))
    env = (
        proj.env
        | {"PREFECT_API_URL": prefect_api}
        | {k: v.format(closed_port=free_port()) for k, v in case.env.items()}
    )
    proc = subprocess.run(cmd, cwd=proj.root, env=env, capture_output=True, text=True, timeout=600)
    said = proc.stdout + proc.stderr
    errors = [line for line in said.splitlines() if line.startswith("error:")]

    assert proc.returncode != 0, said[-3000:]
    assert len(errors) == 1, said[-3000:]
    assert "Fix:" in errors[0] and all(s in errors[0] for s in case.says), errors[0]
    assert "Traceback" not in said, said[-3000:]
    assert (outputs(proj.root), registry(proj.root)) == before  # outputs, dvc.lock, versions, aliases, history
    assert debris(proj.root) == []
    assert not (proj.root / "pwned").exists()
