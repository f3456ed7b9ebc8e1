"""Errors a user can act on: the CLI prints their message as it is (one line per problem, no traceback unless
``--verbose``) and exits with their ``exit_code``."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or an unreachable service, said in the message; ``exit_code`` 2 = bad input."""

    exit_code = 2


class PreflightError(UserError, ValueError):
    """An input (a data path, a model reference, an output folder) is not usable; nothing was started."""


class ServiceUnreachable(UserError, ConnectionError):
    """A server (MLflow tracking / registry) did not answer; the message names its URI and the error."""

    exit_code = 1
