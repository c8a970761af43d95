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


def interrupt_outside_imports() -> None:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt as usual, except while a module is being
    imported: then it waits until the import is done, and raises at the next Python call.

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

    def raise_once_out(frame, event, arg):
        if event == "call" and not in_import(frame):
            sys.settrace(before.pop())
            raise KeyboardInterrupt
        return None

    def on_sigint(signum, frame):
        if not in_import(frame):
            raise KeyboardInterrupt
        if not before:  # a second Ctrl-C during the same import changes nothing
            before.append(sys.gettrace())
            sys.settrace(raise_once_out)  # this thread's next call outside an import raises

    signal.signal(signal.SIGINT, on_sigint)
