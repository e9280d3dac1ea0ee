"""The Backend interface: a target profile (providers, default pipeline, lowering choices, settings).

A backend chooses passes and their options; it never implements a rewrite itself.
Backends are built from phase functions, the same shape for every target (TVM's
``relax/backend/<target>/pipeline.py``): ``cleanup_passes``, ``prune_passes``, ``fusion_passes``,
``quantize_passes``, ``precision_passes``, ``finalize_passes``, each returning pass specs;
``default_pipeline`` strings them together into pipeline text. What a target supports is data on
the class (``unsupported_quantize``, ``qdq_placement``, ``unsupported_ops``), handed to the passes
as options. After lowering, :meth:`Backend.check` lists what the target cannot run, and
:meth:`Backend.settings` describes how to run the model (providers, their options, session
options, shapes): ``graphopt.save`` writes it beside the model as ``NAME.settings.json`` and
:func:`load_session` turns model + settings back into an ``onnxruntime.InferenceSession``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, ClassVar

import onnx_ir as ir

from graphopt.errors import GraphoptError, PipelineError, UnsupportedModelError
from graphopt.passes.ir_helpers import STANDARD_DOMAINS as _STANDARD_DOMAINS
from graphopt.passes.ir_helpers import all_nodes
from graphopt.spec import PassSpec, Step, format_text, parse_text

__all__ = [
    "Backend",
    "LoweringError",
    "SETTINGS_FORMAT",
    "load_session",
    "load_settings",
    "session_from_settings",
    "settings_path",
]

logger = logging.getLogger("graphopt.backends")

#: Version tag of the settings file format (``"format"`` key).
SETTINGS_FORMAT = "graphopt.settings/1"
#: Model metadata key holding JSON backend options (``Backend.from_model`` reads it).
OPTIONS_KEY = "graphopt.target_options"


class LoweringError(UnsupportedModelError):
    """The model holds ops its target cannot run (e.g. a com.microsoft op for TensorRT)."""


@dataclasses.dataclass
class NoBackendOptions:
    """A target without options."""


class Backend:
    """Base of every target. Subclasses set ``name`` and ``providers`` and override phases."""

    name: ClassVar[str] = ""
    providers: ClassVar[tuple[str, ...]] = ("CPUExecutionProvider",)
    #: True when the target can run com.microsoft contrib ops (ONNX Runtime CPU/CUDA).
    allows_contrib_ops: ClassVar[bool] = False
    #: (domain, op_type) → why the target cannot run it; :meth:`check` reports them.
    unsupported_ops: ClassVar[dict[tuple[str, str], str]] = {}
    #: (domain, op_type) → why the target runs it on the CPU instead (works, but slowly).
    fallback_ops: ClassVar[dict[tuple[str, str], str]] = {}
    #: Typed target options (a dataclass, like a pass's ``Options``).
    Options: ClassVar[type] = NoBackendOptions
    #: The quantization modes the target runs (None: every installed mode but ``unsupported_quantize``).
    supported_quantize: ClassVar[tuple[str, ...] | None] = None
    #: Quantization mode → why the target cannot run it and what to use instead.
    unsupported_quantize: ClassVar[dict[str, str]] = {}
    #: quantize-static's Q/DQ placement rules for this target (None: the pass's default, ONNX
    #: Runtime CPU's integer kernels).
    qdq_placement: ClassVar[str | None] = None

    def __init__(self, **options: Any) -> None:
        from graphopt.registry import coerce_options

        self.options = self.Options(**coerce_options(f"target {self.name}", self.Options, options))
        self.validate_options()

    def validate_options(self) -> None:
        """Raise PipelineError for option combinations the target cannot honour."""

    @classmethod
    def from_model(cls, model: ir.Model) -> Backend:
        """The backend with the options recorded in the model's metadata (``graphopt.target_options``)."""
        text = model.metadata_props.get(OPTIONS_KEY)
        if not text:
            return cls()
        try:
            options = json.loads(text)
        except ValueError:
            raise PipelineError(f"model metadata '{OPTIONS_KEY}' is not JSON; fix or remove it") from None
        if not isinstance(options, dict):
            raise PipelineError(f"model metadata '{OPTIONS_KEY}' must be a JSON object of target options")
        return cls(**options)

    # --- pipeline phases -----------------------------------------------------------------------
    def cleanup_passes(self, level: int) -> list[Step]:
        return [PassSpec("cleanup")] if level > 0 else []

    def prune_passes(self, level: int, options: dict[str, Any] | None) -> list[Step]:
        """Pruning runs on the cleaned, unfused graph, where its units (channels, FFN neurons,
        heads) are plain Conv/MatMul/Gemm weights that the later fusions and quantization keep."""
        return [PassSpec("prune", dict(options))] if options else []

    def fusion_domains(self, quantize: dict[str, Any] | None) -> list[str]:
        """Op domains the fusions may emit before quantization.

        Static (QDQ) quantization needs the standard ops it places Q/DQ around: contrib fusions
        such as FusedConv would hide Conv from ONNX Runtime's QDQ kernels, so they are left out.
        """
        if not self.allows_contrib_ops or (quantize and quantize.get("mode") == "static"):
            return ["standard"]
        return ["standard", "contrib"]

    def fusion_passes(self, level: int, quantize: dict[str, Any] | None = None) -> list[Step]:
        """The fusion rule sets in dependency order (one list, shared with the ``fuse`` pass);
        com.microsoft contrib fusions only for targets that run them."""
        if level < 2:
            return []
        from graphopt.passes.fusion.composite import fusion_steps

        return list(parse_text(",".join(fusion_steps(self.fusion_domains(quantize)))))

    def quantize_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The target's lowering choices for a quantization request (user options win): a mode the
        target cannot run is refused with the reason; static Q/DQ gets the target's placement."""
        mode = options.get("mode")
        if mode in self.unsupported_quantize:
            raise PipelineError(self.unsupported_quantize[mode])
        if self.supported_quantize is not None and mode not in self.supported_quantize:
            raise PipelineError(
                f"{self.name}: quantize={mode} is not supported; use quantize="
                + " or ".join(self.supported_quantize)
            )
        opts = dict(options)
        if mode == "static" and self.qdq_placement is not None:
            opts.setdefault("placement", self.qdq_placement)
        return opts

    def quantize_passes(self, level: int, options: dict[str, Any] | None) -> list[Step]:
        return [PassSpec("quantize", self.quantize_options(options))] if options else []

    def precision_passes(self, level: int, quantize: dict[str, Any] | None = None) -> list[Step]:
        """Reduced-precision conversion (fp16/bf16) after quantization; none by default."""
        return []

    def finalize_passes(self, level: int) -> list[Step]:
        # Fusions leave dead shape arithmetic and duplicate constants behind.
        return [PassSpec("cleanup")] if level >= 2 else []

    def default_pipeline(
        self, level: int = 2, *, quantize: dict[str, Any] | None = None, prune: dict[str, Any] | None = None
    ) -> str:
        """Pipeline text for an optimization level (0: nothing, 1: cleanup, 2+: everything), with
        pruning and quantization when asked (they run at any level: the user asked for them)."""
        steps = [
            *self.cleanup_passes(level),
            *self.prune_passes(level, prune),
            *self.fusion_passes(level, quantize),
            *self.quantize_passes(level, quantize),
            *self.precision_passes(level, quantize),
        ]
        final = self.finalize_passes(level)
        if not final and (quantize or prune) and level > 0:
            final = [PassSpec("cleanup")]
        return format_text([*steps, *final])

    # --- lowering checks -----------------------------------------------------------------------
    def check(self, model: ir.Model) -> list[str]:
        """What the target cannot run in ``model``, one line per (domain, op) with its node count."""
        found: dict[tuple[str, str], int] = {}
        for node in all_nodes(model):
            domain = "" if node.domain in _STANDARD_DOMAINS else node.domain
            key = (domain, node.op_type)
            foreign = bool(domain) and not self.allows_contrib_ops and not _is_local_function(model, node)
            if key in self.unsupported_ops or foreign:
                found[key] = found.get(key, 0) + 1
        problems = []
        for (domain, op), n in sorted(found.items()):
            why = self.unsupported_ops.get((domain, op)) or f"{self.name} runs standard ONNX ops only"
            problems.append(f"{domain + '::' if domain else ''}{op} ×{n}: {why}")
        return problems

    def check_model(self, model: ir.Model) -> None:
        """Raise :class:`LoweringError` when ``model`` holds ops the target cannot run."""
        problems = self.check(model)
        if problems:
            raise LoweringError(
                f"the model cannot run on {self.name}: {'; '.join(problems)}. Change the pipeline so that it "
                f"emits only what {self.name} runs (e.g. fuse(domains=[standard]) for standard-op targets)"
            )

    # --- running -------------------------------------------------------------------------------
    def provider_options(
        self, model: ir.Model | None = None, model_path: str | os.PathLike | None = None
    ) -> list[dict[str, Any]]:
        return [{} for _ in self.providers]

    def session_options(self, model: ir.Model | None = None) -> dict[str, Any]:
        """``onnxruntime.SessionOptions`` attributes (JSON values; enums by name)."""
        return {}

    def session_config(self, model: ir.Model | None = None) -> dict[str, str]:
        """``SessionOptions.add_session_config_entry`` pairs."""
        return {}

    def settings(self, model: ir.Model, model_path: str | os.PathLike | None = None) -> dict[str, Any]:
        """How to run ``model`` on this target: the document ``graphopt.save`` writes beside it.

        Raises :class:`LoweringError` when the model holds ops the target cannot run, so a model
        that cannot be deployed is never saved as if it could.
        """
        self.check_model(model)
        return {
            "format": SETTINGS_FORMAT,
            "target": self.name,
            "model": os.path.basename(os.fspath(model_path)) if model_path else None,
            "providers": [[p, o] for p, o in zip(self.providers, self.provider_options(model, model_path))],
            "session_options": self.session_options(model),
            "session_config": self.session_config(model),
            "io": io_description(model),
            **self.extra_settings(model, model_path),
            "notes": self.notes(model),
        }

    def notes(self, model: ir.Model) -> list[str]:
        """Things a deployer should know: ops that fall back to the CPU (also logged)."""
        found: dict[tuple[str, str], int] = {}
        for node in all_nodes(model):
            key = ("" if node.domain in _STANDARD_DOMAINS else node.domain, node.op_type)
            if key in self.fallback_ops:
                found[key] = found.get(key, 0) + 1
        notes = []
        for (domain, op), n in sorted(found.items()):
            notes.append(
                f"{domain + '::' if domain else ''}{op} ×{n} runs on the CPU: {self.fallback_ops[(domain, op)]}"
            )
        for line in notes:
            logger.warning("target %s: %s", self.name, line)
        return notes

    def extra_settings(self, model: ir.Model, model_path: str | os.PathLike | None = None) -> dict[str, Any]:
        """Target-specific sections of the settings document."""
        return {}

    def session(self, model: ir.Model) -> Any:
        """An onnxruntime.InferenceSession configured for this target (CPU fallback, with a warning)."""
        from graphopt.ir import to_bytes

        return session_from_settings(to_bytes(model), self.settings(model), base_dir=None)


# ---------------------------------------------------------------------------------------------
# Settings files


def settings_path(model_path: str | os.PathLike) -> str:
    """``model.onnx`` → ``model.settings.json`` (beside the model)."""
    root, _ = os.path.splitext(os.fspath(model_path))
    return root + ".settings.json"


def io_description(model: ir.Model) -> dict[str, list[dict[str, Any]]]:
    """Graph inputs/outputs with dtype and shape (symbolic dims by name): what IO binding needs."""

    def describe(v: ir.Value) -> dict[str, Any]:
        dims: list[Any] = []
        if v.shape is not None:
            for d in v.shape:
                dims.append(d if isinstance(d, int) else (d.value if d.value is not None else None))
        return {
            "name": v.name,
            "dtype": v.dtype.name.lower() if v.dtype is not None else None,
            "shape": dims if v.shape is not None else None,
        }

    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    return {"inputs": [describe(v) for v in inputs], "outputs": [describe(v) for v in model.graph.outputs]}


def _session_options(settings: dict[str, Any]) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    enums = {
        "graph_optimization_level": ort.GraphOptimizationLevel,
        "execution_mode": ort.ExecutionMode,
    }
    for key, value in (settings.get("session_options") or {}).items():
        if not hasattr(so, key):
            raise GraphoptError(f"settings: unknown session option '{key}'; remove it from the settings file")
        if key in enums and isinstance(value, str):
            try:
                value = getattr(enums[key], value)
            except AttributeError:
                choices = [n for n in dir(enums[key]) if n.isupper()]
                raise GraphoptError(
                    f"settings: session option {key}={value!r} is not one of {choices}"
                ) from None
        setattr(so, key, value)
    for key, value in (settings.get("session_config") or {}).items():
        so.add_session_config_entry(str(key), str(value))
    return so


def session_from_settings(
    model: bytes | str | os.PathLike, settings: dict[str, Any], *, base_dir: str | os.PathLike | None = None
) -> Any:
    """An InferenceSession for ``model`` (bytes or path) configured by a settings document.

    Providers this onnxruntime build lacks are dropped with a logged warning; when none is left,
    the session runs on ``CPUExecutionProvider``. Relative cache paths in provider options
    (``trt_engine_cache_path``, ``trt_timing_cache_path``) resolve against ``base_dir``.
    """
    import onnxruntime as ort

    if settings.get("format") != SETTINGS_FORMAT:
        raise GraphoptError(
            f"settings: format {settings.get('format')!r} is not {SETTINGS_FORMAT!r}; "
            "write the settings with this graphopt version (graphopt.save)"
        )
    wanted = [(str(p), dict(o or {})) for p, o in settings.get("providers") or []]
    if not wanted:
        raise GraphoptError('settings: no providers listed; add e.g. ["CPUExecutionProvider", {}]')
    available = set(ort.get_available_providers())
    missing = [p for p, _ in wanted if p not in available]
    providers = [(p, _resolve_paths(o, base_dir)) for p, o in wanted if p in available]
    if missing:
        target = settings.get("target", "?")
        if not providers:
            providers = [("CPUExecutionProvider", {})]
        logger.warning(
            "target %s: %s not available in this onnxruntime build (available: %s); running on %s. "
            "Install the matching onnxruntime package (onnxruntime-gpu for CUDA/TensorRT) for the target's speed",
            target,
            ", ".join(missing),
            ", ".join(sorted(available)),
            ", ".join(p for p, _ in providers),
        )
    so = _session_options(settings)
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model
    return ort.InferenceSession(source, so, providers=providers)


def _resolve_paths(options: dict[str, Any], base_dir: str | os.PathLike | None) -> dict[str, Any]:
    out = dict(options)
    for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
        value = out.get(key)
        if isinstance(value, str) and value:
            if not os.path.isabs(value):
                value = os.path.join(os.fspath(base_dir) if base_dir is not None else os.getcwd(), value)
            os.makedirs(value, exist_ok=True)
            out[key] = value
    return out


def load_settings(path: str | os.PathLike) -> dict[str, Any]:
    """Read a settings file; a clear error when it is missing or not JSON."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise GraphoptError(
            f"{path}: settings file not found; save the model with graphopt.save "
            "after graphopt.optimize(target=...)"
        ) from None
    except ValueError as e:
        raise GraphoptError(f"{path}: settings file is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise GraphoptError(f"{path}: settings file must hold a JSON object")
    return data


def load_session(
    model_path: str | os.PathLike, settings: str | os.PathLike | dict[str, Any] | None = None
) -> Any:
    """Deploy: an InferenceSession for a saved model, configured by the settings file beside it.

    ``settings`` defaults to ``settings_path(model_path)``; a dict is used as is. Missing providers
    fall back to CPU with a logged warning (see :func:`session_from_settings`).
    """
    model_path = os.fspath(model_path)
    if not os.path.exists(model_path):
        raise GraphoptError(f"{model_path}: no such model file; check the path")
    doc = settings if isinstance(settings, dict) else load_settings(settings or settings_path(model_path))
    folder = os.path.dirname(
        os.path.abspath(settings if isinstance(settings, (str, os.PathLike)) else model_path)
    )
    return session_from_settings(model_path, doc, base_dir=folder)


# ---------------------------------------------------------------------------------------------
# helpers


def _is_local_function(model: ir.Model, node: ir.Node) -> bool:
    return (node.domain, node.op_type, node.overload) in model.functions
