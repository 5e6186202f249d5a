"""Errors a user can cause. Front ends print ``str(err)`` as one line and exit non-zero."""


class UserError(Exception):
    """A problem with the user's input (prompt, config, file, weights), with the fix in the message."""


class MissingWeightsError(UserError):
    """Prior weights were not found locally; the message says what was looked for and how to get it."""
