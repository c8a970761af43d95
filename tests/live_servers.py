"""Helpers for tests that start commands and servers: a free port, JSON over HTTP, waiting
for a condition, where each process waits (its stacks), and `Served`, the UIs and schedule
a user runs in two terminals (the `served` fixture in conftest.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Project


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 10):
    """GET (or POST `body`) a JSON API; the parsed reply."""
    import json
    import urllib.request

    req = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or "null")


def http_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status == 200


def wait_for(what: str, fn, timeout: float, proc: subprocess.Popen | None = None, every: float = 1.0):
    """Poll `fn` until it returns something truthy (exceptions count as not yet)."""
    import time

    deadline = time.time() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited ({proc.returncode}) first")
        try:
            value = fn()
            if value:
                return value
        except Exception:
            pass
        if time.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        time.sleep(every)


def process_stacks(procs: list[subprocess.Popen], log: Path) -> str:
    """Where every tuneline process under `procs` (commands, stages, flow runs) waits: each
    in turn prints its threads' stacks into `log`, its output (`kill -USR1`:
    tuneline/signals.stacks_on_request). Only those: SIGUSR1 ends any other process."""
    import signal
    import time

    import psutil

    def ours(cmd: list[str]) -> bool:  # a flow run is a multiprocessing child of the Prefect runner
        return bool({"tuneline.cli", "tuneline.stages", "prefect.engine"} & set(cmd)) or "spawn_main" in " ".join(cmd)

    said = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            top = psutil.Process(proc.pid)
            for p in [top, *top.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    if ours(p.cmdline()):
                        size = log.stat().st_size
                        p.send_signal(signal.SIGUSR1)
                        time.sleep(1)  # for it to write them
                        with open(log, "rb") as f:
                            f.seek(size)
                            said.append(
                                f"pid {p.pid} ({' '.join(p.cmdline())[:150]}):\n{f.read().decode(errors='replace')}"
                            )
    return "\n".join(said)


class Served:
    """A tiny project with `tuneline ui` up (MLflow + Prefect on 127.0.0.1) and its pipeline
    served by `tuneline schedule --cron`, as a user runs them in two terminals."""

    DEPLOYMENT = "tuneline-pipeline/served"

    def __init__(self, proj: Project, mlflow_port: int, prefect_port: int):
        self.proj, self.root = proj, proj.root
        self.mlflow = f"http://127.0.0.1:{mlflow_port}"
        self.prefect = f"http://127.0.0.1:{prefect_port}"
        self.env = proj.env | {"PREFECT_API_URL": f"{self.prefect}/api"}
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str, log: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tuneline.cli", *args],
            cwd=self.root,
            env=self.env,
            stdout=open(self.root.parent / log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def api(self, path: str, body: dict | None = None):
        return http_json(f"{self.prefect}/api/{path}", body)

    def trigger(self) -> str:
        """`prefect deployment run`, as a user types it; the new flow run's id."""
        import re

        out = self.run("prefect", "deployment", "run", self.DEPLOYMENT).stdout
        return re.search(r"UUID: ([0-9a-f-]{36})", out)[1]

    def run(self, *cmd: str, cwd=None, **env) -> subprocess.CompletedProcess:
        """A command in a third terminal, talking to this Prefect server."""
        proc = subprocess.run(
            list(cmd), cwd=cwd or self.root, env=self.env | env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, (
            f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
        return proc

    def wait(self, run_id: str, timeout: float = 600) -> dict:
        """The flow run's final state. One takes ~1.5 min here (3 under a loaded CI); on a
        hang, the failure shows where each of its processes waits (tuneline's kill -USR1)."""
        final = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
        try:
            return wait_for(
                f"flow run {run_id}",
                lambda: (r := self.api(f"flow_runs/{run_id}"))["state_type"] in final and r,
                timeout,
                self.procs[-1],
                every=2,
            )
        except AssertionError as e:
            end = self.log("serve.log")[-6000:]
            stacks = process_stacks(self.procs[-1:], self.root.parent / "serve.log")  # `tuneline schedule` and below
            raise AssertionError(f"{e}. The end of serve.log:\n{end}\nWhere its processes are:\n{stacks}") from None

    def task_runs(self, run_id: str) -> dict[str, str]:
        runs = self.api("task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
        return {r["name"]: r["state_type"] for r in runs}

    def log(self, name: str) -> str:
        return (self.root.parent / name).read_text()

    def stop(self) -> list[int]:
        import signal

        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # Ctrl-C, as a user stops them
        codes = []
        for proc in reversed(self.procs):
            try:
                codes.append(proc.wait(timeout=60))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                codes.append(proc.wait())
        return codes
