"""The device a bench runs on: which one, its name and bf16 peak, synchronisation, and the peak memory of a
block of work."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

from vtrain.config import ConfigError

# Dense bf16 tensor-core peaks (vendor datasheets), for the model FLOP utilisation. Matched in order
# against torch.cuda.get_device_name(): the PCIe H100 before the generic H100 (SXM).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench.device=cuda but no CUDA device is visible: use bench.device=cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"bench.device={name!r} is not a device: use auto, cpu or cuda")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def peak_bf16_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

class PeakMemory:
    """Transient peak of the bytes a block allocates.

    CUDA: the caching allocator's statistics. CPU (Linux, glibc): the growth of the peak resident set, with
    ``/proc/self/clear_refs`` resetting the high-water mark. glibc keeps freed heap memory resident and, after
    the first large free, serves even big tensors from that heap, so a warm step would show no growth: the
    heap's free pages are first given back (``malloc_trim``), and for the measured block the mmap threshold is
    pinned low, every tensor above 256 KiB gets pages of its own, and they count. Elsewhere (or if any of this
    fails) the CPU figure is None. A page fault per 4 KiB touched makes a block slower under this measurement:
    time other blocks (:class:`PeakMemory` leaves glibc's thresholds where a training loop's settle).
    """

    _M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)

    def __init__(self, device: torch.device):
        self.device, self.transient, self._start = device, None, None

    @staticmethod
    def _status_kb(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise OSError(key)

    @classmethod
    def _mallopt(cls, *settings: tuple[int, int], trim: bool = False) -> bool:
        """glibc's ``mallopt(parameter, value)`` for each setting, after ``malloc_trim(0)`` (the heap's free pages
        given back) if ``trim``; False where there is no glibc."""
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            if trim:
                libc.malloc_trim(0)
            return all(libc.mallopt(parameter, value) for parameter, value in settings)
        except (OSError, AttributeError):
            return False

    def __enter__(self) -> "PeakMemory":
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif self._mallopt((self._M_MMAP_THRESHOLD, 256 * 1024), trim=True):
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self._start = self._status_kb("VmRSS") * 1024
            except OSError:
                self._start = None
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            self.transient = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        if self._start is not None:
            self.transient = max(self._status_kb("VmHWM") * 1024 - self._start, 0)
        # where glibc's dynamic thresholds end in a training loop (a freed 32 MiB tensor raises the mmap threshold to
        # its ceiling, the trim threshold to twice it); a fixed mmap threshold alone would leave the trim threshold at
        # 128 KiB, giving back and faulting in the heap's top at every step
        self._mallopt((self._M_MMAP_THRESHOLD, 32 * 2**20), (self._M_TRIM_THRESHOLD, 64 * 2**20))


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
