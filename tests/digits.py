"""Small models trained here on real data: scikit-learn's bundled handwritten digits (8x8, 10 classes).

Used by the quantization and pruning tests and benchmarks for accuracy on real labels (no download:
the data ships inside scikit-learn). Training is seeded and takes a few seconds on 2 cores.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["DigitsModel", "digits_data", "train_digits_cnn", "train_digits_mlp", "accuracy"]


@dataclasses.dataclass
class DigitsModel:
    """A trained torch module, its held-out test set and the data to calibrate with."""

    module: Any
    x_train: np.ndarray  # float32, (N, 1, 8, 8) for the CNN, (N, 64) for the MLP
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    test_accuracy: float

    def export(self) -> Any:
        """``onnx_ir.Model`` with input ``x`` (dynamic batch) and output ``logits``."""
        import torch

        import graphopt

        batch = torch.export.Dim("batch", min=1, max=4096)
        return graphopt.export(
            self.module, (torch.from_numpy(self.x_test[:4]),), dynamic_shapes=({0: batch},)
        )

    def calibration(self, n: int = 256, batch: int = 32) -> list[dict[str, np.ndarray]]:
        """Feed dicts from the training split (never the test split)."""
        x = self.x_train[:n]
        return [{"x": x[i : i + batch]} for i in range(0, len(x), batch)]


def digits_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): pixels scaled to [0, 1], a stratified 70/30 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return x_tr, y_tr, x_te, y_te


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(-1) == labels).mean())


def _train(module: Any, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    module.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(module(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    module.eval()


def _evaluate(module: Any, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        return accuracy(module(torch.from_numpy(x)).numpy(), y)


def train_digits_cnn(seed: int = 0, epochs: int = 15) -> DigitsModel:
    """Conv-BN-ReLU ×3 (with a residual add and max pooling) + 2 Linear layers; ≈98% test accuracy."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(32)
            self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(32)
            self.pool = nn.MaxPool2d(2)
            self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
            self.bn3 = nn.BatchNorm2d(64)
            self.fc1 = nn.Linear(64 * 4 * 4, 128)
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.bn1(self.conv1(x)))
            h = torch.relu(self.bn2(self.conv2(h)) + h)  # residual add
            h = self.pool(h)
            h = torch.relu(self.bn3(self.conv3(h)))
            h = torch.flatten(h, 1)
            return self.fc2(torch.relu(self.fc1(h)))

    x_tr, y_tr, x_te, y_te = digits_data(seed)
    x_tr, x_te = x_tr[:, None], x_te[:, None]
    module = DigitsCNN()
    _train(module, x_tr, y_tr, epochs, seed)
    return DigitsModel(module, x_tr, y_tr, x_te, y_te, _evaluate(module, x_te, y_te))


def train_digits_mlp(seed: int = 0, epochs: int = 30, hidden: int = 256) -> DigitsModel:
    """64 → hidden → hidden → 10 MLP with ReLU; ≈97% test accuracy."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class DigitsMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(64, hidden)
            self.fc2 = nn.Linear(hidden, hidden)
            self.fc3 = nn.Linear(hidden, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    module = DigitsMLP()
    x_tr, y_tr, x_te, y_te = digits_data(seed)
    x_tr, x_te = x_tr.reshape(len(x_tr), 64), x_te.reshape(len(x_te), 64)
    _train(module, x_tr, y_tr, epochs, seed)
    return DigitsModel(module, x_tr, y_tr, x_te, y_te, _evaluate(module, x_te, y_te))
