"""How the gateway reaches into mitmproxy's internals where no addon hook exists: a method replaced by a
wrapper, once, after checking that the original still holds the statements the wrapper relies on (a
mitmproxy upgrade that changes them fails loudly at start, and in tests/test_erroranswer.py)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from mitmproxy.proxy import commands, layer


def wrap_method(cls: type, name: str, wrapper: Callable, relied_on: tuple[str, ...]) -> None:
    """Replace cls.name by wrapper(original), once, after checking the original still holds the
    statements the wrapper relies on (an upgrade that changes them fails loudly at start)."""
    original = getattr(cls, name)
    if getattr(original, "gateway_answers", False):
        return  # a second engine in one process
    if not all(statement in inspect.getsource(original) for statement in relied_on):
        raise RuntimeError(f"{cls.__module__}.{cls.__name__}.{name} changed: "
                           f"review {wrapper.__module__.replace('.', '/')}.py")
    wrapped = wrapper(original)
    wrapped.gateway_answers = True
    setattr(cls, name, wrapped)


Substitute = Callable[[commands.Command], layer.CommandGenerator[None] | None]


def relay(produced: layer.CommandGenerator[None], substitute: Substitute) -> layer.CommandGenerator[None]:
    """A layer method's commands passed on (with their results sent back), except those that
    `substitute` replaces with commands of its own."""
    result = None
    while True:
        try:
            command = produced.send(result)
        except StopIteration as done:
            return done.value
        replacement = substitute(command)
        if replacement is None:
            result = yield command
        else:
            result = yield from replacement


