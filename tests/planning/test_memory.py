import logging
import sys
import types

import pytest
import torch

from autobatch.options import check_memory_budget
from autobatch.planning import memory
from autobatch.planning.memory import DeviceMemory, budget, probe
from autobatch.sizes import parse_bytes

GIB = 2**30


@pytest.mark.parametrize("text, expected", [
    ("6GiB", 6 * GIB), ("500MB", 500 * 10**6), ("1.5 GiB", int(1.5 * GIB)), ("4000", 4000), ("2k", 2000)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "six GiB", "5 parsecs", "-1GiB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes(text)


device = DeviceMemory("cuda:0", "Test GPU", 80 * GIB, 60 * GIB, 4 * GIB, "nvml")


def test_budget_is_capacity_less_margin():
    assert budget(device).budget_bytes == int(64 * GIB * 0.9)


@pytest.mark.parametrize("cap, expected", [(8 * GIB, 8 * GIB), ("8GiB", 8 * GIB), (0.25, 20 * GIB),
                                           (500 * GIB, 64 * GIB)])
def test_budget_caps(cap, expected):
    result = budget(device, cap, margin=0.1)
    assert result.budget_bytes == int(expected * 0.9)
    assert "less a 10% safety margin" in result.describe()


@pytest.mark.parametrize("cap, error", [(1.5, ValueError), (0.0, ValueError), (-5, ValueError),
                                        (True, TypeError), ([1], TypeError)])
def test_budget_rejects(cap, error):
    with pytest.raises(error):
        check_memory_budget(cap)


def test_probe_host():
    host = probe(torch.device("cpu"), resident_bytes=1234)
    assert host.source == "psutil" and host.held_bytes == 1234
    assert 0 < host.free_bytes <= host.total_bytes


def test_probe_rejects_other_devices():
    with pytest.raises(ValueError, match="pass micro_batch as an int"):
        probe(torch.device("meta"))


# -- the CUDA path, with torch.cuda and NVML stood in for (these machines have no GPU) -----------

@pytest.fixture
def fake_cuda(monkeypatch):
    props = types.SimpleNamespace(name="Fake H100", uuid="1234-abcd", pci_domain_id=0, pci_bus_id=0x65,
                                  pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: 3 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: 5 * GIB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (40 * GIB, 80 * GIB))
    return props


def fake_nvml(free, total, seen):
    module = types.ModuleType("pynvml")
    module.nvmlInit = lambda: seen.append("init")
    module.nvmlShutdown = lambda: seen.append("shutdown")
    module.nvmlDeviceGetHandleByUUID = lambda uuid: seen.append(uuid) or "handle"
    module.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(free=free, total=total, used=total - free)
    return module


def test_cuda_probe_reads_nvml_by_uuid(fake_cuda, monkeypatch):
    seen = []
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(30 * GIB, 80 * GIB, seen))
    result = probe(torch.device("cuda:0"))
    assert seen == ["init", "GPU-1234-abcd", "shutdown"]
    assert result.source == "nvml" and result.name == "Fake H100"
    # NVML's free memory plus what the caching allocator holds unused, plus what our tensors hold.
    assert (result.free_bytes, result.held_bytes) == (32 * GIB, 3 * GIB)


def test_cuda_probe_without_nvml_falls_back_with_a_reason(fake_cuda, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # "import pynvml" raises ImportError
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        result = probe(torch.device("cuda:0"))
    assert result.source == "torch.cuda.mem_get_info" and result.free_bytes == 42 * GIB
    assert "NVML could not read Fake H100" in caplog.text


def test_cuda_probe_survives_an_nvml_failure(fake_cuda, monkeypatch, caplog):
    broken = fake_nvml(0, 0, [])

    def fail():
        raise RuntimeError("NVML Shared Library Not Found")

    broken.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        assert probe(torch.device("cuda:0")).source == "torch.cuda.mem_get_info"
    assert "Shared Library Not Found" in caplog.text


def test_real_nvml_binding_is_installed():
    import pynvml  # nvidia-ml-py is a dependency: the binding imports even without a GPU

    assert hasattr(pynvml, "nvmlDeviceGetMemoryInfo")
    assert memory.SAFETY_MARGIN == 0.10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_cuda_probe():
    result = probe(torch.device("cuda"))
    assert result.source == "nvml"
    assert 0 < result.free_bytes <= result.total_bytes


def test_a_budget_above_what_the_device_has_is_capped_and_said(caplog):
    memory = DeviceMemory("cpu", "host", 16 * 2**30, 8 * 2**30, 0, "psutil")
    with caplog.at_level("WARNING", logger="autobatch"):
        limit = budget(memory, "1.5TiB")
    assert limit.budget_bytes <= memory.capacity_bytes
    assert any("is more than" in r.getMessage() and "capped" in r.getMessage() for r in caplog.records)
