"""The one exception type for mistakes a user can make (bad path, bad row, unsupported config).

Scripts catch it and print its message as a single line, without a traceback; anything else is a bug and raises.
"""


class UserError(Exception):
    """An error caused by user input; its message names the file/row/field and what to do."""


class RankLocalError(UserError):
    """A UserError that only some processes of a torchrun job may meet, because it comes from their own share of the
    work (a reward function raising on this rank's completions): every rank that meets it says so, not only rank 0."""
