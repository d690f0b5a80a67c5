"""Errors that mean "the input is wrong": the CLI prints the message and exits 2."""

# The exit code of every Kompressor command on bad input. Jobs exiting with it are not retried
# (the Job's podFailurePolicy in a cluster, kompressor.embedded.jobs without one): the same input fails the same way.
BAD_INPUT_EXIT_CODE = 2


class UserError(Exception):
    """Bad input (a corrupt model, a wrong shape, an empty dataset...). Nothing was written."""

    user_error = True
