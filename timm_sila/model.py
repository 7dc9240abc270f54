"""SilaNet: a timm model plus auxiliary Siamese-label heads on earlier stages (paper Sec 2.2-2.3)."""
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Union

import torch
import torch.nn as nn

import timm

from timm_sila.config import SilaConfig, check_branch, sila_name
from timm_sila.heads import create_head
from timm_sila.loss import SilaLossError, wrap_sila_logits
from timm_sila.taps import choose_taps, probe_stages, resolve_taps
from timm_sila._timm_compat import copy_traits, group_with_matcher, model_args, pinned_args

__all__ = ['SilaNet', 'sila_pretrained_cfg', 'prune_base', 'create_with_img_size']


_DEFAULT_SETTINGS = dataclasses.asdict(SilaConfig())  # the settings a SilaNet takes by default


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
        raise ValueError(f'{type(model).__name__} has no pretrained_cfg architecture; create it with '
                         f'timm.create_model.')
    return arch


def create_with_img_size(name: str, img_size: Optional[int] = None, /, **kwargs) -> nn.Module:
    """timm.create_model at input size `img_size`: passed as img_size= to models with a fixed input size (timm's
    pretrained cfg `fixed_input_size`, e.g. ViTs); other models run at any size and are built as they are. An
    img_size in `kwargs` (e.g. a checkpoint's model_kwargs) is passed as it is and wins."""
    if 'img_size' in kwargs or img_size is None or not timm.models.get_pretrained_cfg_value(name, 'fixed_input_size'):
        return timm.create_model(name, **kwargs)
    try:
        return timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError as e:
        raise ValueError(f'{name} has a fixed input size and no img_size argument, so it cannot be built for '
                         f'{img_size}x{img_size}; leave the image size at its default.') from e


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

    The settings are one `SilaConfig`, validated once: pass `config=` or the settings as keyword arguments
    (sets, beta, decay, taps, branch, head, stripped), not both. `self.config` is kept current (`branch` follows
    `model.branch`); `sets`, `beta`, `decay`, `head_type` and `stripped` read it.
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
            *,
            config: Optional[SilaConfig] = None,
            **base_kwargs,
    ):
        super().__init__()
        settings = dict(sets=sets, beta=beta, decay=decay, taps=taps, branch=branch, head=head, stripped=stripped)
        if config is None:
            config = SilaConfig(**settings)
        elif settings != _DEFAULT_SETTINGS:
            raise ValueError('Pass the SilaNet settings either as config=SilaConfig(...) or as keyword arguments '
                             '(sets, beta, decay, taps, branch, head, stripped), not both.')
        create_head(config.head, 1, 1)  # validates the head type before building anything
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
        self.config = dataclasses.replace(config, stripped=False)  # stripped once the layers are removed, below
        stages, self.total_depth = probe_stages(base)
        self.stages = stages
        rule = 'depth' if config.taps is None else config.taps if isinstance(config.taps, str) else None
        self.tap_indices: List[int] = (
            choose_taps(stages, self.total_depth, config.sets, rule) if rule
            else resolve_taps(config.taps, stages, config.sets))
        self.taps: List[str] = [stages[i].module for i in self.tap_indices]

        self.base = base
        self.heads = nn.ModuleDict({
            str(k): create_head(config.head, stages[i].channels, self.num_classes)
            for k, i in enumerate(self.tap_indices, start=1)
        })
        if config.stripped:
            self._strip_to(config.branch)
            self.config = config
        self.pretrained_cfg = sila_pretrained_cfg(getattr(base, 'pretrained_cfg', {}), self.arch)
        self.default_cfg = self.pretrained_cfg
        self.num_features = getattr(base, 'num_features', None)
        self.in_chans = getattr(base, 'in_chans', self.pretrained_cfg.get('input_size', (3,))[0])
        # timm's input config (img_size, first conv) of the base, read by get_model_input_config / save_for_hf
        copy_traits(base, self, lambda conv: sila_pretrained_cfg({'first_conv': conv}, self.arch)['first_conv'])

    # --- settings and branch selection ----------------------------------------------------------------
    @property
    def sets(self) -> int:
        return self.config.sets

    @property
    def beta(self) -> float:
        return self.config.beta

    @property
    def decay(self) -> float:
        return self.config.decay

    @property
    def head_type(self) -> str:
        return self.config.head

    @property
    def stripped(self) -> bool:
        return self.config.stripped

    @property
    def branch(self) -> int:
        """The set answered in eval mode: 0 = base head, k >= 1 = head k on tap k."""
        return self.config.branch

    @branch.setter
    def branch(self, value: int) -> None:
        value = check_branch(value, self.sets, self.branch if self.stripped else None)
        self.config = dataclasses.replace(self.config, branch=value)

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
        when timm rebuilds it with pretrained=True (`_timm_compat.pinned_args`), and the current num_classes."""
        return dict(model_args(self.base), **pinned_args(self.arch, self.base), num_classes=self.num_classes)

    def sila_args(self) -> Dict[str, Any]:
        """The `sila_*` keyword arguments that rebuild this SilaNet through timm.create_model: `config`'s, with the
        taps as resolved (`tap_args`), so a rebuild taps the same stages whatever rule chose them."""
        return dict(self.config.to_kwargs(), sila_taps=self.tap_args())

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
