"""GPU health classification over a stand-in for pynvml (NVML itself needs a GPU)."""

from __future__ import annotations

from types import SimpleNamespace

from rallypoint.daemon.gpu_health import GpuHealth


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class FakeNvml:
    """The pynvml calls GpuHealth makes, with faults to inject."""

    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_ERROR_TIMEOUT = 10
    nvmlEventTypeXidCriticalError = 8

    def __init__(self, gpus: int) -> None:
        self.ecc = [0] * gpus
        self.lost: set[int] = set()
        self.xids: list[tuple[int, int]] = []

    def nvmlEventSetCreate(self):
        return "set"

    def nvmlDeviceGetHandleByIndex(self, i: int):
        if i in self.lost:
            raise NVMLError(self.NVML_ERROR_GPU_IS_LOST)
        return i

    def nvmlDeviceRegisterEvents(self, h, kinds, s) -> None:
        pass

    def nvmlDeviceGetTotalEccErrors(self, h, kind, counter) -> int:
        return self.ecc[h]

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=0, memory=0)

    def nvmlEventSetWait(self, s, timeout_ms: int):
        if not self.xids:
            raise NVMLError(self.NVML_ERROR_TIMEOUT)
        gpu, xid = self.xids.pop(0)
        return SimpleNamespace(device=gpu, eventData=xid)

    def nvmlDeviceGetIndex(self, h) -> int:
        return h


def test_healthy_gpus_report_nothing() -> None:
    nvml = FakeNvml(4)
    h = GpuHealth(4, nvml)
    assert h.check() == {} and h.bad == {}


def test_xid_ecc_and_lost_gpus_are_reported_once() -> None:
    nvml = FakeNvml(4)
    h = GpuHealth(4, nvml)
    nvml.xids = [(1, 79), (2, 13)]  # 13 (a graphics engine exception) is an app fault, not the GPU's
    nvml.ecc[3] = 2
    nvml.lost.add(0)
    found = h.check()
    assert set(found) == {0, 1, 3}
    assert "fell off the bus" in found[0] and found[1] == "Xid 79" and "2 new uncorrectable ECC" in found[3]
    assert h.check() == {}  # reported once; they stay in h.bad
    assert set(h.bad) == {0, 1, 3}
