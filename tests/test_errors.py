"""Errors a user reads: one line, the problem and the fix."""

from tuneline.errors import TunelineError, dvc_message


def test_an_error_is_the_problem_then_the_fix():
    assert (
        str(TunelineError("no params.yaml here", "run it in a project"))
        == "no params.yaml here. Fix: run it in a project"
    )
    assert str(TunelineError("stopped")) == "stopped"


def test_dvc_output_is_read_for_its_error_lines_without_the_support_footer():
    failed = (
        "Running stage 'train':\nERROR: failed to reproduce 'train': exited 1\n\n"
        "Having any troubles? Hit us up at https://dvc.org/support, we are always happy to help!\n"
    )
    assert dvc_message(failed) == "failed to reproduce 'train': exited 1"
    assert dvc_message("ERROR: unexpected error - Empty git repo\n\nHaving any troubles? Hit us up") == "Empty git repo"
    assert dvc_message("Having any troubles? ...\n") == "no output"
    assert dvc_message("fatal: not a git repository\n") == "fatal: not a git repository"
