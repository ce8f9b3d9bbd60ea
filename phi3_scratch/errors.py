"""The one exception this package raises for a user's mistake, and the two type tests its checks share.

Every message names the file, tensor or argument that is wrong, the value that was expected and
the value that was found, so that nobody has to read a traceback from deep inside torch.
"""


class Phi3Error(ValueError):
    """A bad checkpoint, config, argument or input, explained in the message."""


def is_integer(value) -> bool:
    """An int, and not a bool (True is an int in Python: as a count or an id it would pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or a float, and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
