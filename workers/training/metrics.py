"""Evaluation metrics as pure functions over accumulated counts (mergeable across batches)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F


def loss_fn(outputs: torch.Tensor, labels: torch.Tensor, classification: bool) -> torch.Tensor:
    """Mean cross-entropy on class indices, or mean squared error on targets."""
    if classification:
        return F.cross_entropy(outputs, labels.reshape(-1).long())
    return F.mse_loss(outputs, labels.reshape(outputs.shape).to(outputs.dtype))


@dataclass
class Accumulator:
    """Sums over batches what the metrics need; ``result()`` turns them into numbers."""

    classification: bool
    num_classes: int = 0
    examples: int = 0
    loss_sum: float = 0.0
    squared_error_sum: float = 0.0
    elements: int = 0
    # confusion[true, predicted]
    confusion: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.int64))

    def __post_init__(self) -> None:
        if self.classification and self.confusion.numel() == 0:
            self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def add(self, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        outputs = outputs.detach().float().cpu()
        labels = labels.detach().cpu()
        n = outputs.shape[0]
        self.examples += n
        self.loss_sum += float(loss_fn(outputs, labels, self.classification)) * n
        if self.classification:
            truth = labels.reshape(-1).long()
            predicted = outputs.argmax(dim=1)
            index = truth * self.num_classes + predicted
            self.confusion += torch.bincount(index, minlength=self.num_classes**2).reshape(
                self.num_classes, self.num_classes
            )
        else:
            target = labels.reshape(outputs.shape).float()
            self.squared_error_sum += float(((outputs - target) ** 2).sum())
            self.elements += outputs.numel()

    def result(self) -> dict[str, float]:
        """loss and accuracy/precision/recall/f1 (macro) or mse."""
        if self.examples == 0:
            return {}
        metrics = {"loss": self.loss_sum / self.examples}
        if self.classification:
            metrics.update(classification_metrics(self.confusion))
        else:
            metrics["mse"] = self.squared_error_sum / max(1, self.elements)
        return metrics


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 from a [true, predicted] confusion matrix.

    Classes with no predictions (precision) or no examples (recall) count as 0, as
    scikit-learn's ``zero_division=0`` does, so a degenerate model is not flattered.
    """
    c = confusion.double()
    true_positive = c.diag()
    predicted = c.sum(dim=0)
    actual = c.sum(dim=1)
    precision = torch.where(predicted > 0, true_positive / predicted.clamp(min=1), 0.0)
    recall = torch.where(actual > 0, true_positive / actual.clamp(min=1), 0.0)
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), 0.0)
    total = float(c.sum())
    return {
        "accuracy": float(true_positive.sum()) / total if total else 0.0,
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
    }
