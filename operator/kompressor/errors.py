"""Errors that mean "the input is wrong": the CLI prints the message and exits 2."""

# The exit code of every Kompressor command on bad input. Jobs exiting with it are not retried
# (the Job's podFailurePolicy in a cluster, kompressor.embedded.jobs without one): the same input fails the same way.
BAD_INPUT_EXIT_CODE = 2


class UserError(Exception):
    """Bad input (a corrupt model, a wrong shape, an empty dataset...). Nothing was written."""

    user_error = True

# Where a command in a Pod writes why it failed: the operator sets it to the container's
# terminationMessagePath, the kubelet puts the file into the Pod's status, and the operator copies it
# into the CompressedModel's status.message (the Job controller's own text only names the exit code).
TERMINATION_LOG_ENV = "KOMPRESSOR_TERMINATION_LOG"


def write_termination_message(message: str) -> None:
    """Write ``message`` to $KOMPRESSOR_TERMINATION_LOG, when set (in the operator's Pods); never raises."""
    import os

    path = os.environ.get(TERMINATION_LOG_ENV)
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(message[:4096])
    except OSError:
        pass
