"""The one exception type for mistakes a user can make (bad path, bad row, unsupported config).

Scripts catch it and print its message as a single line, without a traceback; anything else is a bug and raises.
"""


class UserError(Exception):
    """An error caused by user input; its message names the file/row/field and what to do."""
