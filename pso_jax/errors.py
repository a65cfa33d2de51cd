"""One exception type for bad user input: its message names the problem and the fix."""


class UserError(Exception):
  """Raised for bad input, before long work starts. `main` prints only its message."""


def require(condition: bool, message: str) -> None:
  if not condition:
    raise UserError(message)
