"""timm-sila: Siamese Labels Auxiliary Network (SilaNet) training for any timm model."""
from .checkpoint import CheckpointError, load_silanet
from .early_exit import EarlyExit, ExitResult
from .evaluation import evaluate
from .export import export
from .heads import ConvPoolHead
from .logits import SilaLogits, SilaLossError
from .loss import SilaLoss, sila_cross_entropy, sila_log_probs, sila_set_weights
from .model import SilaNet
from .registry import register_sila_models
from .shipping import load_stripped, strip

__version__ = '0.2.0'

register_sila_models()
