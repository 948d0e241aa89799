"""The one exception type that the CLI turns into a clean message and a non-zero exit."""


class BrainzooError(Exception):
    """A problem with the user's input or environment, worded for the user.

    The message names the file (or model, or field) and what is wrong with it.
    """
