"""The one user-facing error type: the CLI prints its message on one line and exits with code 2."""


class HuscfError(Exception):
    """A problem with the user's input or environment (config, data, cuts, diverged training).

    The message must be one line that names the offending key, file, client or value.
    """

    exit_code = 2
