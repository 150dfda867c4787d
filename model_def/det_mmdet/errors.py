"""The one exception type users see: a one-line message, no traceback, non-zero exit."""


class UserError(Exception):
    """Bad input from the user: the message names the thing (file, key, value, choices).

    The CLI and the cluster entrypoint print ``error: <message>`` and exit with status 2;
    anything else that escapes is a bug and keeps its traceback.
    """
