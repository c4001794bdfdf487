"""Evaluating editors: fact-set DataModule, the edit-measure-revert LightningModule, torchmetrics metrics,
and the run writer behind ``kn-edit evaluate``."""

from .config import DataConfig, EditorConfig, EvalConfig, ProbeConfig, RegressionConfig, TextConfig, TrainerConfig
from .datamodule import EditCase, FactDataModule
from .metrics import EditSuccess, GroupedMean, PerplexityDrift, Retention
from .module import EditEvaluation
from .regression import Regression, compare
from .runner import EvalResult, build_editor, evaluate

__all__ = [
    "DataConfig", "EditCase", "EditEvaluation", "EditSuccess", "EditorConfig", "EvalConfig", "EvalResult",
    "FactDataModule", "GroupedMean", "PerplexityDrift", "ProbeConfig", "Regression", "RegressionConfig",
    "Retention", "TextConfig", "TrainerConfig", "build_editor", "compare", "evaluate",
]  # fmt: skip
