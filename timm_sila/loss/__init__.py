"""The Sila loss: `functional` (the maths), `logits` (training logits that carry it into unmodified criteria),
`sila_loss` (the nn.Module criterion). Layered bottom-up: functional <- logits <- sila_loss."""
from .functional import sila_cross_entropy, sila_log_probs, sila_set_weights
from .logits import SilaLogits, SilaLossError, wrap_sila_logits
from .sila_loss import SilaLoss

__all__ = ['SilaLoss', 'SilaLogits', 'SilaLossError', 'sila_cross_entropy', 'sila_log_probs', 'sila_set_weights',
           'wrap_sila_logits']
