"""tuneline/signals.py: how tuneline's processes take Ctrl-C."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import REPO


def test_ctrl_c_during_an_import_lets_the_import_finish_then_interrupts(tmp_path):
    # A library module that is slow to import; Ctrl-C arrives while its body runs.
    (tmp_path / "slowlib.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(0.5)\nDONE = True\n"
    )
    script = textwrap.dedent(
        """
        import sys
        from tuneline.signals import interrupt_outside_imports
        interrupt_outside_imports()
        def step():
            pass
        try:
            import slowlib
            while True:
                step()
        except KeyboardInterrupt:
            print("interrupted; slowlib imported whole:", getattr(sys.modules.get("slowlib"), "DONE", False))
        """
    )
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "interrupted; slowlib imported whole: True"


def test_ctrl_c_outside_an_import_interrupts_at_once():
    script = textwrap.dedent(
        """
        import os, signal, time
        from tuneline.signals import interrupt_outside_imports
        interrupt_outside_imports()
        t = time.time()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
        except KeyboardInterrupt:
            print(f"interrupted after {time.time() - t:.0f} s")
        """
    )
    env = os.environ | {"PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "interrupted after 0 s", out.stderr


def test_sigterm_stops_a_process_as_ctrl_c_does_and_its_exit_code_is_143():
    script = textwrap.dedent(
        """
        import os, signal, time
        from tuneline.signals import Terminated, exit_code, interrupt_outside_imports
        interrupt_outside_imports()
        print("before:", exit_code())
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        except KeyboardInterrupt as e:  # every Ctrl-C clean-up catches it
            print("stopped:", type(e) is Terminated, exit_code())
        """
    )
    env = os.environ | {"PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["before:", "130", "stopped:", "True", "143"], out.stderr


def test_sigusr1_prints_where_every_thread_is_and_the_process_carries_on():
    """For a run that seems stuck: `kill -USR1 PID` shows where each thread waits."""
    script = textwrap.dedent(
        """
        import os, signal, threading, time
        from tuneline.signals import stacks_on_request
        stacks_on_request()
        def waiting_in_a_worker_thread():
            time.sleep(30)
        threading.Thread(target=waiting_in_a_worker_thread, daemon=True).start()
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.2)
        print("still running")
        """
    )
    env = os.environ | {"PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "still running", out.stderr
    assert "waiting_in_a_worker_thread" in out.stderr and "Current thread" in out.stderr, out.stderr
