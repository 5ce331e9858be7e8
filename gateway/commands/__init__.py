"""The `gateway` subcommands, a module per group, and what they share: the two ways a command ends
with a message, and the configuration named on its command line."""

from __future__ import annotations

import argparse

from gateway.config.load import Config, ConfigError, load_config


class Usage(Exception):
    """The command was given something it cannot use (a file, an option, a configuration): exit 2."""


class Refused(Exception):
    """What the command checked does not hold (a forged batch, a log that broke): exit 1."""


def configuration(args: argparse.Namespace) -> Config:
    """The configuration of `-c` (default: the shipped one) with its `--frontend`; its errors, each
    naming file, line and key, as Usage."""
    try:
        return load_config(args.config, args.frontend)
    except ConfigError as e:
        raise Usage("\n".join(e.errors)) from None
