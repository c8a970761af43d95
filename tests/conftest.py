"""Shared fixtures: a tiny GPT-2 with the real GPT-2 tokenizer, and throwaway projects."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tiny, fast params for a whole-pipeline run (tiny-gpt2, a few hundred examples).
TINY = {
    "model": {"name": "tiny-gpt2"},
    "prepare": {"n_train": 160, "n_val": 16, "n_test": 8},
    "tokenize": {"max_length": 256},
    "train": {"max_steps": 6, "eval_every": 3, "log_every": 2, "batch_size": 4},
    "evaluate": {"batch_size": 8},
}


from live_servers import Served, free_port, http_json, http_ok, wait_for  # noqa: E402

from tuneline.recipes import merge  # noqa: E402  (the same deep merge recipes and --set use)

# `make test` runs the suite on two pytest-xdist workers (two cores; most of a test is a
# process importing its libraries, single-threaded). Each worker trains under its own
# machine lock: the lock is there so that two users' runs do not share a machine unawares.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    os.environ.setdefault("TUNELINE_LOCK_DIR", str(Path(tempfile.gettempdir()) / f"tuneline-locks-{os.getpid()}"))
    # One OpenMP thread per process (the worker and every process it starts; set before
    # torch is imported): with two workers on two cores, a tiny model gains nothing from a
    # second thread, and OpenMP's threads spin while they wait for a core the other worker
    # holds. Measured side by side, two stages at once: 25 s of CPU each with torch's
    # default of two threads, 18.5 s with one.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# Under xdist each group runs whole on one worker: a test module is a group (its module
# fixtures are built once), and the modules on the `served` UIs share one. (xdist's own
# `--dist loadgroup` marks do nothing with pytest 9: it renames item._nodeid, which pytest 9
# no longer reads, so the scheduler below groups by module name itself.)
SAME_WORKER = {"test_browser.py": "served", "test_schedule.py": "served", "test_ui.py": "served"}
# The longest groups first (minutes on a 2-core machine), so that the two workers end
# together; the first builds `built`, which the fourth needs, long before it starts.
LONGEST_FIRST = ["test_faults.py", "served", "test_recipe_runs.py", "test_sweep.py", "test_bad_input.py", "test_cli.py"]
LONGEST_FIRST += ["test_pipeline.py", "test_resume.py", "test_train.py", "test_preflight.py", "test_prepare.py"]


def group_of(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return SAME_WORKER.get(module, module)


def pytest_collection_modifyitems(config, items):
    rank = {g: i for i, g in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(group_of(item.nodeid), len(rank)))  # stable: the rest keep their order


def pytest_xdist_make_scheduler(config, log):
    """Groups, in collection order (`--no-loadscope-reorder`), to whichever worker is free."""
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return ByGroup(config, log)


def shared_path(tmp_path_factory, name: str) -> Path:
    """A path in the run's base temp dir that every xdist worker of this run sees."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if WORKER else base) / name


@contextlib.contextmanager
def built_once(tmp_path_factory, name: str):
    """Build `name` once per test run, whichever worker asks first; the others wait for it.
    Yields (path, done): build into `path` when `done` is False. A failed build is retried."""
    from filelock import FileLock

    path = shared_path(tmp_path_factory, name)
    marker = path.with_name(f"{name}.done")
    with FileLock(str(path.with_name(f"{name}.lock"))):
        done = marker.is_file()
        if not done:
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
        yield path, done
        marker.touch()


@pytest.fixture(autouse=True)
def _no_tracking_uri_left_behind():
    """`mlflow.set_tracking_uri` is process-wide: a test that sets it in-process (tracking.setup,
    the `client` fixture) would point the next test on this worker at its own store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if utils is not None and utils._tracking_uri is not None:
        utils.set_tracking_uri(None)  # MLflow's own reset (it unsets MLFLOW_TRACKING_URI too)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One `.cache` for every test project (and worker), so built-in models are built once."""
    path = shared_path(tmp_path_factory, "cache")
    path.mkdir(exist_ok=True)
    os.environ["TUNELINE_CACHE"] = str(path)
    return path


def tiny_llama(vocab: int):
    """A random 2-layer Llama (grouped-query attention, sdpa), seeded: the Llama code paths
    at test speed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def generate_beams(model, tok, prompts: list[str], max_new_tokens: int, num_beams: int, processor=None) -> list[str]:
    """transformers' own `generate` (beam search, or greedy at num_beams=1) over the prompts
    as one left-padded batch: each answer's text, the reference tuneline's decoding is
    checked against. `processor(width)` builds its LogitsProcessorList for the padded
    prompt width."""
    import torch

    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    width = enc["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=num_beams,
            pad_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            logits_processor=None if processor is None else processor(width),
        )
    return [tok.decode(r, skip_special_tokens=True).strip() for r in out[:, width:]]


@pytest.fixture(scope="session")
def gpt2_tok():
    from tuneline.assets import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def tiny_gpt2(model_cache):
    from tuneline.modeling import load_model

    return load_model("tiny-gpt2")


@pytest.fixture(scope="module")
def logged(tmp_path_factory, tiny_gpt2, model_cache):
    """tiny-gpt2 logged as the default job's descrambler (tuneline/serving.py), in an MLflow
    store of its own: (model URI, its params, its folder)."""
    import mlflow

    from tuneline import recipes, serving
    from tuneline.modeling import load_tokenizer

    root = tmp_path_factory.mktemp("serving")
    tiny_gpt2.save_pretrained(root / "merged")
    load_tokenizer("tiny-gpt2").save_pretrained(root / "merged")
    params = recipes.build(None, ["model.name=tiny-gpt2", "evaluate.max_new_tokens=24"], False, None)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("s", artifact_location=(root / "art").as_uri()))
    with mlflow.start_run():
        info = serving.log_model(params, root / "merged")
    yield info.model_uri, params, root
    mp.undo()


def project_env(root: Path, cache: Path) -> dict[str, str]:
    """Environment for a subprocess run in `root`: its own MLflow store, Prefect home and
    DVC site cache (tuneline defaults them inside the project), the shared model cache."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "MLFLOW_TRACKING_URI",
            "PREFECT_HOME",
            "DVC_SITE_CACHE_DIR",
            "TUNELINE_ROOT",
            "PREFECT_API_URL",
            "TUNELINE_PARENT_RUN_ID",
        )
    }
    env["TUNELINE_CACHE"] = str(cache)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(root)
    return env


class Project:
    """A fresh copy of the pipeline (code, dvc.yaml, params) in a git + DVC repo."""

    def __init__(self, root: Path, cache: Path):
        self.root, self.env = root, project_env(root, cache)

    def run(
        self,
        *cmd: str,
        check: bool = True,
        timeout: int = 900,
        env: dict | None = None,
        stdin: str | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            list(cmd),
            cwd=cwd or self.root,
            env=self.env | (env or {}),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return proc

    def dvc_json(self, *args: str, limit: int = 120):
        """`dvc ARGS --json`, parsed. A DVC command that hangs prints every thread's stack and
        exits after `limit` seconds (faulthandler), so the failure says where: CI once waited
        900 s on `dvc exp show` after a sweep, once in many runs."""
        code = (
            f"import faulthandler, sys; faulthandler.dump_traceback_later({limit}, exit=True); "
            "from dvc.cli import main; sys.exit(main(sys.argv[1:]))"
        )
        proc = self.run(sys.executable, "-c", code, *args, "--json", check=False, timeout=limit + 60)
        assert proc.returncode == 0, f"dvc {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-12000:]}"
        return json.loads(proc.stdout)

    def set_params(self, over: dict) -> None:
        path = self.root / "params.yaml"
        path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), over), sort_keys=False))

    def python(self, code: str) -> str:
        return self.run(sys.executable, "-c", code).stdout


def venv_not_on(path: str) -> str:
    """PATH as in a shell where the venv is not activated (`.venv/bin/tuneline run`): the
    stages that DVC starts (`python -m tuneline.stages`) must still run on this interpreter."""
    return os.pathsep.join(p for p in path.split(os.pathsep) if p != os.path.dirname(sys.executable))


def make_project(root: Path, cache: Path, params: dict | None = None) -> Project:
    for item in ("tuneline", "components", "flows", "recipes", "dvc.yaml", "params.yaml"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / item)
    proj = Project(root, cache)
    proj.run("git", "init", "-q")
    proj.run(sys.executable, "-m", "dvc", "init", "-q")
    proj.set_params(merge(TINY, params or {}))
    return proj


@pytest.fixture
def project(tmp_path, model_cache) -> Project:
    return make_project(tmp_path / "proj", model_cache)


@pytest.fixture
def local_model(tmp_path, monkeypatch) -> Path:
    """A local model folder as model.name may name one (config.json and weights, here a few
    bytes), with a cache of its own: write other bytes to its model.safetensors to stand for
    new weights saved under the same path."""
    monkeypatch.setenv("TUNELINE_CACHE", str(tmp_path / ".cache"))
    folder = tmp_path / "my-base"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"old weights")
    return folder


@pytest.fixture
def scoring_app(tmp_path, monkeypatch, tiny_gpt2, gpt2_tok):
    """`scoring_app(recipe)`: tiny-gpt2 logged as `recipe`'s model (tuneline/serving.py) and
    loaded in MLflow's own scoring app, what `mlflow models serve` runs: (the loaded pyfunc
    model, an HTTP client to it)."""
    import mlflow
    from fastapi.testclient import TestClient
    from mlflow.pyfunc.scoring_server import init

    from tuneline import recipes, serving

    tiny_gpt2.save_pretrained(tmp_path / "merged")
    gpt2_tok.save_pretrained(tmp_path / "merged")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("s", artifact_location=(tmp_path / "a").as_uri()))

    def serve(recipe: str):
        params = recipes.build(recipe, ["model.name=tiny-gpt2", "evaluate.max_new_tokens=6"], False, None)
        with mlflow.start_run():
            model = mlflow.pyfunc.load_model(serving.log_model(params, tmp_path / "merged").model_uri)
        return model, TestClient(init(model))

    return serve


@pytest.fixture
def client(tmp_path, monkeypatch):
    """A real (sqlite) tracking server and registry in tmp_path, with one registered model "m"."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("t", artifact_location=(tmp_path / "art").as_uri()))
    c = mlflow.MlflowClient(uri)
    c.create_registered_model("m")
    return c


@pytest.fixture(scope="session")
def built(tmp_path_factory, model_cache, prefect_api) -> Project:
    """A tiny project after one whole `tuneline run`: every stage ran, v1 is champion (the
    gate's metric is perplexity, which six steps of the random 2-layer model lower reliably).
    Tests work on copies (copy_project) and never change it. The flow runs on the session's
    Prefect server (the tests that use `built` need it anyway), not a temporary one."""
    with built_once(tmp_path_factory, "built") as (path, done):
        if done:
            proj = Project(path / "proj", model_cache)
            proj.flow_out = (path / "flow_out.txt").read_text()
            proj.flow_err = (path / "flow_err.txt").read_text()
            return proj
        proj = make_project(path / "proj", model_cache, {"evaluate": {"primary_metric": "perplexity"}})
        env = {"PREFECT_API_URL": prefect_api, "PATH": venv_not_on(proj.env["PATH"])}
        proc = proj.run(sys.executable, "-m", "tuneline.cli", "run", env=env)
        proj.flow_out, proj.flow_err = proc.stdout, proc.stderr
        (path / "flow_out.txt").write_text(proj.flow_out)
        (path / "flow_err.txt").write_text(proj.flow_err)
        return proj


def copy_project(src: Project, dst: Path) -> Project:
    """A copy that is a project of its own: MLflow keeps absolute artifact locations in its
    store, so the copy's are pointed at the copy's mlartifacts/."""
    import sqlite3

    shutil.copytree(src.root, dst, symlinks=True)
    old, new = f"{src.root}/", f"{dst}/"
    with sqlite3.connect(dst / "mlflow.db") as db:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for col in [
                c[1]
                for c in db.execute(f"PRAGMA table_info('{table}')")
                if "CHAR" in c[2].upper() or "TEXT" in c[2].upper()
            ]:
                db.execute(
                    f'UPDATE "{table}" SET "{col}" = replace("{col}", ?, ?) WHERE instr("{col}", ?) > 0',
                    (old, new, old),
                )
    proj = Project(dst, Path(src.env["TUNELINE_CACHE"]))
    proj.flow_out = getattr(src, "flow_out", "")
    proj.flow_err = getattr(src, "flow_err", "")
    return proj


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One Prefect server for the tests that run many short flows (what `tuneline ui` gives a
    user): each `tuneline run` then starts in seconds instead of starting its own server."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(home)}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=open(home / "server.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for("a Prefect server", lambda: http_json(f"{url}/health"), 180, proc)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


_SERVED: list[Served] = []


def pytest_runtest_teardown(item, nextitem):
    """The `served` UIs stop when the last test of their group ends, not at the end of the
    session: idle, their servers and worker still poll, a few % of a core for the rest of the run."""
    if _SERVED and group_of(item.nodeid) == "served" and (nextitem is None or group_of(nextitem.nodeid) != "served"):
        _SERVED.pop().stop()


@pytest.fixture(scope="session")
def served(tmp_path_factory, model_cache):
    """Shared by the schedule and browser tests: one pipeline run costs minutes here.
    Perplexity is the gate's metric, so the tiny model's first version becomes champion."""
    proj = make_project(
        tmp_path_factory.mktemp("served") / "proj", model_cache, {"evaluate": {"primary_metric": "perplexity"}}
    )
    shutil.copy(REPO / "prefect.yaml", proj.root / "prefect.yaml")
    ident = ["-c", "user.name=tuneline-test", "-c", "user.email=test@localhost"]
    proj.run("git", "add", "-A")
    proj.run("git", *ident, "commit", "-qm", "a new tuneline project")  # DVC experiments need a commit
    s = Served(proj, free_port(), free_port())
    _SERVED.append(s)
    try:
        ui = s.start(
            "ui",
            "--mlflow-port",
            s.mlflow.rsplit(":", 1)[1],
            "--prefect-port",
            s.prefect.rsplit(":", 1)[1],
            log="ui.log",
        )
        wait_for("tuneline ui: MLflow", lambda: http_ok(f"{s.mlflow}/health"), 180, ui)
        wait_for("tuneline ui: Prefect", lambda: http_json(f"{s.prefect}/api/health"), 180, ui)
        s.start("schedule", "--cron", "0 3 * * *", "--set", "train.lr=0.003", "--name", "served", log="serve.log")
        s.deployment = wait_for(
            "the served deployment", lambda: s.api(f"deployments/name/{s.DEPLOYMENT}"), 120, s.procs[-1]
        )
        s.first_id = s.trigger()
        s.first = s.wait(s.first_id)
        yield s
    finally:
        s.stop()
