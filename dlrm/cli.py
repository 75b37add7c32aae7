"""What every command line shares: one parser that raises, one error handler, one flag-name map.

A command's ``main()`` is ``run_command(body, parser)``: ``body`` parses and works, raising what goes
wrong; ``run_command`` turns it into one ``error: ...`` line on stderr and an exit code:

    2            a flag, input file or size that cannot work (:class:`~dlrm.common.DLRMError`)
    128 + n      signal n (SIGTERM, SIGINT, SIGHUP) stopped it; 130 for Ctrl-C
    128 + 13     standard output was closed (``... | head``), quietly

Configs name their fields after the parser's ``dest``; a :class:`~dlrm.common.FlagError` names the
field, and :func:`run_command` prints the option users type instead (``--mini-batch-size``).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import Callable, Dict, Mapping, Optional, Tuple, Type, TypeVar

from dlrm.common import ConfigError, DLRMError, FlagError, Interrupted
from dlrm.io.interrupts import quiet_broken_pipe, signals_raised

T = TypeVar("T")

_INVALID_CHOICE = re.compile(r"argument (\S+?)(?:/\S+)?: invalid choice: '?([^' ]*)'? \(choose from (.*)\)$")


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are raised as ConfigError, for ``run_command`` to report."""

    def error(self, message: str):
        choice = _INVALID_CHOICE.match(message)
        if choice:
            flag, value, options = choice.groups()
            raise ConfigError(f"{flag}={value} is not supported (choose from {options.replace(chr(39), '')})")
        raise ConfigError(message)


def option_names(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """dest -> the option users type, e.g. ``{"batch_size": "--mini-batch-size"}``."""
    return {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}


def take(cls: Type[T], flags: Mapping[str, object], **derived) -> T:
    """Build the dataclass ``cls`` from the flags named like its fields, with ``derived`` values given
    explicitly (they win over flags). Fields that are neither keep their defaults."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(derived) - set(names))
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)}")
    values = {name: flags[name] for name in names if name in flags and name not in derived}
    return cls(**values, **derived)


def report(line: str, code: int) -> int:
    """Print ``line`` on stderr in one write (ranks printing at once never splice lines), unless
    stderr's reader is gone too; return ``code``."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except BrokenPipeError:
        pass
    return code


def run_command(body: Callable[..., int], parser: Optional[argparse.ArgumentParser] = None,
                errors: Tuple[Type[BaseException], ...] = (DLRMError,)) -> int:
    """Run ``body(signals)`` with SIGTERM, SIGINT and SIGHUP raised as :class:`Interrupted`; return its
    exit code, or report what it raised in one line (see the module's table). ``signals.quiet()``
    stops further signals replacing an error already on its way. ``errors``: the exception types
    reported with exit code 2; a FlagError names the option from ``parser``."""
    try:
        with signals_raised() as signals:
            return body(signals)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except BrokenPipeError:
        return quiet_broken_pipe()
    except errors as exc:
        return report(f"error: {describe(exc, parser)}", 2)
    except Interrupted as exc:
        return report(f"error: {exc.describe()}", exc.exit_code)
    except KeyboardInterrupt:
        return report("error: interrupted", 130)


def describe(exc: BaseException, parser: Optional[argparse.ArgumentParser] = None) -> str:
    """An error's one line; a FlagError's field is named by its option in ``parser``."""
    if isinstance(exc, FlagError) and parser is not None:
        return exc.message(option_names(parser))
    return str(exc)
