"""One exception type for everything a user can fix, printed as one line."""


class TunelineError(Exception):
    """A problem with the user's input (params, data, paths, models, environment).

    The message names the problem *and* the fix; the CLI prints it as one line and exits 2.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem}. Fix: {fix}" if fix else problem)


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

    first = (str(err).strip().splitlines() or [""])[0][:200]
    path = ROOT / ".cache" / "errors" / f"{time.strftime('%Y%m%d-%H%M%S')}-{where}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(err)))
        shown = os.path.relpath(path)
    except OSError:
        shown = "not saved (run with --debug to see it)"
    return (f"{where}: unexpected {type(err).__name__}: {first}. Fix: this is likely a bug or a broken install; "
            f"the traceback is in {shown} (`tuneline --debug ...` prints it)")


def print_error(text: str) -> None:
    """`error: <text>` on stderr: red on a terminal, plain in logs and pipes, one line."""
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True, soft_wrap=True, highlight=False).print(Text.assemble(("error: ", "bold red"), text))
