"""timm-sila: Siamese Labels Auxiliary Network (SilaNet) training for any timm model.

Importing the package registers `sila_<arch>` with timm's model registry for every timm architecture.
"""
from timm_sila.config import SilaConfig
from timm_sila.heads import ConvPoolHead
from timm_sila.loss import SilaLogits, SilaLoss, SilaLossError, sila_cross_entropy, sila_log_probs, sila_set_weights
from timm_sila.model import SilaNet
from timm_sila.io.trust import CheckpointError, UnsafeFileError
from timm_sila.io.atomic import OutputError
from timm_sila.io.checkpoint import load_silanet, read_checkpoint
from timm_sila.ship.strip import branch_model, load_stripped, strip
from timm_sila.ship.export import export
from timm_sila.measure.evaluate import evaluate
from timm_sila.measure.sizes import branch_sizes, model_info
from timm_sila.measure.bench import bench_branches
from timm_sila.exits.early_exit import EarlyExit, ExitResult
from timm_sila.exits.curve import exit_curve
from timm_sila._registry import register_sila_models

__version__ = '0.3.0'

__all__ = [
    'SilaConfig', 'SilaNet', 'ConvPoolHead',
    'SilaLoss', 'SilaLogits', 'SilaLossError', 'sila_cross_entropy', 'sila_log_probs', 'sila_set_weights',
    'CheckpointError', 'UnsafeFileError', 'OutputError', 'read_checkpoint', 'load_silanet',
    'strip', 'load_stripped', 'branch_model', 'export',
    'evaluate', 'branch_sizes', 'model_info', 'bench_branches',
    'EarlyExit', 'ExitResult', 'exit_curve',
    'register_sila_models', '__version__',
]

register_sila_models()
