"""Signals between tuneline's own processes."""

from __future__ import annotations


def on_parent_death(sig: int) -> None:
    """Have the kernel send `sig` to this process when the thread that started it ends
    (Linux's PR_SET_PDEATHSIG), so that no child outlives a parent that was interrupted or
    killed. Elsewhere it does nothing: the parent's own clean-up has to stop the child."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def interrupt(processes) -> list:
    """SIGINT to each of `processes` (psutil.Process), as a terminal's Ctrl-C reaches every
    process of its group; for what SIGTERM to one process must stop too. Returns those that
    were still there to signal."""
    import signal

    import psutil

    reached = []
    for p in processes:
        try:
            p.send_signal(signal.SIGINT)
            reached.append(p)
        except psutil.Error:
            pass
    return reached


def stacks_on_request() -> None:
    """`kill -USR1 PID` of a tuneline process (a command, a stage, a flow run) prints where
    each of its threads is, to its stderr, and the process carries on: for a run that
    seems stuck (what py-spy's dump gives, with nothing to install). Python's default for
    SIGUSR1 is to end the process. Any thread may call it (faulthandler works in C)."""
    import faulthandler
    import signal
    import sys

    usr1 = getattr(signal, "SIGUSR1", None)  # not on Windows
    if usr1 is None:
        return
    try:
        faulthandler.register(usr1, file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, OSError):  # a stderr with no file descriptor (captured)
        pass


class Terminated(KeyboardInterrupt):
    """SIGTERM: `kill PID`, `timeout`, `docker stop`, a cancelled CI job or scheduler. It
    stops the process the way Ctrl-C does (a KeyboardInterrupt, so every clean-up that
    Ctrl-C gets runs: the one "interrupted" line, MLflow runs ended, DVC's queue emptied),
    and the process then exits 143 (128 + SIGTERM), as one killed by it would."""


TERMINATED: list[int] = []  # holds SIGTERM once it has arrived: exit_code() gives 143, not 130


def exit_code() -> int:
    """The exit status of a process that was interrupted: 143 after SIGTERM, else 130 (Ctrl-C)."""
    return 143 if TERMINATED else 130


def interrupt_outside_imports() -> None:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt as usual, and SIGTERM raises `Terminated`
    (one), except while a module is being imported: then it waits until the import is done,
    and raises at the next Python call. (Python's default for SIGTERM is to die at once:
    no line, no clean-up, the stage's MLflow run left RUNNING. While a flow runs, Prefect's
    engine puts its own handler in, which raises its TerminationSignal, no KeyboardInterrupt:
    the flows' clean-ups catch it too (flows/sweep_arms.STOPPED, dvc_tasks.reproduce). It marks
    the flow run Crashed, puts this handler back and sends the signal again, so the command
    still ends on the one line.)

    A KeyboardInterrupt inside an import leaves that module half-initialised, and libraries
    that catch BaseException around their optional imports carry on with it. Seen in a
    stage interrupted while it started: `import mlflow` then failed inside numpy
    (RecursionError from numpy's `__getattr__`, or "module 'numpy' has no attribute
    'dtype'"), an "unexpected" error instead of the one "interrupted" line. Call it from
    the main thread, before the imports it should cover."""
    import signal
    import sys
    import threading

    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set a handler (and it is the one Python runs it in)

    def in_import(frame) -> bool:
        while frame is not None:
            if frame.f_code.co_filename.startswith("<frozen importlib"):
                return True
            frame = frame.f_back
        return False

    before = []  # the trace function a deferred interrupt replaced (a debugger's, coverage's)
    pending: list[type[KeyboardInterrupt]] = []  # what the deferred interrupt raises

    def raise_once_out(frame, event, arg):
        if event == "call" and not in_import(frame):
            sys.settrace(before.pop())
            raise pending.pop()
        return None

    def on_signal(signum, frame):
        kind = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        if kind is Terminated and not TERMINATED:
            TERMINATED.append(signum)
        if not in_import(frame):
            raise kind
        if not before:  # a second signal during the same import changes nothing
            before.append(sys.gettrace())
            pending.append(kind)
            sys.settrace(raise_once_out)  # this thread's next call outside an import raises

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
