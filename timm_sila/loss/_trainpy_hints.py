"""What timm train.py options do to a SilaNet's training logits: the torch op each unsupported criterion or wrapper
applies first, and the flag to change. Used only to word `SilaLossError` messages; the Sila loss never depends on it.
"""
__all__ = ['hint_for_op']

# (first op applied to the logits, hint)
_FLAG_HINTS = (
    (('sigmoid', 'binary_cross_entropy', 'binary_cross_entropy_with_logits', 'logsigmoid'),
     'This is binary cross-entropy: train.py --bce-loss (timm BinaryCrossEntropy, `--loss bce` in newer train.py) '
     'or another sigmoid-based loss (asl, poly, twoway, zlpr, db); drop that flag. '),
    (('split', 'chunk', 'tensor_split', 'unbind'),
     'This is the JSD loss: train.py --jsd-loss (timm JsdCrossEntropy, used with --aug-splits); drop --jsd-loss '
     '(--aug-splits alone is fine). '),
    (('clone',),
     'DistributedDataParallel clones model outputs when find_unused_parameters=True or static_graph=True (or '
     'when another wrapper copies them); the copy would be a plain tensor. timm train.py sets neither: wrap the '
     'SilaNet in DDP without these options (all its parameters are used in every training step). '),
    (('div', '__truediv__', '__rtruediv__', 'div_', '__itruediv__'),
     'This is logit knowledge distillation (train.py --kd-model-name, timm LogitDistillationTask): the '
     'distillation term would be computed over M·N logits; train without --kd-model-name. '),
)


def hint_for_op(name: str) -> str:
    """What in a train.py run applies torch op `name` to the training logits, and what to change."""
    for names, hint in _FLAG_HINTS:
        if name in names:
            return hint
    return ('This happens with train.py --bce-loss, --jsd-loss, knowledge distillation (--kd-model-name), '
            'or any custom criterion. ')
