"""timm-sila: Siamese Labels Auxiliary Network (SilaNet) training for any timm model."""
from timm_sila.io.checkpoint import CheckpointError, load_silanet
from timm_sila.exits.early_exit import EarlyExit, ExitResult
from timm_sila.measure.evaluate import evaluate
from timm_sila.ship.export import export
from .heads import ConvPoolHead
from timm_sila.loss.logits import SilaLogits, SilaLossError
from timm_sila.loss.functional import SilaLoss, sila_cross_entropy, sila_log_probs, sila_set_weights
from .model import SilaNet
from ._registry import register_sila_models
from timm_sila.ship.strip import load_stripped, strip

__version__ = '0.2.0'

register_sila_models()
