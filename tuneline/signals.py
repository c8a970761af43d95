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
