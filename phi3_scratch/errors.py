"""The one exception this package raises for a user's mistake, and the helpers its checks share.

- Phi3Error: a user's mistake, explained.
- is_integer, is_number, type_name: the type tests the checks share.
- warn: for what is allowed but probably not meant.

Every message names the file, tensor or argument that is wrong. It gives the value expected and the
value found. Nobody has to read a traceback from deep inside torch.
"""

import os
import sys
import warnings
from pathlib import Path

import torch


class Phi3Error(ValueError):
    """A bad checkpoint, config, argument or input, explained in the message."""


def is_integer(value) -> bool:
    """An int, and not a bool.

    True is an int in Python: as a count or an id it would pass as 1.
    """
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or a float, and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def type_name(value) -> str:
    """Its type's name, with the module for a non-builtin type.

    Two libraries share a class name: transformers' Phi3ForCausalLM and ours.
    """
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def warn(message: str) -> None:
    """A UserWarning attributed to the user's line: the first frame outside this package and torch.

    generate, stream_tokens, from_pretrained and torch's inference_mode wrapper lie in between.
    """
    inside = (str(Path(__file__).parent) + os.sep, str(Path(torch.__file__).parent) + os.sep)
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)
