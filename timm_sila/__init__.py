"""timm-sila: Siamese Labels Auxiliary Network (SilaNet) training for any timm model.

Importing the package registers `sila_<arch>` with timm's model registry for every timm architecture.
"""
from timm_sila.config import SilaConfig
from timm_sila.heads import ConvPoolHead
from timm_sila.loss import SilaLogits, SilaLoss, SilaLossError, sila_cross_entropy, sila_log_probs, sila_set_weights
from timm_sila.model import SilaNet
from timm_sila.io.trust import CheckpointError, UnsafeFileError
from timm_sila.io.atomic import (ForeignFilesError, OutputBusyError, OutputError, OutputExistsError, OutputPathError,
                                 OutputWriteError, SourceInOutputError)
from timm_sila.io.checkpoint import Checkpoint, load_silanet, read_checkpoint
from timm_sila.data.folder import ImageFolderError, ImageReadError
from timm_sila.data.memory import MemoryBoundError
from timm_sila.ship.strip import branch_model, load_stripped, model_card, strip, write_model_card
from timm_sila.ship.export import ExportError, ExportParityError, MissingExtraError, export
from timm_sila.measure.evaluate import evaluate
from timm_sila.measure.metrics import MetricsError, read_eval_metrics
from timm_sila.measure.sizes import branch_sizes, model_info
from timm_sila.measure.bench import bench_branches
from timm_sila.exits.early_exit import EarlyExit, ExitResult
from timm_sila.exits.curve import SlowerThanBaseWarning, exit_curve
from timm_sila._registry import register_sila_models

__version__ = '0.3.0'

__all__ = [
    'SilaConfig', 'SilaNet', 'ConvPoolHead',
    'SilaLoss', 'SilaLogits', 'SilaLossError', 'sila_cross_entropy', 'sila_log_probs', 'sila_set_weights',
    'Checkpoint', 'read_checkpoint', 'load_silanet', 'CheckpointError', 'UnsafeFileError',
    'OutputError', 'OutputExistsError', 'ForeignFilesError', 'OutputBusyError', 'OutputPathError', 'OutputWriteError',
    'SourceInOutputError', 'ImageFolderError', 'ImageReadError', 'MemoryBoundError',
    'strip', 'load_stripped', 'branch_model', 'model_card', 'write_model_card',
    'export', 'ExportError', 'ExportParityError', 'MissingExtraError',
    'evaluate', 'read_eval_metrics', 'MetricsError', 'branch_sizes', 'model_info', 'bench_branches',
    'EarlyExit', 'ExitResult', 'exit_curve', 'SlowerThanBaseWarning',
    'register_sila_models', '__version__',
]

register_sila_models()
