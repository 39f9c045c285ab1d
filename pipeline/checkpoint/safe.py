"""Loading checkpoint files without running code from them.

`torch.load(weights_only=False)` unpickles arbitrary objects: a planted `__reduce__` in a checkpoint file runs
as the user who opens it. Every reader of this project (the trainer's resume, through `SafeCheckpointEngine`;
`to-hf`, `generate`, `reshape`, weights-only starts, through `load_file`) loads with `weights_only=True` and an
explicit allow-list: the few plain-data classes DeepSpeed itself pickles into its optimizer files, and numpy's
array reconstruction (RNG files written before RNG state was stored as tensors). Anything else is refused.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys

import torch

# What each allowed global is, for the record: DeepSpeed's optimizer states hold the ZeRO stage (an int enum),
# the loss scaler's settings (plain attributes, no code runs on unpickling) and, for ZeRO-1/2, the fragment
# addresses of each parameter (a pair of ints).
DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)
# RNG files before they held tensors only: numpy's MT19937 key array.
NUMPY_NAMES = ("numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct",
               "numpy._core.multiarray._reconstruct")
# Checkpoints from before the LR schedule became plain data pickled a LambdaLR whose callable held the run's
# `pipeline.config.TrainConfig` (a dataclass of numbers and strings; rebuilding it runs no code).
LEGACY_GLOBALS = (("pipeline.config", "TrainConfig"),)


def _numpy_globals() -> list:
    import numpy as np

    out = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.int64))]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        with contextlib.suppress(ImportError, AttributeError):
            m = __import__(mod, fromlist=["_reconstruct"])
            # the same function under the name this numpy pickles it with
            out.append((m._reconstruct, f"{mod}._reconstruct"))
    return out


def allowed_globals() -> list:
    """The allow-list handed to `torch.serialization.safe_globals`."""
    import importlib

    out = []
    with contextlib.redirect_stdout(sys.stderr):  # importing deepspeed logs to stdout
        for mod, name in DEEPSPEED_GLOBALS + LEGACY_GLOBALS:
            with contextlib.suppress(ImportError, AttributeError):
                out.append(getattr(importlib.import_module(mod), name))
    return out + _numpy_globals()


_ALLOWED: list | None = None


def load_file(path: str, map_location="cpu", mmap: bool = False):
    """`torch.load` with `weights_only=True` and the allow-list. An unreadable file or a refused global raises
    ValueError (one line naming the file); a missing file, FileNotFoundError."""
    global _ALLOWED
    if _ALLOWED is None:
        _ALLOWED = allowed_globals()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing checkpoint file")
    try:
        with torch.serialization.safe_globals(_ALLOWED):
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zips raise RuntimeError, refused globals UnpicklingError
        text = str(e)
        if text.startswith("Weights only load failed"):
            m = re.search(r"GLOBAL ([\w.]+)", text)
            bad = m.group(1) if m else "an object"
            raise ValueError(f"{path}: refused to load: it pickles {bad}, which is not a tensor or one of "
                             "DeepSpeed's plain-data types (a planted or foreign file? loading it could run "
                             "code)") from None
        first = text.splitlines()[0] if text else type(e).__name__
        raise ValueError(f"{path}: unreadable checkpoint file, truncated or corrupt ({first})") from None


def unsafe_globals(path: str) -> list[str]:
    """The globals a file needs beyond plain tensors and containers (torch's own listing)."""
    return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))


def project_globals(path: str) -> list[str]:
    """The globals of this project (`pipeline.*`) a file pickles: set only in checkpoints written before the LR
    schedule became plain data."""
    try:
        return [g for g in unsafe_globals(path) if g.startswith("pipeline.")]
    except Exception:  # noqa: BLE001 - an unreadable file: the loader reports it
        return []


def allowed_names() -> set[str]:
    """The allow-list as the dotted names `torch.serialization.get_unsafe_globals_in_checkpoint` reports."""
    return {f"{m}.{n}" for m, n in DEEPSPEED_GLOBALS + LEGACY_GLOBALS} | set(NUMPY_NAMES) | \
        {"numpy.dtypes.UInt32DType", "numpy.dtypes.Int64DType"}


def refuse_unsafe_files(folder: str) -> None:
    """ValueError (one line) when a `.pt` file under `folder` pickles a global outside the allow-list: call it
    before handing a checkpoint to a DeepSpeed tool that unpickles with weights_only=False (ds_to_universal)."""
    allowed = allowed_names()
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            if name.endswith(".pt"):
                path = os.path.join(root, name)
                try:
                    bad = [g for g in unsafe_globals(path) if g not in allowed]
                except Exception as e:  # noqa: BLE001 - not a torch zip file
                    raise ValueError(f"{path}: unreadable checkpoint file, truncated or corrupt ({e})") from None
                if bad:
                    raise ValueError(f"{path}: refused to load: it pickles {bad[0]}, which is not a tensor or one of "
                                     "DeepSpeed's plain-data types (a planted or foreign file? loading it could run "
                                     "code)")
