"""The one exception type for user mistakes: the CLI prints its message as one line."""


class FedqcError(Exception):
    """A problem the user can fix (bad file, unknown option, missing field).

    The message names the file, line or key, and says how to fix it.
    """
