"""Segmentation engine: architectures, model directories, preprocessing, inference, training.

Everything the node and the federation server need to run, train and judge a Dafne
segmentation model. Models are data (safetensors + JSON manifest naming a built-in
architecture), see :mod:`dafne_node.model.manifest`.
"""

from dafne_node.model.architectures import ARCHITECTURES, build_model, count_parameters
from dafne_node.model.infer import Precision, Segmenter, bf16_supported
from dafne_node.model.manifest import (
    LoadedModel,
    ModelError,
    ModelManifest,
    default_model_dir,
    load_manifest,
    load_model_dir,
    save_model_dir,
)
from dafne_node.model.metrics import dice_per_label, mean_dice
from dafne_node.model.preprocess import PreprocessConfig
from dafne_node.model.train import (
    DEFAULT_PREPROCESSING,
    EvaluationResult,
    TrainingExample,
    TrainingReport,
    build_default_model,
    evaluate,
    train,
)

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_PREPROCESSING",
    "EvaluationResult",
    "LoadedModel",
    "ModelError",
    "ModelManifest",
    "Precision",
    "PreprocessConfig",
    "Segmenter",
    "TrainingExample",
    "TrainingReport",
    "bf16_supported",
    "build_default_model",
    "build_model",
    "count_parameters",
    "default_model_dir",
    "dice_per_label",
    "evaluate",
    "load_manifest",
    "load_model_dir",
    "mean_dice",
    "save_model_dir",
    "train",
]
