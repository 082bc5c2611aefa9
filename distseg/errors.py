"""One exception type for mistakes a user can fix; the CLI turns it into one line on stderr."""


class UserError(Exception):
    """Bad input, bad config or a missing file: reported as one line, exit status 2, no traceback."""


def describe_os_error(e: OSError) -> str:
    """An OSError as one line naming the file (unwritable output, full disk, ...)."""
    return f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}"
