"""SilaNet: a timm model plus auxiliary Siamese-label heads on earlier stages (paper Sec 2.2-2.3)."""
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Union

import torch
import torch.nn as nn

import timm

from .config import sila_name
from .heads import create_head
from timm_sila.loss.logits import SilaLossError, wrap_sila_logits
from timm_sila.loss.functional import _check_hparams
from .taps import TAP_RULES, choose_taps, probe_stages, resolve_taps
from ._timm_compat import copy_traits, group_with_matcher, model_args, pinned_args

__all__ = ['SilaNet', 'sila_pretrained_cfg', 'prune_base']


def sila_pretrained_cfg(base_cfg: Dict[str, Any], arch: str) -> Dict[str, Any]:
    """A base model's pretrained_cfg re-addressed to the SilaNet: architecture sila_<arch>, layers under base."""
    cfg = dict(base_cfg or {})
    cfg['architecture'] = sila_name(arch)
    for key in ('classifier', 'first_conv'):
        value = cfg.get(key)
        if isinstance(value, str):
            cfg[key] = f'base.{value}'
        elif isinstance(value, (list, tuple)):
            cfg[key] = type(value)(f'base.{v}' for v in value)
    return cfg


def _arch_name(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    arch = cfg.get('architecture')
    if not arch:
        raise ValueError(f'{type(model).__name__} has no pretrained_cfg architecture; create it with timm.create_model.')
    return arch


def prune_base(base: nn.Module, tap_index: int) -> None:
    """Prune a timm model in place to what feature_info stage `tap_index` needs (no later layer, norm or head)."""
    base.prune_intermediate_layers(indices=[tap_index], prune_norm=True, prune_head=True)


class SilaNet(nn.Module):
    """Siamese Labels Auxiliary Network over any timm model with feature_info and forward_intermediates.

    Set 0 is the unmodified base model (`self.base`, state_dict keys `base.*`); set k = 1..M-1 is head
    `heads[str(k)]` on stage `taps[k-1]` (set 1 = deepest tap). Outputs:
      * train mode: `SilaLogits` (B, M·N) ordered [set 0 | set 1 | ... | set M-1];
      * eval mode: (B, N) logits of set `branch`; branch k >= 1 runs the backbone only up to tap k.
    `stripped=True` builds only what branch k >= 1 needs (backbone pruned after tap k, head k).
    """

    def __init__(
            self,
            base: Union[str, nn.Module],
            num_classes: Optional[int] = None,
            sets: int = 3,
            beta: float = 0.1,
            decay: float = 0.5,
            taps: Optional[Sequence[Union[int, str]]] = None,
            branch: int = 0,
            head: str = 'conv3x3',
            stripped: bool = False,
            **base_kwargs,
    ):
        super().__init__()
        if isinstance(sets, bool) or not isinstance(sets, int) or sets < 2:
            raise ValueError(f'sets must be an integer >= 2 (the paper uses 3), got {sets!r}.')
        _check_hparams(beta, decay)
        create_head(head, 1, 1)  # validates the head type before building anything
        if isinstance(base, str):
            if not timm.is_model(base):
                raise ValueError(f'Unknown timm architecture {base!r}; see timm.list_models().')
            if num_classes is not None:
                base_kwargs['num_classes'] = num_classes
            base = timm.create_model(base, **base_kwargs)
        elif isinstance(base, nn.Module):
            if base_kwargs:
                raise ValueError(f'Model keyword arguments {sorted(base_kwargs)} only apply when base is a model name.')
            if num_classes is not None and getattr(base, 'num_classes', num_classes) != num_classes:
                raise ValueError(
                    f'The base model has {base.num_classes} classes but num_classes={num_classes}; create it with '
                    f'num_classes={num_classes} or call base.reset_classifier({num_classes}) first.')
        else:
            raise ValueError(f'base must be a timm model name or a timm model instance, got {type(base).__name__}.')
        num_classes = getattr(base, 'num_classes', num_classes)
        if not num_classes or num_classes < 1:
            raise ValueError('SilaNet needs a classifier: create the base with num_classes >= 1.')

        self.arch = _arch_name(base)
        self.num_classes = int(num_classes)
        self.sets = sets
        self.beta = float(beta)
        self.decay = float(decay)
        self.head_type = head
        self.stripped = False  # set below, once the branch is fixed
        stages, self.total_depth = probe_stages(base)
        self.stages = stages
        if isinstance(taps, (list, tuple)) and len(taps) == 1 and taps[0] in TAP_RULES:
            taps = taps[0]  # e.g. CLI `--taps stages`
        rule = 'depth' if taps is None else taps if isinstance(taps, str) and taps in TAP_RULES else None
        self.tap_indices: List[int] = (
            choose_taps(stages, self.total_depth, sets, rule) if rule else resolve_taps(taps, stages, sets))
        self.taps: List[str] = [stages[i].module for i in self.tap_indices]
        self._branch = 0
        self.branch = branch

        self.base = base
        self.heads = nn.ModuleDict({
            str(k): create_head(head, stages[i].channels, self.num_classes)
            for k, i in enumerate(self.tap_indices, start=1)
        })
        if stripped:
            self._strip_to(branch)
            self.stripped = True
        self.pretrained_cfg = sila_pretrained_cfg(getattr(base, 'pretrained_cfg', {}), self.arch)
        self.default_cfg = self.pretrained_cfg
        self.num_features = getattr(base, 'num_features', None)
        self.in_chans = getattr(base, 'in_chans', self.pretrained_cfg.get('input_size', (3,))[0])
        # timm's input config (img_size, first conv) of the base, read by get_model_input_config / save_for_hf
        copy_traits(base, self, lambda conv: sila_pretrained_cfg({'first_conv': conv}, self.arch)['first_conv'])

    # --- branch selection -------------------------------------------------------------------------------
    @property
    def branch(self) -> int:
        """The set answered in eval mode: 0 = base head, k >= 1 = head k on tap k."""
        return self._branch

    @branch.setter
    def branch(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.sets:
            raise ValueError(f'branch must be an integer in [0, {self.sets - 1}] for sets={self.sets}, got {value!r}.')
        if getattr(self, 'stripped', False) and value != self._branch:
            raise ValueError(f'This SilaNet was stripped to branch {self._branch}; it has no branch {value}.')
        self._branch = value

    def _strip_to(self, branch: int) -> None:
        if branch == 0:
            raise ValueError('Branch 0 is the unmodified base model: export it with strip(..., branch=0), which '
                             'writes a plain timm model, instead of building a stripped SilaNet.')
        if not hasattr(self.base, 'prune_intermediate_layers'):
            raise ValueError(f'{self.arch} has no prune_intermediate_layers(), so its branch {branch} cannot be '
                             f'compressed; branch 0 still works.')
        prune_base(self.base, self.tap_indices[branch - 1])
        for k in list(self.heads.keys()):
            if k != str(branch):
                del self.heads[k]

    # --- forward ----------------------------------------------------------------------------------------
    def _tap_features(self, x: torch.Tensor):
        order = sorted(range(len(self.tap_indices)), key=lambda k: self.tap_indices[k])
        # stop_early=False: some models (Hiera, SAM2 Hiera) stop at the last index by default, set 0 needs them all
        final, feats = self.base.forward_intermediates(
            x, indices=[self.tap_indices[k] for k in order], stop_early=False)
        by_set = [None] * len(order)
        for k, feat in zip(order, feats):
            by_set[k] = feat
        return final, by_set

    def forward_branches(self, x: torch.Tensor) -> List[torch.Tensor]:
        """All M sets' (B, N) logits from one backbone pass, in set order."""
        if self.stripped:
            raise ValueError(f'This SilaNet was stripped to branch {self.branch}; only that branch exists.')
        final, feats = self._tap_features(x)
        return [self.base.forward_head(final)] + [self.heads[str(k)](f) for k, f in enumerate(feats, start=1)]

    def forward_branch(self, x: torch.Tensor, branch: int) -> torch.Tensor:
        """(B, N) logits of one set; set k >= 1 runs the backbone only up to its tap."""
        if branch == 0:
            return self.base(x)
        (feat,) = self.base.forward_intermediates(
            x, indices=[self.tap_indices[branch - 1]], intermediates_only=True, stop_early=True)
        return self.heads[str(branch)](feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.stripped:
            logits = torch.cat(self.forward_branches(x), dim=1)
            return wrap_sila_logits(logits, self.num_classes, self.beta, self.decay)
        return self.forward_branch(x, self.branch)

    def forward_features(self, x: torch.Tensor):
        """Always raises SilaLossError: the sets read different stages, so there is no single feature map."""
        raise SilaLossError(
            'SilaNet has no single feature map: its sets read different stages. Feature/token distillation '
            '(train.py --kd-distill-type feature/token) would train set 0 alone with a plain loss; use '
            'model.base.forward_features for inference, or train without distillation.')

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """Always raises SilaLossError, as forward_features (there is no single feature map to apply it to)."""
        return self.forward_features(x)

    # --- timm model protocol ----------------------------------------------------------------------------
    def no_weight_decay(self) -> Set[str]:
        fn = getattr(self.base, 'no_weight_decay', None)
        return {f'base.{n}' for n in fn()} if fn is not None else set()

    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple]:
        """timm layer grouping of the base under `base.`; auxiliary heads join the classifier's (last) group."""
        matcher = self.base.group_matcher(coarse=coarse)
        ordinals = {}
        for named in (self.base.named_parameters(), self.base.named_modules()):
            for ordinal, names in group_with_matcher(named, matcher).items():
                ordinals.update({f'base.{n}': ordinal for n in names})
        return lambda name: (ordinals.get(name, float('inf')),)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.base.set_grad_checkpointing(enable)

    def get_classifier(self) -> nn.Module:
        return self.base.get_classifier()

    def reset_classifier(self, num_classes: int, *args, **kwargs) -> None:
        """New classifier and auxiliary heads for `num_classes` classes."""
        self.base.reset_classifier(num_classes, *args, **kwargs)
        self.num_classes = num_classes
        for k in list(self.heads.keys()):
            channels = self.stages[self.tap_indices[int(k) - 1]].channels
            self.heads[k] = create_head(self.head_type, channels, num_classes)
        self.pretrained_cfg = dict(self.pretrained_cfg, num_classes=num_classes)
        self.default_cfg = self.pretrained_cfg

    def base_args(self) -> Dict[str, Any]:
        """The create_model kwargs that rebuild the base as it is: those timm recorded, those that keep its module
        when timm rebuilds it with pretrained=True (`timm_compat.pinned_args`), and the current num_classes."""
        return dict(model_args(self.base), **pinned_args(self.arch, self.base), num_classes=self.num_classes)

    def sila_args(self) -> Dict[str, Any]:
        """The `sila_*` keyword arguments that rebuild this SilaNet through timm.create_model."""
        return dict(sila_sets=self.sets, sila_beta=self.beta, sila_decay=self.decay, sila_taps=self.tap_args(),
                    sila_branch=self.branch, sila_head=self.head_type, sila_stripped=self.stripped)

    def tap_args(self) -> List[Union[str, int]]:
        """The taps as `sila_taps` takes them: module names, or feature_info indices where a name is shared by
        several stages (e.g. CrossViT's two branches, CoaT's parallel blocks)."""
        names = [s.module for s in self.stages]
        if all(names.count(t) == 1 for t in self.taps):
            return list(self.taps)
        return list(self.tap_indices)

    def extra_repr(self) -> str:
        return (f'arch={self.arch}, num_classes={self.num_classes}, sets={self.sets}, beta={self.beta}, '
                f'decay={self.decay}, taps={self.taps}, branch={self.branch}, stripped={self.stripped}')
