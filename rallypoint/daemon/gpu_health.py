"""GPU health through NVML (``nvidia-ml-py``, imported as ``pynvml``), when it is installed.

A GPU is unhealthy, and its seat is not reused, when NVML reports:

* it is gone (``NVML_ERROR_GPU_IS_LOST``: fell off the bus) or cannot be queried at all;
* a critical Xid event (the driver's own list: ``nvmlEventTypeXidCriticalError``), e.g. 48
  (double-bit ECC), 63/64 (page retirement), 74 (NVLink), 79 (fell off the bus), 92/94/95
  (ECC, contained and uncontained), 119/120 (GSP);
* more volatile uncorrectable ECC errors than when rallyd started.

Without ``pynvml`` (CPU nodes, minimal images) every seat counts as healthy and rallyd says once
that it cannot check.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from rallypoint.log import get_logger

log = get_logger("gpu_health")

# Xids that mean the GPU must not be trusted with a rank again (NVIDIA's Xid catalogue).
FATAL_XIDS = frozenset({48, 61, 62, 63, 64, 68, 69, 74, 79, 92, 94, 95, 119, 120, 140})


def load_nvml() -> ModuleType | None:
    """``pynvml``, initialised, or None when it is missing or NVML does not start."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError and its many subclasses
        log.warning("gpu_health.nvml_unavailable", error=str(exc))
        return None
    return pynvml


class GpuHealth:
    """Polls NVML for the node's GPUs ``0 .. gpus-1``.

    Args:
        gpus: GPUs on the node (local rank = GPU index).
        nvml: the ``pynvml`` module (``load_nvml()``), or a stand-in with the same functions.
    """

    def __init__(self, gpus: int, nvml: Any) -> None:
        self.nvml = nvml
        self.gpus = gpus
        self.bad: dict[int, str] = {}
        self._ecc_base: dict[int, int] = {}
        self._events = None
        try:
            self._events = nvml.nvmlEventSetCreate()
        except Exception as exc:
            log.warning("gpu_health.no_event_set", error=str(exc))
        for i in range(gpus):
            try:
                h = nvml.nvmlDeviceGetHandleByIndex(i)
                self._ecc_base[i] = self._ecc(h)
                if self._events is not None:
                    nvml.nvmlDeviceRegisterEvents(h, nvml.nvmlEventTypeXidCriticalError, self._events)
            except Exception as exc:  # a GPU without ECC or event support is not unhealthy
                log.info("gpu_health.partial_support", gpu=i, error=str(exc))

    def _ecc(self, handle: Any) -> int:
        n = self.nvml
        try:
            return int(n.nvmlDeviceGetTotalEccErrors(handle, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_VOLATILE_ECC))
        except Exception:
            return 0

    def check(self) -> dict[int, str]:
        """New problems since the last call: ``{gpu index: what is wrong}`` (they stay in ``bad``)."""
        found: dict[int, str] = {}
        n = self.nvml
        for i in range(self.gpus):
            if i in self.bad:
                continue
            try:
                h = n.nvmlDeviceGetHandleByIndex(i)
                n.nvmlDeviceGetUtilizationRates(h)  # any live query: a lost GPU fails it
            except Exception as exc:
                lost = getattr(n, "NVML_ERROR_GPU_IS_LOST", None)
                found[i] = ("fell off the bus (NVML_ERROR_GPU_IS_LOST)" if getattr(exc, "value", None) == lost
                            else f"NVML cannot query it: {exc}")
                continue
            ecc = self._ecc(h)
            if ecc > self._ecc_base.get(i, 0):
                found[i] = f"{ecc - self._ecc_base.get(i, 0)} new uncorrectable ECC error(s)"
        for gpu, xid in self._xids():
            if gpu not in self.bad and xid in FATAL_XIDS:
                found.setdefault(gpu, f"Xid {xid}")
        self.bad.update(found)
        for gpu, why in found.items():
            log.error("gpu_health.gpu_unhealthy", gpu=gpu, why=why)
        return found

    def _xids(self) -> list[tuple[int, int]]:
        if self._events is None:
            return []
        n = self.nvml
        out: list[tuple[int, int]] = []
        while True:
            try:
                data = n.nvmlEventSetWait(self._events, 0)
            except Exception:  # NVML_ERROR_TIMEOUT: no event pending
                return out
            try:
                gpu = int(n.nvmlDeviceGetIndex(data.device))
            except Exception:
                gpu = -1
            out.append((gpu, int(data.eventData)))
