"""Value checks shared by the SilaNet settings (`config`) and the rules for values read from files (`io.trust`).

Each check is a predicate `check(value) -> bool`; `spec(check, expected)` attaches the wording of what it accepts,
which `describe(check)` returns for error messages. Booleans are never numbers; numbers are finite.
"""
import math
import numbers
import re
from typing import Any, Callable, Optional, Sequence

Check = Callable[[Any], bool]

NAME = re.compile(r'[A-Za-z0-9_.\-]{0,64}')  # a model, layer, pool or head name: never a path, URL or source prefix
MAX_LIST = 64


def is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    """A finite real number, never a bool (an integer too large for a float is not finite here)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def finite_float(v: Any) -> Optional[float]:
    """`v` as a float when it is a finite real number -- Python, numpy or a 0-d tensor, never a bool or a string --
    else None (the caller words the error)."""
    if hasattr(v, 'tolist') and not isinstance(v, (list, tuple)):  # numpy scalar, 0-d tensor
        v = v.tolist()
    return float(v) if is_real(v) else None


def integer(lo: int) -> Check:
    return lambda v: is_int(v) and v >= lo


def real(lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False) -> Check:
    return lambda v: is_real(v) and (v > lo if lo_open else v >= lo) and v <= hi


def name(v: Any) -> bool:
    return isinstance(v, str) and NAME.fullmatch(v) is not None


def flag(v: Any) -> bool:
    return isinstance(v, bool)


def seq(item: Check, min_len: int = 1, max_len: int = MAX_LIST) -> Check:
    return lambda v: isinstance(v, (list, tuple)) and min_len <= len(v) <= max_len and all(item(x) for x in v)


def either(*checks: Check) -> Check:
    return lambda v: any(check(v) for check in checks)


def spec(check: Check, expected: str) -> Check:
    """`check` with the wording of what it accepts, used in error messages."""
    def checked(value: Any) -> bool:
        return check(value)
    checked.expected = expected
    return checked


def describe(check: Check) -> str:
    return getattr(check, 'expected', 'a value of another type')


def short(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: a value from a file can be arbitrarily long."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + '...'


def listing(names: Sequence[str], most: int) -> str:
    """The first `most` names, comma-separated, then "(+N more)": a message names what is wrong without growing
    with the file."""
    names = list(names)
    more = f' (+{len(names) - most} more)' if len(names) > most else ''
    return ', '.join(names[:most]) + more


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty): one-line errors quote
    what torch, timm or the OS said without their tracebacks or hints."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def require_int(value: Any, name: str, minimum: int, why: str = '') -> int:
    """`value` if it is an integer >= `minimum` (never a bool), else ValueError naming `name` (and `why`)."""
    if not is_int(value) or value < minimum:
        raise ValueError(f'{name} must be an integer >= {minimum}{f" ({why})" if why else ""}, got {value!r}.')
    return int(value)
