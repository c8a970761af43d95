"""One exception type for everything a user can fix, printed as one line."""


class TunelineError(Exception):
    """A problem with the user's input (params, data, paths, models, environment).

    The message names the problem *and* the fix; the CLI prints it as one line and exits 2.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem}. Fix: {fix}" if fix else problem)
