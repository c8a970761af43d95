"""The MLflow and Prefect servers that `tuneline ui` (and `tuneline schedule`, when no Prefect
server is up) start: each in a session of its own, so a terminal's Ctrl-C reaches only us
and we stop its whole process group (mlflow's uvicorn worker, Prefect's server); their
output goes to logs. Both bind 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tuneline import ROOT
from tuneline.errors import TunelineError
from tuneline.signals import on_parent_death

READY_TIMEOUT = 300.0  # s; both servers answer in 10-40 s on a busy 2-core machine
STOP_GRACE = 15.0  # s between SIGTERM and SIGKILL of a server's process group


class Server:
    """One server in a session of its own, so that a terminal's Ctrl-C reaches only us and we
    stop its whole process group (mlflow's uvicorn worker, Prefect's server); output goes to a log."""

    def __init__(self, name: str, option: str, port: int, health: str, cmd: list[str], env: dict, log: Path):
        self.name, self.option, self.port, self.health, self.log = name, option, port, health, log
        self.ready = False
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def answers(self) -> bool:
        return answers(self.health)

    def members(self) -> list:
        """The live processes of its group (zombies that init has not reaped yet do not count)."""
        import psutil

        found = []
        for p in psutil.process_iter(["status"]):
            try:
                if os.getpgid(p.pid) == self.proc.pid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except (OSError, psutil.Error):
                pass
        return found

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def died(self, host: str, suggest: int) -> TunelineError:
        """Why it exited: a taken port, or the last line of its log (passwords redacted)."""
        from tuneline.secrets import redact

        try:
            lines = [line.strip() for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            lines = []
        log = os.path.relpath(self.log)
        if any("address already in use" in line.lower() for line in lines):
            return TunelineError(
                f"the {self.name} server could not listen on {host}:{self.port}: the port is already in use",
                f"pick another port, e.g. {self.option} {suggest}",
            )
        last = redact(lines[-1])[:200] if lines else "no output"
        return TunelineError(f"the {self.name} server exited (code {self.proc.returncode}): {last}", f"see {log}")


def answers(health_url: str, timeout: float = 2.0) -> bool:
    """Whether a server's health endpoint says 200."""
    import urllib.request

    try:
        with urllib.request.urlopen(health_url, timeout=timeout) as r:
            return r.status == 200
    except Exception:  # refused, reset, timed out, or an error while it starts
        return False


def url(host: str, port: int) -> str:
    h = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{h}]:{port}" if ":" in h else f"http://{h}:{port}"


def port_free(host: str, port: int) -> bool:
    """Whether HOST:PORT can be bound (as the servers do: with SO_REUSEADDR)."""
    import errno
    import socket

    try:
        family, socktype, proto, _, addr = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise TunelineError(
            f"--host {host} is not an address ({e.strerror})", "use 127.0.0.1 (the default) or 0.0.0.0"
        ) from None
    with socket.socket(family, socktype, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise TunelineError(
                f"cannot listen on --host {host} ({e.strerror})",
                "use 127.0.0.1 (the default), 0.0.0.0 or an address of this machine",
            ) from None
    return True


def free_near(host: str, port: int, taken: set[int]) -> int:
    return next((p for p in range(port + 1, port + 100) if p not in taken and port_free(host, p)), port + 1)


def check_ports(host: str, ports: dict[str, tuple[str, int]]) -> None:
    """Both ports must be free before anything starts: one line naming each taken port and a free one."""
    for option, port in ports.values():  # caught here, not as a server's bind() traceback in its log
        if not 0 < port < 65536:
            raise TunelineError(
                f"{option} {port} is not a port",
                "give one from 1 to 65535, or leave it out (MLflow 5000, Prefect 4200)",
            )
    taken = {port for _, port in ports.values()}
    if len(taken) < len(ports):
        raise TunelineError(
            f"MLflow and Prefect cannot share port {taken.pop()}",
            "give them different --mlflow-port and --prefect-port",
        )
    busy = [(name, option, port) for name, (option, port) in ports.items() if not port_free(host, port)]
    if busy:
        what = " and ".join(f"{port} ({name})" for name, _, port in busy)
        fix = []
        for _, option, port in busy:
            taken.add(free := free_near(host, port, taken))
            fix.append(f"{option} {free}")
        raise TunelineError(
            f"port{'s' if len(busy) > 1 else ''} {what} on {host} {'are' if len(busy) > 1 else 'is'} already in use "
            "(another `tuneline ui`?)",
            f"stop what listens there, or pick {'free ports' if len(busy) > 1 else 'a free port'}, e.g. {' '.join(fix)}",
        )


def wait_ready(servers: list[Server], stop: list, host: str, t0: float) -> None:
    taken = {s.port for s in servers}
    while not stop:
        for s in servers:
            if s.proc.poll() is not None:
                raise s.died(host, free_near(host, s.port, taken))
            s.ready = s.ready or s.answers()
        if all(s.ready for s in servers):
            return
        if time.time() - t0 > READY_TIMEOUT:
            slow = [s for s in servers if not s.ready]
            raise TunelineError(
                f"{' and '.join(s.name for s in slow)} did not answer {', '.join(s.health for s in slow)} "
                f"within {READY_TIMEOUT:.0f}s",
                f"see {', '.join(os.path.relpath(s.log) for s in slow)}",
            )
        time.sleep(0.3)


def stop_all(servers: list[Server], stop: list) -> None:
    """SIGTERM each server's process group, wait for every member, SIGKILL what lingers
    (at once on a second Ctrl-C)."""
    signals = len(stop)
    for s in servers:
        s.signal(signal.SIGTERM)
    deadline = time.time() + STOP_GRACE
    while time.time() < deadline and len(stop) == signals:
        for s in servers:
            s.proc.poll()
        if not any(s.members() for s in servers):
            break
        time.sleep(0.2)
    for s in servers:
        s.signal(signal.SIGKILL)
        s.proc.wait()


def env() -> dict[str, str]:
    return os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1"}


def logs_dir() -> Path:
    logs = ROOT / ".cache" / "ui"
    logs.mkdir(parents=True, exist_ok=True)
    return logs


def mlflow(host: str, port: int, store: str) -> Server:
    """The MLflow UI on `store`. The URI goes through the environment, not argv: `ps` would
    show its password."""
    artifacts = (ROOT / "mlartifacts").as_uri()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--default-artifact-root",
        artifacts,
        "--artifacts-destination",
        artifacts,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    return Server(
        "MLflow",
        "--mlflow-port",
        port,
        url(host, port) + "/health",
        cmd,
        env() | {"MLFLOW_BACKEND_STORE_URI": store},
        logs_dir() / "mlflow.log",
    )


def prefect(host: str, port: int) -> Server:
    """The Prefect server (API, scheduler, UI) on the flow runs in PREFECT_HOME. Its UI is
    told where its API is: by default it would look on port 4200 whatever --port says."""
    cmd = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", host, "--port", str(port)]
    extra = {"PREFECT_UI_API_URL": os.environ.get("PREFECT_UI_API_URL") or f"{url(host, port)}/api"}
    return Server(
        "Prefect",
        "--prefect-port",
        port,
        url(host, port) + "/api/health",
        cmd,
        env() | extra,
        logs_dir() / "prefect.log",
    )


def serve_until_stopped(start: list, host: str, on_ready) -> float:
    """Start the servers (`start`: functions that each return a Server), wait until all
    answer, call `on_ready(seconds)`, and keep them up until SIGINT/SIGTERM or until one dies
    (a one-line TunelineError). Every server is stopped on the way out; returns the seconds
    stopping took."""
    t0 = time.time()
    stop: list[int] = []
    # Our own handlers (a shell that starts us in the background may ignore SIGINT); the
    # servers run in sessions of their own, so a signal reaches them only through us.
    previous = {sig: signal.signal(sig, lambda *_: stop.append(1)) for sig in (signal.SIGINT, signal.SIGTERM)}
    running: list[Server] = []
    try:
        for fn in start:
            running.append(fn())
        wait_ready(running, stop, host, t0)
        if not stop:
            on_ready(time.time() - t0)
        while not stop:
            for s in running:
                if s.proc.poll() is not None:
                    raise s.died(host, free_near(host, s.port, {r.port for r in running}))
            time.sleep(0.3)
    finally:
        t1 = time.time()
        stop_all(running, stop)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return time.time() - t1


def prefect_ready(host: str, port: int) -> Server:
    """A Prefect server on its own (for `tuneline schedule`), returned once it answers."""
    check_ports(host, {"Prefect": ("PREFECT_API_URL", port)})
    server = prefect(host, port)
    try:
        wait_ready([server], [], host, time.time())
    except BaseException:
        stop_all([server], [])
        raise
    return server


class _OwnSessionPopen(subprocess.Popen):
    """Popen that starts the child in a session of its own, tied to our lifetime."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("start_new_session", True)
        # SIGTERM when we die, so a server in a session of its own never outlives a killed parent
        kwargs.setdefault("preexec_fn", functools.partial(on_parent_death, signal.SIGTERM))
        super().__init__(*args, **kwargs)


def detach_temporary_prefect_server() -> None:
    """Start Prefect's temporary server (the one a flow starts when no PREFECT_API_URL is
    set) in a session of its own. In our process group, a terminal's Ctrl-C killed it with
    the stage, and the flow then retried the dead server for minutes before failing with
    an unrelated ConnectError. Prefect still stops it at exit (atexit); if we are killed,
    the kernel's parent-death signal stops it."""
    import types

    from prefect.server.api import server as prefect_server

    if isinstance(prefect_server.subprocess, types.ModuleType) and prefect_server.subprocess is subprocess:
        shim = types.ModuleType("subprocess")
        shim.__dict__.update(subprocess.__dict__)
        shim.Popen = _OwnSessionPopen
        prefect_server.subprocess = shim


def start_temporary_prefect_server() -> None:
    """Start Prefect's temporary server now, where the flow would start it (its client
    starts `SubprocessASGIServer()`, one instance per process, at its first API call, and
    finds this one running). Call `detach_temporary_prefect_server` first."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():  # a profile may name a server: then the flow uses that one
        SubprocessASGIServer().start()
