"""Refusals that name arguments of condiff's functions, so that the library never speaks of flags: a message
writes an argument as `{name}`; str() spells it for Python, the command line as its flag (`spelled`)."""

from __future__ import annotations

import re
from collections.abc import Callable

ARGUMENT = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


class NamesArguments(Exception):
    """Base of the errors whose message names arguments as `{name}`; `in_python` spells them for str().
    `names`, when given, are the only names spelled (a path or value in braces stays as it is)."""
    names: tuple[str, ...] | None = None

    @staticmethod
    def in_python(argument: str) -> str:
        return argument

    def __init__(self, message: str):
        self.message = message
        super().__init__(self.spelled(self.in_python))

    def __reduce__(self):
        # rebuilt from its fields (a subclass's __init__ takes other arguments than its message), so that it
        # crosses from a worker process to the parent (`condiff demo` trains its models side by side)
        return rebuild_error, (type(self), self.__dict__, self.args)

    def spelled(self, spell: Callable[[str], str]) -> str:
        """The message with every argument's name written by `spell`."""
        return ARGUMENT.sub(lambda match: spell(match.group(1)) if self.names is None or match.group(1) in self.names
                            else match.group(0), self.message)


class SwitchError(NamesArguments):
    """A refusal that a switch of the call would lift (`{overwrite}`: str() says `overwrite=True`)."""
    names = ("resume", "overwrite")

    @staticmethod
    def in_python(argument: str) -> str:
        return f"{argument}=True"


def rebuild_error(cls: type[NamesArguments], fields: dict, args: tuple) -> NamesArguments:
    """A NamesArguments error unpickled: its fields and its args as they were."""
    error = cls.__new__(cls)
    error.__dict__.update(fields)
    error.args = args
    return error
