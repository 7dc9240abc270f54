"""The SilaNet settings (`SilaConfig`, the `sila_*` keyword arguments) and the names of SilaNet models.

`SilaConfig` validates the settings once, on creation; `SilaNet` keeps it, and its `sila_*` keyword form
(`to_kwargs`) is derived from it. `check_set_weights` and `check_branch` are the one definition of a valid
beta / decay pair and of a valid branch index, used by the config, the model, the loss and the shipping code.
This module imports neither torch nor timm.
"""
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Optional, Tuple, Union

from timm_sila import _checks as checks

__all__ = ['SILA_PREFIX', 'SILA_KWARGS', 'SILA_CHECKS', 'TAP_RULES', 'SilaConfig', 'check_set_weights', 'check_branch',
           'sila_name', 'base_arch', 'is_sila_name', 'sila_kwargs']

SILA_PREFIX = 'sila_'
TAP_RULES = ('depth', 'stages')  # named tap rules for `sila_taps` (None = 'depth'); the rules: taps.choose_taps


def check_set_weights(beta: Any, decay: Any) -> Tuple[float, float]:
    """(beta, decay) as floats: the Sila loss weighs set j >= 1 by beta * decay**(j-1), so both must be finite
    numbers >= 0 (Python, numpy or 0-d tensor numbers; never a bool or a string). ValueError otherwise."""
    values = []
    for value in (beta, decay):
        number = checks.finite_float(value)
        if number is None or number < 0:
            raise ValueError(f'The Sila loss needs finite beta >= 0 and decay >= 0 (no NaN or inf), got '
                             f'beta={beta!r}, decay={decay!r}.')
        values.append(number)
    return values[0], values[1]


def check_branch(branch: Any, sets: int, stripped_to: Optional[int] = None) -> int:
    """`branch` if it is a set of a SilaNet with `sets` sets (0 = the base model's head, k >= 1 = head k on tap k)
    and, for a SilaNet stripped to one branch (`stripped_to`), that branch; ValueError saying which ones exist."""
    if not (checks.is_int(branch) and 0 <= branch < sets):
        raise ValueError(f'branch {branch!r} is out of range: this SilaNet has sets={sets}, so the branch must be '
                         f'an integer in [0, {sets - 1}] (0 = the base model, k >= 1 = head k on tap k).')
    if stripped_to is not None and branch != stripped_to:
        raise ValueError(f'This SilaNet was stripped to branch {stripped_to}; it has no branch {branch}.')
    return int(branch)


SILA_CHECKS: Dict[str, checks.Check] = {
    'sila_sets': checks.spec(checks.integer(2), 'an integer >= 2'),
    'sila_beta': checks.spec(checks.real(0.0), 'a finite number >= 0'),
    'sila_decay': checks.spec(checks.real(0.0), 'a finite number >= 0'),
    'sila_taps': checks.spec(
        checks.either(lambda v: isinstance(v, str) and v in TAP_RULES,
                      checks.seq(checks.either(checks.name, checks.integer(-checks.MAX_LIST)))),
        f'a tap rule {TAP_RULES} or a list of stage names or feature_info indices'),
    'sila_branch': checks.spec(checks.integer(0), 'an integer >= 0'),
    'sila_head': checks.spec(checks.name, 'a head type name'),
    'sila_stripped': checks.spec(checks.flag, 'a bool'),
}
"""The type of each `sila_*` value (the ranges that depend on other settings are SilaConfig's)."""


@dataclass(frozen=True)
class SilaConfig:
    """The SilaNet settings a `sila_<arch>` model takes as `sila_*` keyword arguments, validated on creation.

    sets: output sets M >= 2 (set 0 = the base model); beta, decay: finite >= 0 (set j weighs beta * decay**(j-1));
    taps: None or a tap rule name ('depth' = paper Sec 2.2, the default; 'stages' = the M-1 stages before the
    final one) or M-1 stage names / feature_info indices, deepest first (one name or index: a list of it);
    branch: the set answered in eval mode, 0 <= branch < sets; head: auxiliary head type name; stripped: build
    only `branch`'s layers.
    """
    sets: int = 3
    beta: float = 0.1
    decay: float = 0.5
    taps: Union[None, str, List[Union[str, int]]] = None
    branch: int = 0
    head: str = 'conv3x3'
    stripped: bool = False

    def __post_init__(self):
        if not SILA_CHECKS['sila_sets'](self.sets):
            raise ValueError(f'sila_sets must be an integer >= 2 (the paper uses 3), got {self.sets!r}.')
        beta, decay = check_set_weights(self.beta, self.decay)
        object.__setattr__(self, 'beta', beta)
        object.__setattr__(self, 'decay', decay)
        if isinstance(self.taps, (list, tuple)) and len(self.taps) == 1 and self.taps[0] in TAP_RULES:
            object.__setattr__(self, 'taps', self.taps[0])  # e.g. CLI `--taps stages`
        elif isinstance(self.taps, (str, int)) and not isinstance(self.taps, bool) and self.taps not in TAP_RULES:
            object.__setattr__(self, 'taps', [self.taps])  # one stage name or index: the taps of sets=2
        if self.taps is not None and not (isinstance(self.taps, str) and self.taps in TAP_RULES):
            if not SILA_CHECKS['sila_taps'](self.taps):
                raise ValueError(f'sila_taps must be a list of stage names or feature_info indices, got '
                                 f'{self.taps!r}.')
            if len(self.taps) != self.sets - 1:
                raise ValueError(f'sila_taps must list {self.sets - 1} stages (one per auxiliary set, deepest '
                                 f'first), got {list(self.taps)}.')
            object.__setattr__(self, 'taps', list(self.taps))
        check_branch(self.branch, self.sets)
        for field in ('head', 'stripped'):
            check = SILA_CHECKS[SILA_PREFIX + field]
            if not check(getattr(self, field)):
                raise ValueError(f'sila_{field} must be {checks.describe(check)}, got {getattr(self, field)!r}.')

    def to_kwargs(self) -> Dict[str, Any]:
        """{'sila_sets': ..., 'sila_beta': ..., ...}: create_model keyword arguments (taps None = automatic)."""
        return {SILA_PREFIX + k: v for k, v in asdict(self).items()}

    @classmethod
    def from_kwargs(cls, kwargs: Dict[str, Any]) -> 'SilaConfig':
        """From `sila_*` keyword arguments (missing ones take their defaults); any other key is a ValueError."""
        unknown = sorted(k for k in kwargs if k not in SILA_KWARGS)
        if unknown:
            raise ValueError(f'Unknown SilaNet arguments {unknown}; valid ones are {list(SILA_KWARGS)}.')
        return cls(**{k[len(SILA_PREFIX):]: v for k, v in kwargs.items()})


SILA_KWARGS = tuple(SILA_PREFIX + f.name for f in fields(SilaConfig))  # the one list of sila_* names


def sila_name(name: str) -> str:
    """The registered SilaNet model name of an architecture or model name, without a pretrained tag:
    'resnet18', 'sila_resnet18' and 'sila_resnet18.a1_in1k' -> 'sila_resnet18'."""
    return SILA_PREFIX + base_arch(name)


def base_arch(name: str) -> str:
    """The timm architecture under a (sila_) model name: 'sila_resnet18.a1_in1k' -> 'resnet18'."""
    arch = name.split(':')[-1].split('.', 1)[0]
    return arch[len(SILA_PREFIX):] if arch.startswith(SILA_PREFIX) else arch


def is_sila_name(name: str) -> bool:
    return name.split(':')[-1].startswith(SILA_PREFIX)


def sila_kwargs(**settings: Any) -> Dict[str, Any]:
    """`sila_*` create_model kwargs of the SilaConfig fields given and not None: sila_kwargs(sets=3, taps=None)
    -> {'sila_sets': 3}. Unknown field names are a TypeError (a programming error)."""
    names = {f.name for f in fields(SilaConfig)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise TypeError(f'sila_kwargs() got unknown SilaConfig fields {unknown}')
    return {SILA_PREFIX + k: (list(v) if k == 'taps' and isinstance(v, tuple) else v)
            for k, v in settings.items() if v is not None}
