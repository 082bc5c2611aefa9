"""One exception type for mistakes a user can fix; the CLI turns it into one line on stderr."""


class UserError(Exception):
    """Bad input, bad config or a missing file: reported as one line, exit status 2, no traceback."""
