"""optiscope.zoo: built-in datasets (:mod:`optiscope.zoo.data`) and models (:mod:`optiscope.zoo.models`)."""

from optiscope.zoo.data import (DATASETS, Dataset, HalfMSELoss, SequenceCrossEntropy, batch_iterator, default_loss,
                                digits, fashion_mnist, fortunes, load_dataset, powerlaw_features, random_labels,
                                teacher_regression)
from optiscope.zoo.models import (FCN, MLP, MODELS, Bilinear, DeepLinear, NeuralChain, SmallCNN, StrippedResNet,
                                  TinyTransformer, TwoLayerLinear, build_model)

__all__ = ["DATASETS", "Dataset", "HalfMSELoss", "SequenceCrossEntropy", "batch_iterator", "default_loss", "digits",
           "fashion_mnist", "fortunes", "load_dataset", "powerlaw_features", "random_labels", "teacher_regression",
           "MODELS", "MLP", "NeuralChain", "DeepLinear", "TwoLayerLinear", "Bilinear", "TinyTransformer", "FCN",
           "StrippedResNet", "SmallCNN", "build_model"]
