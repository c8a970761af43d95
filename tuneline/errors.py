"""One exception type for everything a user can fix, printed as one line."""

# What a run or a command stopped by Ctrl-C says (the command line, the pipeline flow, a stage DVC ran).
INTERRUPTED = "interrupted. Fix: re-run the same command; finished stages and checkpoints are reused"


class TunelineError(Exception):
    """A problem with the user's input (params, data, paths, models, environment).

    The message names the problem *and* the fix; the CLI prints it as one line and exits 2.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem}. Fix: {fix}" if fix else problem)


def dvc_message(output: str) -> str:
    """What a failed DVC command said, in one line: its `ERROR:` lines without DVC's support
    footer ("Having any troubles? ...", which is the last line of every failure)."""
    lines = [" ".join(line.split()) for line in output.splitlines()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    if not errors:
        errors = [line for line in lines if line and not line.startswith("Having any troubles?")][-1:]
    return "; ".join(e.removeprefix("unexpected error - ") for e in errors) or "no output"


def from_os_error(err: BaseException, where: str) -> TunelineError | None:
    """The one-line form of an environment failure (full disk, read-only or forbidden
    path), found also when a library wrapped the OSError in its own message."""
    import errno

    chain = err
    while chain is not None and not isinstance(chain, OSError):  # e.g. raised "from" an OSError
        chain = chain.__cause__ or chain.__context__
    err = chain or err
    code = getattr(err, "errno", None)
    text = str(err)
    path = getattr(err, "filename", None)
    reason = (getattr(err, "strerror", None) if path else None) or " ".join(text.split())[:160]
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or "No space left on device" in text:
        return TunelineError(
            f"{where}: the disk is full{f' writing {path}' if path else ''} ({reason})",
            "free space (`df -h .` shows where), or lower train.keep_checkpoints; "
            "then re-run: finished stages and checkpoints are reused",
        )
    if code in (errno.EACCES, errno.EPERM, errno.EROFS) or "Read-only file system" in text:
        return TunelineError(
            f"{where}: cannot write {path or 'its output'} ({reason})",
            "make the project directory writable (or run from a writable copy), then re-run",
        )
    return None


def out_of_memory(err: BaseException, where: str) -> TunelineError | None:
    """The one-line form of running out of memory: torch's CPU allocator ("can't allocate
    memory"), CUDA's OutOfMemoryError, Python's MemoryError or an ENOMEM from the OS, also
    when another error was raised from it. What the user chose (the batch, the beams, the
    adapter's rank) did not fit; the fix names the knobs of the stage that ran out."""
    import errno
    import re

    chain = err
    while chain is not None and not (
        isinstance(chain, MemoryError)
        or type(chain).__name__ == "OutOfMemoryError"  # torch.OutOfMemoryError (CUDA), without importing torch
        or "can't allocate memory" in str(chain)
        or (isinstance(chain, OSError) and chain.errno == errno.ENOMEM)
    ):
        chain = chain.__cause__ or chain.__context__
    if chain is None:
        return None
    text = " ".join(str(chain).split())
    size = ""
    if asked := re.search(r"tried to allocate (\d+) bytes", text):  # the CPU allocator
        n, k = int(asked[1]), 0
        while n >= 1024 ** (k + 1) and k < 5:
            k += 1
        size = f" ({n / 1024**k:.1f} {('B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB')[k]} asked for)"
    elif asked := re.search(r"(?i)tried to allocate ([\d.]+ [KMGTP]iB)", text):  # CUDA
        size = f" ({asked[1]} asked for)"
    free = "free the memory other processes hold"
    if where == "train":
        fix = (
            "lower train.batch_size (raise train.grad_accum to keep the same effective batch), "
            f"tokenize.max_length or train.lora_r, set train.grad_checkpointing: true, or {free}"
        )
    elif where in ("validate", "evaluate", "register"):
        fix = f"lower evaluate.batch_size or evaluate.num_beams, or {free}"
    elif where in ("prepare", "tokenize"):  # they stream: their memory does not grow with the data
        fix = f"{free}, or use a machine with more memory"
    elif where == "tuneline predict":
        fix = f"lower --beams, or {free}"
    else:  # another command (tuneline evaluate)
        fix = f"lower evaluate.batch_size or evaluate.num_beams (--set), or {free}"
    if not where.startswith("tuneline"):  # a stage
        fix += "; then re-run: finished stages and checkpoints are reused"
    return TunelineError(f"{where}: out of memory{size}", fix)


def known(err: BaseException, where: str) -> TunelineError | None:
    """A failure of the environment that the user can fix (memory, a full disk, permissions)
    as one line; None for anything unforeseen."""
    return out_of_memory(err, where) or from_os_error(err, where)


def debug() -> bool:
    """`tuneline --debug` (which sets TUNELINE_DEBUG for the stage processes it starts)."""
    import os

    return os.environ.get("TUNELINE_DEBUG", "") not in ("", "0", "false")


def report(err: Exception, where: str) -> str:
    """One line for an error nobody foresaw (a bug, or a broken environment). The traceback
    goes to a file, not the terminal, so nothing is lost; the line says where."""
    import os
    import time
    import traceback

    from tuneline import ROOT
    from tuneline.secrets import redact

    first = redact((str(err).strip().splitlines() or [""])[0][:200])
    path = ROOT / ".cache" / "errors" / f"{time.strftime('%Y%m%d-%H%M%S')}-{where}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(redact("".join(traceback.format_exception(err))))
        shown = os.path.relpath(path)
    except OSError:
        shown = "not saved (run with --debug to see it)"
    return (
        f"{where}: unexpected {type(err).__name__}: {first}. Fix: this is likely a bug or a broken install; "
        f"the traceback is in {shown} (`tuneline --debug ...` prints it)"
    )


def print_error(text: str) -> None:
    """`error: <text>` on stderr: red on a terminal, plain in logs and pipes, one line."""
    from tuneline.secrets import redact

    try:
        from rich.console import Console
        from rich.text import Text
    except ImportError:  # a Python without tuneline's stack (a stage DVC started on another one)
        import sys

        print(f"error: {redact(text)}", file=sys.stderr)
        return
    Console(stderr=True, soft_wrap=True, highlight=False).print(Text.assemble(("error: ", "bold red"), redact(text)))
