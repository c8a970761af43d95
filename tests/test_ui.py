"""`tuneline ui`: MLflow and Prefect answer on loopback only, a "ready in" line, artifacts of
pipeline-style runs served, a postgres store without its password shown, one-line errors, and
a clean stop on Ctrl-C/SIGTERM (no server process left)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import project_env

from tuneline import servers
from tuneline.errors import TunelineError

PG_BIN = Path("/usr/lib/postgresql/15/bin")  # Debian's postgresql-15


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200, url
        return r.read()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _servers_on(*ports: int) -> list[psutil.Process]:
    """Live processes started with one of these ports on their command line."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if any(str(port) in cmd for port in ports) and "pytest" not in " ".join(cmd) and _alive(p):
            found.append(p)
    return found


def _cmd(mlflow_port: int, prefect_port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tuneline.cli",
        "ui",
        "--mlflow-port",
        str(mlflow_port),
        "--prefect-port",
        str(prefect_port),
    ]


class Ui:
    """`tuneline ui` run as a user runs it, in ROOT; output collected as it comes."""

    def __init__(self, root: Path, env: dict, mlflow_port: int, prefect_port: int):
        self.ports = (mlflow_port, prefect_port)
        self.proc = subprocess.Popen(
            _cmd(mlflow_port, prefect_port),
            cwd=root,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 300) -> float:
        deadline = time.time() + timeout
        while not (
            m := re.search(r"ready in (\d+\.\d)s: MLflow (\S+)  Prefect (\S+)  \(Ctrl-C stops both\)", self.output)
        ):
            assert self.proc.poll() is None, f"`tuneline ui` exited {self.proc.returncode}:\n{self.output}"
            assert time.time() < deadline, f"no ready line in {timeout:.0f}s:\n{self.output}"
            time.sleep(0.2)
        assert (m[2], m[3]) == tuple(f"http://127.0.0.1:{p}" for p in self.ports), m[0]
        print(f"\n`tuneline ui` {m[0]}")
        return float(m[1])

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def listening(self) -> set[tuple[str, int]]:
        found = set()
        for p in self.descendants():
            try:
                found |= {
                    (c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
                }
            except psutil.Error:
                pass
        return found

    def stop(self, sig: int) -> tuple[int, float, list[psutil.Process]]:
        """Signal `tuneline ui` only (as a terminal's Ctrl-C does: the servers run in sessions of
        their own); its exit code, how long it took, and what it left alive."""
        kids = self.descendants()
        assert kids, "no server processes were running"
        t = time.time()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            rc = None
        took = time.time() - t
        time.sleep(0.5)  # the reader thread gets the last lines
        return rc, took, [p for p in kids if _alive(p)]

    def kill(self) -> None:
        """Cleanup after a failed test: nothing stays behind."""
        for p in self.descendants() + [psutil.Process(self.proc.pid)]:
            try:
                p.kill()
            except psutil.Error:
                pass
        self.proc.wait(timeout=30)


def _assert_stopped_cleanly(ui: Ui, sig: int) -> None:
    rc, took, left = ui.stop(sig)
    assert rc == 0, f"exit {rc} {took:.1f}s after {signal.Signals(sig).name}:\n{ui.output}"
    assert not left, f"left running: {[(p.pid, p.cmdline()) for p in left]}"
    assert not _servers_on(*ui.ports)
    assert "stopped MLflow and Prefect" in ui.output
    for port in ui.ports:
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
            pass


@pytest.mark.slow
def _project_folder(root: Path) -> Path:
    """An empty project: `tuneline ui` serves a project's store and flow runs, so it needs the
    dvc.yaml that marks one (it refuses elsewhere rather than start an empty store there)."""
    root.mkdir(exist_ok=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    return root


def test_ui_serves_both_on_loopback_with_the_pipelines_artifacts_and_stops_on_ctrl_c(tmp_path):
    root = _project_folder(tmp_path / "proj")
    mlflow_port, prefect_port = _free_ports(2)
    ui = Ui(root, project_env(root, tmp_path / "cache"), mlflow_port, prefect_port)
    try:
        ui.wait_ready()
        assert _get(f"http://127.0.0.1:{mlflow_port}/health") == b"OK"
        assert json.loads(_get(f"http://127.0.0.1:{prefect_port}/api/health")) is True

        # Loopback only: both listening sockets are bound to 127.0.0.1, and no other
        # address of this machine reaches them.
        listening = ui.listening()
        assert {mlflow_port, prefect_port} <= {port for _, port in listening}, listening
        assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
        others = [
            a.address
            for addrs in psutil.net_if_addrs().values()
            for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")
        ]
        for addr in others:
            for port in (mlflow_port, prefect_port):
                with pytest.raises(OSError), socket.create_connection((addr, port), timeout=2):
                    pass

        # A run logged the pipeline's way (straight to the sqlite store, artifacts as file
        # URIs under mlartifacts/): the UI's artifact routes return its plot and table.
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
        exp = client.create_experiment("tuneline", artifact_location=(root / "mlartifacts").as_uri())
        run = client.create_run(exp).info.run_id
        fig, ax = plt.subplots()
        ax.plot([3.0, 2.0, 1.5])
        client.log_figure(run, fig, "plots/loss.png")
        plt.close(fig)
        client.log_table(run, {"input": ["sat cat the"], "prediction": ["the cat sat"]}, "predictions.json")
        base = f"http://127.0.0.1:{mlflow_port}"
        assert _get(f"{base}/get-artifact?path=plots/loss.png&run_uuid={run}")[:8] == b"\x89PNG\r\n\x1a\n"
        table = json.loads(_get(f"{base}/get-artifact?path=predictions.json&run_uuid={run}"))
        assert table == {"columns": ["input", "prediction"], "data": [["sat cat the", "the cat sat"]]}
        listed = json.loads(_get(f"{base}/ajax-api/2.0/mlflow/artifacts/list?run_id={run}"))
        assert {f["path"] for f in listed["files"]} == {"plots", "predictions.json"}

        _assert_stopped_cleanly(ui, signal.SIGINT)
        # The servers' output went to the logs, and MLflow's uvicorn shut down gracefully.
        assert "Finished server process" in (root / ".cache" / "ui" / "mlflow.log").read_text()
        assert "Uvicorn running" not in ui.output
    finally:
        if ui.proc.poll() is None:
            ui.kill()


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 with password auth and a database 'mlflow';
    yields (URI, password). initdb/postgres refuse root: as root they run as 'postgres'."""
    if not (PG_BIN / "initdb").is_file():
        pytest.skip(
            f"the PostgreSQL 15 server is not installed ({PG_BIN}/initdb missing; apt-get install postgresql-15)"
        )
    import psycopg2

    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    tmp = Path(tempfile.mkdtemp(prefix="tuneline-pg-"))  # not under pytest's root-only tmp dirs
    password = "pg-" + os.urandom(8).hex()
    (tmp / "pw").write_text(password + "\n")
    if as_pg:
        for p in (tmp, tmp / "pw"):
            shutil.chown(p, "postgres", "postgres")
    data, started = tmp / "data", False

    def pg(*cmd: str) -> None:
        proc = subprocess.run(as_pg + [*cmd], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{cmd}: {proc.stdout}{proc.stderr}"

    try:
        pg(
            str(PG_BIN / "initdb"),
            "-D",
            str(data),
            "-U",
            "tuneline",
            "--auth=scram-sha-256",
            f"--pwfile={tmp / 'pw'}",
            "-E",
            "UTF8",
            "--no-sync",
        )
        port = _free_ports(1)[0]
        pg(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(tmp / "log"),
            "-o",
            f"-h 127.0.0.1 -p {port} -k {tmp}",
            "-w",
            "-t",
            "60",
            "start",
        )
        started = True
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="tuneline", password=password, dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE mlflow")
        conn.close()
        yield f"postgresql://tuneline:{password}@127.0.0.1:{port}/mlflow", password
    finally:
        if started:
            # immediate: the cluster is thrown away, so it needs no clean shutdown ("fast"
            # took 60 s in CI after the pipeline test).
            pg(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_ui_serves_a_postgres_store_without_showing_its_password(tmp_path, postgres):
    import psycopg2
    from mlflow import MlflowClient

    uri, password = postgres
    root = _project_folder(tmp_path / "proj")
    env = project_env(root, tmp_path / "cache") | {"MLFLOW_TRACKING_URI": uri}
    mlflow_port, prefect_port = _free_ports(2)

    # A wrong password: one line at once, with the password masked, and nothing started.
    wrong = subprocess.run(
        _cmd(mlflow_port, prefect_port),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env=env | {"MLFLOW_TRACKING_URI": uri.replace(password, "not-the-password")},
    )
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    lines = [line for line in wrong.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "password authentication failed" in lines[0], wrong.stderr
    assert "tuneline:***@127.0.0.1" in lines[0] and "not-the-password" not in wrong.stdout + wrong.stderr
    assert not _servers_on(mlflow_port, prefect_port)

    ui = Ui(root, env, mlflow_port, prefect_port)
    try:
        ui.wait_ready()
        assert "store postgresql://tuneline:***@127.0.0.1" in ui.output
        # Not in argv either (`ps` shows it to every user): the URI goes through the environment.
        assert not any(password in " ".join(p.cmdline()) for p in ui.descendants())

        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{mlflow_port}")
        run = client.create_run(client.create_experiment("on-postgres")).info.run_id
        client.log_metric(run, "accuracy", 0.875, step=3)
        assert client.get_run(run).data.metrics == {"accuracy": 0.875}
        assert [(m.value, m.step) for m in client.get_metric_history(run, "accuracy")] == [(0.875, 3)]
        with psycopg2.connect(uri) as conn, conn.cursor() as cur:  # it is in postgres, not in a sqlite file
            cur.execute("SELECT value, step FROM metrics WHERE run_uuid = %s AND key = 'accuracy'", (run,))
            assert cur.fetchall() == [(0.875, 3)]
        assert not (root / "mlflow.db").exists()
        assert json.loads(_get(f"http://127.0.0.1:{prefect_port}/api/health")) is True

        _assert_stopped_cleanly(ui, signal.SIGTERM)
        assert password not in ui.output
    finally:
        if ui.proc.poll() is None:
            ui.kill()


def test_a_taken_port_is_one_line_and_starts_nothing(tmp_path):
    _project_folder(tmp_path)
    mlflow_port, prefect_port = _free_ports(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", mlflow_port))
        taken.listen()
        proc = subprocess.run(
            _cmd(mlflow_port, prefect_port),
            cwd=tmp_path,
            env=project_env(tmp_path, tmp_path / "cache"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, proc.stderr
        assert f"port {mlflow_port} (MLflow) on 127.0.0.1 is already in use" in lines[0]
        assert re.search(r"Fix: .*--mlflow-port \d+$", lines[0]) and "--prefect-port" not in lines[0], lines[0]
        assert "ready in" not in proc.stdout
        assert not _servers_on(mlflow_port, prefect_port)
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", prefect_port), timeout=5):
            pass


def test_a_port_out_of_range_is_refused_before_any_server_starts():
    for bad in (0, 70000):
        with pytest.raises(TunelineError, match=f"--prefect-port {bad} is not a port. Fix: give one from 1 to 65535"):
            servers.check_ports("127.0.0.1", {"MLflow": ("--mlflow-port", 5000), "Prefect": ("--prefect-port", bad)})


@pytest.mark.slow
def test_a_server_dying_at_startup_is_one_line_and_stops_the_other(tmp_path):
    """MLflow cannot create its store (a directory under /proc): it exits while Prefect starts."""
    _project_folder(tmp_path)
    mlflow_port, prefect_port = _free_ports(2)
    env = project_env(tmp_path, tmp_path / "cache") | {"MLFLOW_TRACKING_URI": "sqlite:////proc/no-such-dir/mlflow.db"}
    t = time.time()
    proc = subprocess.run(
        _cmd(mlflow_port, prefect_port), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: the MLflow server exited (code 1): ") and "/proc/no-such-dir" in lines[0], lines[
        0
    ]
    assert lines[0].endswith("Fix: see .cache/ui/mlflow.log")
    assert "ready in" not in proc.stdout
    time.sleep(0.5)
    assert not _servers_on(mlflow_port, prefect_port), "Prefect was left running"
    print(f"\nMLflow died and Prefect was stopped: `tuneline ui` exited after {time.time() - t:.1f}s")


@pytest.mark.slow
def test_a_pipeline_on_a_postgres_store_records_no_password_or_token(tmp_path, postgres, model_cache, prefect_api):
    """A smoke pipeline logs to a password-protected postgres store with HF_TOKEN set: neither
    secret reaches a param, tag or metric in the store, an artifact, or what the run printed."""
    import psycopg2
    from conftest import make_project

    uri, password = postgres
    token = "hf_" + os.urandom(16).hex()
    proj = make_project(tmp_path / "proj", model_cache)
    env = proj.env | {"MLFLOW_TRACKING_URI": uri, "HF_TOKEN": token, "PREFECT_API_URL": prefect_api}
    proc = subprocess.run(
        [sys.executable, "-m", "tuneline.cli", "run", "--smoke"],
        cwd=proj.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said[-3000:]
    assert "postgresql://tuneline:***@127.0.0.1" in proc.stdout
    with psycopg2.connect(uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs")
        assert cur.fetchone()[0] == 7  # the smoke run's parent and its six stages
        stored = []
        for table in ("params", "tags", "experiment_tags", "latest_metrics", "runs", "experiments"):
            cur.execute(f"SELECT * FROM {table}")
            stored += [str(v) for row in cur.fetchall() for v in row]
    files = [
        p
        for p in proj.root.rglob("*")
        if p.is_file()
        and p.parts[-2:] != ("proj", "params.yaml")
        and ".git" not in p.parts
        and p.stat().st_size < 5_000_000
    ]
    assert any(p.name == "model.safetensors" for p in files) or any(p.name == "MLmodel" for p in files)
    blob = " ".join(stored) + said + "".join(p.read_text(errors="ignore") for p in files)
    assert password not in blob and token not in blob
