"""Model builders shared by the export tests and the benchmarks (random weights, no downloads).

Tests import this as ``from models import ...`` (pytest puts ``tests/`` on ``sys.path``, see
``pythonpath`` in pyproject.toml); the benchmarks add ``tests/`` to ``sys.path`` themselves.
torch and transformers are imported inside the functions so that importing this module is cheap.

Weights are random (seeded); biases and norm parameters get seeded noise too (see
:func:`_perturb_vectors`). Each ``build_*`` returns a :class:`Exportable`: the module in eval
mode plus the example arguments and dynamic shapes that ``graphopt.export`` needs, and a
``feeds`` function that makes valid ONNX Runtime inputs (token ids inside the vocabulary,
attention masks with padding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "KINDS",
    "SIZES",
    "Exportable",
    "build",
    "build_bert",
    "build_cnn",
    "build_gpt2",
    "build_llama",
    "build_resnet",
    "build_yolo_detector",
    "build_vit",
    "chain_model",
]

#: Model kinds ``build`` knows, per size: "tiny" (unit tests), "mini" (benchmark --quick),
#: "base" (BERT-base / GPT-2 small, the real benchmark and slow tests).
SIZES = ("tiny", "mini", "base")

_BERT = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=64,
    ),
    "mini": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        vocab_size=1000,
        max_position_embeddings=128,
    ),
    "base": {},  # BertConfig() defaults are bert-base-uncased: 12 layers, 768 hidden, 30522 vocab
}
_GPT2 = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=100),
    "mini": dict(n_embd=256, n_layer=4, n_head=4, n_positions=128, vocab_size=1000),
    "base": {},  # GPT2Config() defaults are GPT-2 small: 12 layers, 768 hidden, 50257 vocab
}
# Llama-style decoder: grouped-query attention (fewer KV heads than query heads), rotary
# embeddings, RMSNorm, SiLU-gated MLP. "base" is 8 layers of 1024 hidden with 16 query and 4 KV
# heads (~140M parameters): the shape of a small Llama, sized so that a 2-core machine exports and
# benchmarks it in minutes.
_LLAMA = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=128,
    ),
    "mini": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=256,
    ),
    "base": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
}
_VIT = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
    ),
    "mini": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        image_size=224,
        patch_size=16,
    ),
    "base": {},  # ViTConfig() defaults are ViT-base/16 at 224x224: 12 layers, 768 hidden
}
_RESNET = {
    "tiny": dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]),
    "mini": dict(embedding_size=32, hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 2, 1]),
    "base": {},  # ResNetConfig() defaults are ResNet-50: bottleneck layers [3, 4, 6, 3]
}


@dataclasses.dataclass
class Exportable:
    """A torch module with what ``graphopt.export`` needs and a matching input generator."""

    name: str
    module: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    dynamic_shapes: Any
    #: ``feeds(batch, seq_or_size, seed)`` → ONNX Runtime feeds (numpy) for the exported model.
    feeds: Callable[..., dict[str, np.ndarray]]
    config: Any = None

    def export(self) -> Any:
        """Export with ``graphopt.export`` (dynamo exporter) and return the ``onnx_ir.Model``."""
        import graphopt

        return graphopt.export(self.module, self.args, kwargs=self.kwargs, dynamic_shapes=self.dynamic_shapes)


def _token_feeds(vocab: int, with_mask: bool = True) -> Callable[..., dict[str, np.ndarray]]:
    def feeds(batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        out = {"input_ids": rng.integers(0, vocab, (batch, seq), dtype=np.int64)}
        if with_mask:
            mask = np.ones((batch, seq), dtype=np.int64)
            # Right padding on every row but the first, so the mask path is exercised while
            # every query still sees at least one key (no fully masked softmax rows).
            for b in range(1, batch):
                mask[b, max(1, seq - 3 * b) :] = 0
            out["attention_mask"] = mask
        return out

    return feeds


def _perturb_vectors(module: Any, std: float = 0.02) -> None:
    """Add seeded noise to every 1-D parameter (biases, norm scales and shifts).

    Fresh transformers models have zero biases and unit LayerNorm scales; that hides bias
    bugs in tests and lets a tool delete ``x + 0`` nodes that no trained checkpoint allows,
    which would flatter node counts in the benchmark.
    """
    import torch

    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * std)


def _seq_dims(max_seq: int) -> tuple[Any, Any]:
    import torch

    return torch.export.Dim("batch", max=64), torch.export.Dim("sequence", max=max_seq)


def build_bert(size: str = "tiny", seed: int = 0) -> Exportable:
    """transformers ``BertModel`` from a config; inputs ``input_ids`` + ``attention_mask``."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(**_BERT[size])
    module = BertModel(config).eval()
    _perturb_vectors(module)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    batch, seq = _seq_dims(config.max_position_embeddings)
    dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    return Exportable(
        f"bert-{size}",
        module,
        (),
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        dyn,
        _token_feeds(config.vocab_size),
        config,
    )


def build_gpt2(size: str = "tiny", lm_head: bool = False, seed: int = 0) -> Exportable:
    """transformers ``GPT2Model`` (or ``GPT2LMHeadModel``) without KV cache; ids + mask inputs."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    torch.manual_seed(seed)
    extra = {} if size == "base" else {"bos_token_id": 0, "eos_token_id": 0}
    config = GPT2Config(**_GPT2[size], **extra)
    module = (GPT2LMHeadModel if lm_head else GPT2Model)(config).eval()
    _perturb_vectors(module)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    batch, seq = _seq_dims(config.n_positions)
    dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}, "use_cache": None}
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    name = f"gpt2{'-lm' if lm_head else ''}-{size}"
    return Exportable(name, module, (), kwargs, dyn, _token_feeds(config.vocab_size), config)


def build_cnn(seed: int = 0) -> Exportable:
    """Two conv+batchnorm+relu blocks, global average pool and a linear head; dynamic batch and
    (square) image size."""
    import torch

    torch.manual_seed(seed)

    class TinyCNN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = torch.nn.BatchNorm2d(8)
            self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1, stride=2)
            self.bn2 = torch.nn.BatchNorm2d(16)
            self.fc = torch.nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.bn1(self.conv1(x)))
            x = torch.relu(self.bn2(self.conv2(x)))
            return self.fc(x.mean(dim=(2, 3)))

    module = TinyCNN()
    _perturb_vectors(module, std=0.1)
    # Non-trivial running statistics, so batch norm is not an identity in eval mode.
    with torch.no_grad():
        for bn in (module.bn1, module.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    module.eval()

    def feeds(batch: int = 2, size: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {"x": rng.standard_normal((batch, 3, size, size)).astype(np.float32)}

    side = torch.export.Dim("side", min=4, max=256)
    dyn = ({0: torch.export.Dim("batch", max=64), 2: side, 3: side},)
    return Exportable("cnn", module, (torch.randn(2, 3, 16, 16),), {}, dyn, feeds)


def build_llama(size: str = "tiny", seed: int = 0) -> Exportable:
    """transformers ``LlamaModel`` (grouped-query attention, rotary embeddings, RMSNorm), without
    KV cache; inputs ``input_ids`` + ``attention_mask``."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    config = LlamaConfig(**_LLAMA[size], bos_token_id=0, eos_token_id=0, pad_token_id=0)
    module = LlamaModel(config).eval()
    _perturb_vectors(module)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    batch, seq = _seq_dims(config.max_position_embeddings)
    dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}, "use_cache": None}
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    return Exportable(f"llama-{size}", module, (), kwargs, dyn, _token_feeds(config.vocab_size), config)


def _image_feeds(size: int) -> Callable[..., dict[str, np.ndarray]]:
    def feeds(batch: int = 2, image: int = size, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {"pixel_values": rng.standard_normal((batch, 3, image, image)).astype(np.float32)}

    return feeds


def build_vit(size: str = "tiny", seed: int = 0) -> Exportable:
    """transformers ``ViTModel`` (no pooler); input ``pixel_values`` at the config's image size,
    dynamic batch."""
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(**_VIT[size])
    module = ViTModel(config, add_pooling_layer=False).eval()
    _perturb_vectors(module)
    x = torch.randn(2, 3, config.image_size, config.image_size)
    dyn = {"pixel_values": {0: torch.export.Dim("batch", max=64)}}
    return Exportable(
        f"vit-{size}", module, (), {"pixel_values": x}, dyn, _image_feeds(config.image_size), config
    )


def build_resnet(size: str = "tiny", seed: int = 0) -> Exportable:
    """transformers ``ResNetModel`` (ResNet-50 at "base") with non-trivial batch-norm statistics;
    input ``pixel_values`` 224x224 (64x64 for "tiny"), dynamic batch."""
    import torch
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(seed)
    config = ResNetConfig(**_RESNET[size])
    module = ResNetModel(config)
    _perturb_vectors(module, std=0.1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    module.eval()
    image = 64 if size == "tiny" else 224
    x = torch.randn(2, 3, image, image)
    dyn = {"pixel_values": {0: torch.export.Dim("batch", max=64)}}
    return Exportable(f"resnet-{size}", module, (), {"pixel_values": x}, dyn, _image_feeds(image), config)


#: Every kind ``build`` knows.
KINDS = ("bert", "gpt2", "gpt2-lm", "llama", "vit", "resnet", "cnn")


def chain_model(nodes: int) -> Any:
    """``nodes`` nodes: (Add of a constant, Relu) repeated, on a [1, 16] float input: the long-graph
    stress case (nothing fuses; every per-node cost of the passes shows)."""
    from onnx import TensorProto, helper

    body, prev = [], "x"
    init = helper.make_tensor("c", TensorProto.FLOAT, [16], np.ones(16, np.float32).tolist())
    for i in range(nodes // 2):
        out = "y" if i == nodes // 2 - 1 else f"r{i}"
        body += [
            helper.make_node("Add", [prev, "c"], [f"a{i}"], name=f"add{i}"),
            helper.make_node("Relu", [f"a{i}"], [out], name=f"relu{i}"),
        ]
        prev = out
    graph = helper.make_graph(
        body,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [init],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def build(kind: str, size: str = "tiny", seed: int = 0) -> Exportable:
    """``kind`` is one of :data:`KINDS` ("cnn" has one size only)."""
    if kind == "bert":
        return build_bert(size, seed)
    if kind == "gpt2":
        return build_gpt2(size, seed=seed)
    if kind == "gpt2-lm":
        return build_gpt2(size, lm_head=True, seed=seed)
    if kind == "llama":
        return build_llama(size, seed)
    if kind == "vit":
        return build_vit(size, seed)
    if kind == "resnet":
        return build_resnet(size, seed)
    if kind == "cnn":
        return build_cnn(seed)
    raise ValueError(f"unknown model kind {kind!r}; use one of {', '.join(KINDS)}")


def build_yolo_detector(seed: int = 0, width: float = 0.25, depth: float = 0.33) -> Exportable:
    """A YOLOv8n-style detector (random weights, non-trivial batch-norm statistics), input
    ``images`` 1x3x320x320: Conv+BN+SiLU, C2f blocks (Split, bottlenecks with residual Add,
    Concat), SPPF (three MaxPools), an FPN/PAN neck (Upsample nearest, Concat), and a decoupled
    detect head (box branch through a DFL: Reshape, Softmax over 16 bins, 1x1 Conv) concatenated
    with the class scores (Sigmoid) into ``[1, 4 + classes, anchors]``. Static shapes, like the
    exported YOLO models users bring."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    def ch(c: int) -> int:
        return max(8, int(c * width) // 8 * 8)

    class ConvBN(nn.Module):
        def __init__(self, i: int, o: int, k: int = 1, s: int = 1) -> None:
            super().__init__()
            self.conv = nn.Conv2d(i, o, k, s, k // 2, bias=False)
            self.bn = nn.BatchNorm2d(o)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.silu(self.bn(self.conv(x)))

    class Bottleneck(nn.Module):
        def __init__(self, c: int, shortcut: bool) -> None:
            super().__init__()
            self.cv1, self.cv2, self.add = ConvBN(c, c, 3), ConvBN(c, c, 3), shortcut

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.cv2(self.cv1(x))
            return x + y if self.add else y

    class C2f(nn.Module):
        def __init__(self, i: int, o: int, n: int, shortcut: bool) -> None:
            super().__init__()
            self.c = o // 2
            self.cv1 = ConvBN(i, 2 * self.c)
            self.cv2 = ConvBN((2 + n) * self.c, o)
            self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = list(self.cv1(x).split((self.c, self.c), 1))
            for m in self.m:
                y.append(m(y[-1]))
            return self.cv2(torch.cat(y, 1))

    class SPPF(nn.Module):
        def __init__(self, i: int, o: int) -> None:
            super().__init__()
            self.cv1, self.cv2 = ConvBN(i, i // 2), ConvBN(i * 2, o)
            self.m = nn.MaxPool2d(5, 1, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.cv1(x)
            y1 = self.m(x)
            y2 = self.m(y1)
            return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))

    class Detector(nn.Module):
        def __init__(self, classes: int = 6, reg_max: int = 16) -> None:
            super().__init__()
            n = max(1, round(3 * depth))
            c1, c2, c3, c4, c5 = ch(64), ch(128), ch(256), ch(512), ch(1024)
            self.stem = nn.Sequential(ConvBN(3, c1, 3, 2), ConvBN(c1, c2, 3, 2), C2f(c2, c2, n, True))
            self.p3 = nn.Sequential(ConvBN(c2, c3, 3, 2), C2f(c3, c3, 2 * n, True))
            self.p4 = nn.Sequential(ConvBN(c3, c4, 3, 2), C2f(c4, c4, 2 * n, True))
            self.p5 = nn.Sequential(ConvBN(c4, c5, 3, 2), C2f(c5, c5, n, True), SPPF(c5, c5))
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.n4, self.n3 = C2f(c5 + c4, c4, n, False), C2f(c4 + c3, c3, n, False)
            self.d3, self.d4 = ConvBN(c3, c3, 3, 2), ConvBN(c4, c4, 3, 2)
            self.o4, self.o5 = C2f(c3 + c4, c4, n, False), C2f(c4 + c5, c5, n, False)
            box, cls = max(16, c3 // 4, reg_max * 4), max(c3, min(classes, 100))
            self.reg_max, self.classes = reg_max, classes
            self.box = nn.ModuleList(
                nn.Sequential(ConvBN(c, box, 3), ConvBN(box, box, 3), nn.Conv2d(box, 4 * reg_max, 1))
                for c in (c3, c4, c5)
            )
            self.cls = nn.ModuleList(
                nn.Sequential(ConvBN(c, cls, 3), ConvBN(cls, cls, 3), nn.Conv2d(cls, classes, 1))
                for c in (c3, c4, c5)
            )
            self.dfl = nn.Conv2d(reg_max, 1, 1, bias=False)
            with torch.no_grad():
                self.dfl.weight.copy_(torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p3 = self.p3(self.stem(x))
            p4 = self.p4(p3)
            p5 = self.p5(p4)
            n4 = self.n4(torch.cat((self.up(p5), p4), 1))
            n3 = self.n3(torch.cat((self.up(n4), p3), 1))
            o4 = self.o4(torch.cat((self.d3(n3), n4), 1))
            o5 = self.o5(torch.cat((self.d4(o4), p5), 1))
            outs = [torch.cat((b(f), c(f)), 1) for f, b, c in zip((n3, o4, o5), self.box, self.cls)]
            flat = torch.cat([o.flatten(2) for o in outs], 2)
            box, cls = flat.split((4 * self.reg_max, self.classes), 1)
            a = box.shape[-1]
            dist = self.dfl(box.view(1, 4, self.reg_max, a).transpose(2, 1).softmax(1)).view(1, 4, a)
            return torch.cat((dist, cls.sigmoid()), 1)

    module = Detector()
    _perturb_vectors(module, std=0.1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    module.eval()

    def feeds(batch: int = 1, size: int = 320, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {"images": rng.random((batch, 3, size, size), dtype=np.float32)}

    x = torch.rand(1, 3, 320, 320)
    return Exportable("yolo-detector", module, (x,), {}, None, feeds)
