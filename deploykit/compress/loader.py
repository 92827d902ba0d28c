"""The user's network: `MODULE:FUNCTION` (an importable function returning an `nn.Module`, optional checkpoint),
or a TorchScript / `torch.export` file; checked against the example shape before any work starts."""
from __future__ import annotations

import importlib
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import DeployKitError

_MODEL_HINT = "give MODULE:FUNCTION (an importable function returning an nn.Module) or a TorchScript / torch.export file"


@dataclass
class LoadedModel:
    module: nn.Module
    source: str
    kind: str  # "function" | "torchscript" | "export"
    program: object = None  # the torch.export.ExportedProgram of an "export" file (ONNX export goes through it)

    @property
    def restructurable(self) -> bool:
        """Whether layers can be removed or replaced (pruning, decomposition): needs the network's Python modules;
        TorchScript and torch.export files hold frozen code or flat aten graphs."""
        return self.kind == "function"


def parse_example_shape(text: str) -> tuple[int, int, int, int]:
    """`1,3,H,W` -> a batch-1 NCHW shape with a square image (the data loader resizes to squares)."""
    try:
        dims = tuple(int(v) for v in str(text).replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if len(dims) != 4 or any(d < 1 for d in dims) or dims[0] != 1 or dims[2] != dims[3]:
        raise DeployKitError(f"--example-shape must be 1,C,H,W with H == W (batch 1, square images), got {text!r}")
    return dims  # type: ignore[return-value]


def load_model(spec: str, *, checkpoint: str | os.PathLike | None = None) -> LoadedModel:
    """Import or read the network named by `spec` and put it in eval mode."""
    path = Path(spec)
    if path.suffix in (".pt", ".pth", ".pt2", ".ts", ".jit") or path.exists():
        if checkpoint is not None:
            raise DeployKitError("--checkpoint applies to MODULE:FUNCTION models only: a model file carries its weights")
        loaded = _load_file(path)
    elif ":" in spec:
        loaded = _load_function(spec, checkpoint)
    else:
        raise DeployKitError(f"model {spec!r} is neither a file nor MODULE:FUNCTION: {_MODEL_HINT}")
    if loaded.kind != "export":  # an exported program is already in the mode it was exported in (eval() is refused)
        loaded.module.eval()
    return loaded


def check_example_shape(model: nn.Module, shape: tuple[int, ...], source: str) -> torch.Tensor:
    """Run the model once on a zero input of `shape`; a failure is the user's shape (or model), said in one line."""
    x = torch.zeros(shape)
    try:
        with torch.no_grad():
            y = model(x)
    except Exception as e:  # any error of the user's forward: the shape does not fit the network
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DeployKitError(f"{source} does not run on an input of shape {','.join(map(str, shape))} ({first[:160]}): "
                             "pass the --example-shape the network was built for") from None
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        raise DeployKitError(f"{source} returns {type(y).__name__ if not isinstance(y, torch.Tensor) else tuple(y.shape)}"
                             " on the example input; compression needs a classifier returning one [1, classes] tensor")
    return x


def _load_function(spec: str, checkpoint) -> LoadedModel:
    module_name, _, fn_name = spec.partition(":")
    if not module_name or not fn_name:
        raise DeployKitError(f"model {spec!r} is not MODULE:FUNCTION: {_MODEL_HINT}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a user's module in the working directory, as `python -m` would find it
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or any error raised while the user's module runs
        raise DeployKitError(f"cannot import {module_name!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
                             "check the module name and that it is on PYTHONPATH") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise DeployKitError(f"{module_name} has no function {fn_name!r}: {_MODEL_HINT}")
    try:
        net = fn()
    except Exception as e:  # the user's constructor failed
        raise DeployKitError(f"{spec}() raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}: "
                             "it must build the network without arguments") from None
    if not isinstance(net, nn.Module):
        raise DeployKitError(f"{spec}() returned {type(net).__name__}, not an nn.Module: make it return the network")
    if checkpoint is not None:
        _load_weights(net, Path(checkpoint))
    return LoadedModel(net, spec, "function")


def _load_weights(net: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise DeployKitError(f"checkpoint {path} not found: pass the state_dict file saved with torch.save")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or non-weights file
        raise DeployKitError(f"checkpoint {path} is not a weights file ({type(e).__name__}): save it with "
                             "torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise DeployKitError(f"checkpoint {path} does not fit the network ({str(e).splitlines()[0][:160]}): "
                             "pass the checkpoint of this architecture") from None


def _load_file(path: Path) -> LoadedModel:
    if not path.is_file():
        raise DeployKitError(f"model file {path} not found: {_MODEL_HINT}")
    if not zipfile.is_zipfile(path):
        raise DeployKitError(f"{path} is not a TorchScript or torch.export file (not a zip archive): save it with "
                             "torch.jit.save or torch.export.save")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    # torch.export archives hold serialized exported programs; TorchScript archives hold code/ and constants
    if any("serialized_exported_program" in n or n.endswith("models/model.json") for n in names):
        try:
            program = torch.export.load(str(path))
        except Exception as e:  # version mismatch, corrupt archive
            raise DeployKitError(f"cannot read torch.export file {path} ({type(e).__name__}): re-export it with this "
                                 f"torch ({torch.__version__})") from None
        return LoadedModel(program.module(), str(path), "export", program)
    try:
        net = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # a zip that is not TorchScript, or a corrupt one
        raise DeployKitError(f"cannot read {path} as TorchScript ({type(e).__name__}): save it with torch.jit.save, or "
                             "give MODULE:FUNCTION") from None
    return LoadedModel(net, str(path), "torchscript")
