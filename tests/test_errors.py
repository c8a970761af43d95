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


def test_running_out_of_memory_is_one_line_naming_the_stages_knobs():
    import errno

    import torch

    from tuneline.errors import known

    try:
        torch.empty(2**62, dtype=torch.uint8)  # more than any address space: torch's CPU allocator refuses it
    except RuntimeError as e:
        cpu = e
    assert str(known(cpu, "train")).startswith(
        "train: out of memory (4096.0 PiB asked for). Fix: lower train.batch_size"
    )
    assert "lower evaluate.batch_size or evaluate.num_beams" in str(known(cpu, "evaluate"))
    assert str(known(cpu, "tuneline predict")).endswith("Fix: lower --beams, or free the memory other processes hold")
    cuda = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB"
    )
    assert str(known(cuda, "validate")).startswith("validate: out of memory (2.00 GiB asked for). Fix: lower evaluate")
    try:  # raised from a MemoryError, as a library may wrap it
        try:
            raise MemoryError
        except MemoryError as inner:
            raise ValueError("could not build the batch") from inner
    except ValueError as e:
        assert str(known(e, "tokenize")).startswith("tokenize: out of memory. Fix: free the memory")
    assert str(known(OSError(errno.ENOMEM, "Cannot allocate"), "prepare")).startswith(
        "prepare: out of memory. Fix: free the memory other processes hold, or use a machine with more memory"
    )
    assert known(RuntimeError("shape mismatch"), "train") is None  # a bug stays a bug, with its traceback saved
