"""FlashAttention-4 (the ``flash-attn-4`` package, CuTe DSL kernels for Hopper and Blackwell)
behind torch's scaled-dot-product attention (train.attention_backend = fa4).

torch ships the dispatcher glue (``torch.nn.attention``'s FA4 registration): once activated,
SDPA's flash backend (``aten._scaled_dot_product_flash_attention`` and its backward) runs
FA4's kernels. The attention op stays the same aten op, so compiled blocks, the checkpoint
recompute and selective checkpointing (train.keep_attention_outputs) see what they saw with
FlashAttention-2. torch reads FA4 through a module exposing ``_flash_attn_fwd`` and
``_flash_attn_bwd``; this module is that module, over flash-attn-4's own interface: its
forward has returned 2, 4 or 5 values across releases, torch's glue unpacks 2, and keyword
arguments a release does not know (and that are unset) are left out.
"""

from __future__ import annotations

import importlib
import inspect
from functools import cache
from typing import Any

from cogvx.errors import CogvxError

FA4_INTERFACE = "flash_attn.cute.interface"
FA4_CAPABILITY_MAJORS = (9, 10)  # torch's glue accepts Hopper (sm_90) and Blackwell (sm_100)
INSTALL_HINT = "pip install flash-attn-4 (a CUDA 12 or 13 GPU machine; it JIT-compiles its kernels on first use)"


@cache
def _interface():
    """flash-attn-4's interface module; a missing package and a broken install (one of its own
    dependencies failing to import or to load) get different messages."""
    try:
        return importlib.import_module(FA4_INTERFACE)
    except (ImportError, RuntimeError, OSError) as exc:
        failed = (getattr(exc, "name", None) or "").split(".")[0]  # the package an ImportError could not find
        if failed == "flash_attn":
            raise CogvxError(f"train.attention_backend = fa4 needs FlashAttention-4: {INSTALL_HINT} ({exc})") from exc
        raise CogvxError(_broken_install(exc, failed)) from exc


def _broken_install(exc: BaseException, failed: str) -> str:
    """The message for an installed flash-attn-4 that fails to load, with the fix where one is known."""
    hint = ""
    if failed == "cutlass":
        hint = ("; nvidia-cutlass-dsl puts its cutlass package on the path through a .pth file, which Python reads "
                "only in site-packages: after pip install --target DIR, add DIR/nvidia_cutlass_dsl/dsl_packages "
                "to PYTHONPATH")
    return (f"train.attention_backend = fa4: flash-attn-4 is installed but cannot be loaded: "
            f"{type(exc).__name__}: {exc}{hint}. Reinstall it (pip install flash-attn-4) or pick cudnn / flash")


def _known_kwargs(function, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments ``function`` accepts; an unknown one must be unset (None)."""
    accepted = inspect.signature(function).parameters
    unknown = {key: value for key, value in kwargs.items() if key not in accepted and value is not None}
    if unknown:
        raise CogvxError(f"this flash-attn-4 release does not take {', '.join(sorted(unknown))}; "
                         "install a release that matches your torch")
    return {key: value for key, value in kwargs.items() if key in accepted}


def _flash_attn_fwd(q, k, v, **kwargs):
    """FA4's forward as torch's glue calls it: (out, logsumexp)."""
    function = _interface()._flash_attn_fwd
    result = function(q, k, v, **_known_kwargs(function, kwargs))
    return result[0], result[1]


def _flash_attn_bwd(q, k, v, out, dout, lse, **kwargs):
    """FA4's backward as torch's glue calls it: (dq, dk, dv)."""
    function = _interface()._flash_attn_bwd
    result = function(q, k, v, out, dout, lse, **_known_kwargs(function, kwargs))
    return result[0], result[1], result[2]


def check_fa4_device(device) -> None:
    """FA4 runs on Hopper or Blackwell GPUs only: a clear refusal elsewhere."""
    import torch

    if device.type != "cuda":
        raise CogvxError("train.attention_backend = fa4 needs a CUDA GPU (Hopper or Blackwell); "
                         "use auto, flash or math on a CPU")
    major = torch.cuda.get_device_capability(device)[0]
    if major not in FA4_CAPABILITY_MAJORS:
        raise CogvxError(f"train.attention_backend = fa4 runs on Hopper (sm_90) or Blackwell (sm_100) GPUs; "
                         f"this GPU is sm_{major}x: use cudnn or flash")


def activate_fa4(device) -> None:
    """Route SDPA's flash backend to FlashAttention-4 in this process (process-wide, as
    torch's registry is)."""
    check_fa4_device(device)
    _interface()
    from torch.nn import attention

    if not hasattr(attention, "activate_flash_attention_impl"):
        raise CogvxError("train.attention_backend = fa4 needs torch >= 2.10 (torch.nn.attention's FA4 registration)")
    from torch.nn.attention import _fa4

    if attention.current_flash_attention_impl() != "FA4":
        attention.register_flash_attention_impl(
            "FA4", register_fn=lambda: _fa4.register_flash_attention_fa4(module_path=__name__))
        attention.activate_flash_attention_impl("FA4")


def deactivate_fa4() -> None:
    """Give SDPA's flash backend back to torch's own FlashAttention-2 (a no-op when FA4 is not active)."""
    from torch.nn import attention

    if getattr(attention, "current_flash_attention_impl", lambda: None)() is not None:
        attention.restore_flash_attention_impl()
