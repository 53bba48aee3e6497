"""The checkpoint's model as TorchScript and ONNX, each checked against the model it came from.

The trace runs at one size and is compared at others (one not a multiple of 32, in a batch of
two): every resize in the models follows the input's size, so a file that passes runs at any
size.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segtune.config.trial import TrialConfig, trial_config
from segtune.deploy.bundle import JIT_DEPRECATION, Forward
from segtune.errors import ConfigError, ModelError
from segtune.models import build_model, example_input

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
TRACE_HW = (96, 128)
# checked against the checkpoint's model: other sizes than the traced one, one of them not
# a multiple of 32, in a batch of two
VERIFY_HW = ((64, 96), (96, 128), (70, 90))
VERIFY_BATCH = 2
TOLERANCE = 1e-4


def checkpoint_model(ckpt: dict[str, Any]) -> tuple[nn.Module, TrialConfig]:
    """The network of a loaded best.pt in eval mode; its config with `pretrained: none`, since
    the checkpoint holds every weight (an ImageNet file need not exist here)."""
    cfg = trial_config({**ckpt["config"], "pretrained": "none"})
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ModelError(f"best.pt does not fit model {cfg.label()}: {exc}") from None
    return model.eval(), cfg


@dataclass(frozen=True)
class Reference:
    """The checkpoint model's logits on random inputs, computed once for every format's check."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]

    @classmethod
    @torch.inference_mode()
    def of(cls, model: nn.Module, sizes: Sequence[Sequence[int]] = VERIFY_HW) -> Reference:
        inputs = [example_input(hw, VERIFY_BATCH, seed=i + 1) for i, hw in enumerate(sizes)]
        return cls(inputs, [model(x) for x in inputs])

    @torch.inference_mode()
    def max_abs_diff(self, candidate: Forward) -> float:
        """The largest |logit difference| of `candidate` over the reference inputs."""
        worst = 0.0
        for x, expected in zip(self.inputs, self.outputs, strict=True):
            got = candidate(x)
            if got.shape != expected.shape:
                raise ModelError(
                    f"exported model gave shape {tuple(got.shape)} for input {tuple(x.shape)}, "
                    f"expected {tuple(expected.shape)}"
                )
            worst = max(worst, float((got - expected).abs().max()))
        return worst


def _check(diff: float, what: str) -> None:
    if not diff <= TOLERANCE:
        raise ModelError(
            f"{what} differs from the checkpoint's model by {diff:.3g} (tolerance {TOLERANCE}) "
            f"on inputs of {', '.join(f'{h}x{w}' for h, w in VERIFY_HW)}; "
            "use --format to skip this format and report the model"
        )


def export_torchscript(
    model: nn.Module, path: Path, reference: Reference
) -> tuple[torch.jit.ScriptModule, float]:
    """Trace, save, reload, and compare the reloaded file with `model` at other sizes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=JIT_DEPRECATION)
        traced = torch.jit.trace(model, example_input(TRACE_HW), check_trace=False)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path)).eval()
    diff = reference.max_abs_diff(loaded)
    _check(diff, path.name)
    return loaded, diff


def onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "ONNX export needs onnx, onnxruntime and onnxscript: pip install 'segtune[export]', "
            "or pass --format torchscript"
        ) from None
    return onnx, onnxruntime


def _onnx_export(model: nn.Module, path: Path) -> str:
    """torch.export-based exporter with dynamic shapes; the TorchScript-based one if it fails."""
    example = (example_input(TRACE_HW),)
    names = {"input_names": ["image"], "output_names": ["logits"]}
    dims = {
        0: torch.export.Dim("batch", min=1, max=1024),
        2: torch.export.Dim("height", min=32, max=16384),
        3: torch.export.Dim("width", min=32, max=16384),
    }
    try:
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=True,
            dynamic_shapes=(dims,),
            external_data=False,
            verbose=False,
            **names,
        )
        return "dynamo"
    except Exception as exc:  # the exporter fails in many ways; the fallback covers them all
        log.warning(
            "the torch.export-based ONNX exporter failed (%s: %s); using the TorchScript-based one",
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=False,
            dynamic_axes={"image": axes, "logits": axes},
            **names,
        )
    return "torchscript"


def export_onnx(model: nn.Module, path: Path, reference: Reference) -> tuple[dict[str, Any], float]:
    """Export, check the graph, and compare onnxruntime's output with `model`."""
    onnx, onnxruntime = onnx_modules()
    exporter = _onnx_export(model, path)
    onnx.checker.check_model(str(path))
    opset = next(
        (o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")), None
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    diff = reference.max_abs_diff(forward)
    _check(diff, path.name)
    return {"exporter": exporter, "opset": opset, "onnxruntime": onnxruntime.__version__}, diff
