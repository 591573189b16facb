"""Reading a JSON file, with the one error message every reader gives: the file, what it is, what
went wrong, and what to do. (Writing goes through `atomic.write_json`.)"""

import json
from pathlib import Path
from typing import Optional

from .errors import PuddingError, first_line


def read_json(path, what: str, fix: str = "re-create or re-download it", want: Optional[type] = dict):
    """Parse the JSON file `path` (`what` names it for the user; `fix` says what to do). `want`: the
    type the top level must have (None: any)."""
    path = Path(path)
    if not path.is_file():
        raise PuddingError(f"{path}: missing ({what}); {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PuddingError(f"{path}: not valid JSON ({what}: {first_line(e)}); {fix}") from None
    if want is not None and not isinstance(data, want):
        raise PuddingError(f"{path}: {what} must be a JSON {'object' if want is dict else want.__name__}; {fix}")
    return data


def field_checker(settings: dict, where, fix: str = ""):
    """`need(key, ok, what)` for one parsed settings file: the value of `key` if `ok(value)`, else the one
    line every reader gives (the file, the field, what it must be, what it is; then `fix`)."""
    tail = f"; {fix}" if fix else ""

    def need(key, ok, what):
        if key not in settings or not ok(settings[key]):
            raise PuddingError(f"{where}: field '{key}' must be {what}, got {settings.get(key)!r}{tail}")
        return settings[key]

    return need
