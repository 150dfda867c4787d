"""The one exception type users see: a one-line message, no traceback, non-zero exit."""


class UserError(Exception):
    """Bad input from the user: the message names the thing (file, key, value, choices).

    The CLI and the cluster entrypoint print ``error: <message>`` and exit with status 2;
    anything else that escapes is a bug and keeps its traceback.
    """


def one_line(error: UserError) -> str:
    """The message; for an error re-raised from a DataLoader worker, the worker's own message.

    torch re-raises a worker's exception as the same type with the worker's traceback as its text.
    """
    text = str(error)
    if "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.partition(f"{UserError.__name__}: ")[2] or last
    return text
