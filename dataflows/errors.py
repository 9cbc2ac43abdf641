"""The project's own exception: raised with the offending value and where it came from."""


class ConvoflowError(Exception):
    """A problem a user can fix (bad input, bad option); the CLI prints it as one line."""
