"""Errors that mean "the input is wrong": the CLI prints the message and exits 2."""


class UserError(Exception):
    """Bad input (a corrupt model, a wrong shape, an empty dataset...). Nothing was written."""

    user_error = True
