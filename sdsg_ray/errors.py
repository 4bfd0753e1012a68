"""Errors a user can act on: a bad setting, a missing object, a file of the wrong kind.

Every such error derives from :class:`UserError` and says what is wrong and what to do, naming the
field, the URI or the file. The command line prints its message as one line on stderr and exits
non-zero (``--debug`` shows the traceback); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message is complete on its own."""


class InvalidRequest(UserError, ValueError):
    """A command that cannot be carried out as asked: an --out that holds another run's results, too
    few readable images, a checkpoint of the wrong kind, resources that cannot fit."""
