"""The one exception this package raises for a user's mistake.

Every message names the file, tensor or argument that is wrong, the value that was expected and
the value that was found, so that nobody has to read a traceback from deep inside torch.
"""


class Phi3Error(ValueError):
    """A bad checkpoint, config, argument or input, explained in the message."""
