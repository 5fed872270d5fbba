"""User-facing errors: caught at the CLI boundary, printed as one line, exit code 2."""


class UserError(Exception):
    """An error the user can fix (bad path, bad config value, corrupt file, empty corpus).

    The CLI prints ``error: <message>`` on one line and exits with code 2, no traceback.
    """
