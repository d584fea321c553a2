import pytest

from snapkernel.errors import InvalidSpecError
from snapkernel.protocol.spec import GpuRequest, parse_gpu, parse_memory, spec_from_config


@pytest.mark.parametrize(("text", "expected"), [
    ("", None), ("H100", GpuRequest("H100", 1)), ("H100:2", GpuRequest("H100", 2)), ("any:1", GpuRequest("any", 1)),
])
def test_gpu_specs(text: str, expected: GpuRequest | None) -> None:
    assert parse_gpu(text) == expected


@pytest.mark.parametrize("text", ["Z999:-1", "H100:0", ":2", "H100:x", "H 100"])
def test_bad_gpu_spec_names_value_and_format(text: str) -> None:
    with pytest.raises(InvalidSpecError) as e:
        parse_gpu(text)
    assert repr(text) in str(e.value) and "'H100:2'" in str(e.value)


@pytest.mark.parametrize(("text", "expected"), [
    ("8Gi", 8 * 1024**3), ("512Mi", 512 * 1024**2), ("2G", 2 * 10**9), ("1.5Gi", int(1.5 * 1024**3)),
    (str(2**30), 2**30),
])
def test_memory_sizes(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1Gi", "8 parsecs", "1Ki"])
def test_bad_memory_names_value(text: str) -> None:
    with pytest.raises(InvalidSpecError) as e:
        parse_memory(text)
    assert repr(text) in str(e.value)


def test_config_rejects_unknown_keys_and_wrong_types() -> None:
    with pytest.raises(InvalidSpecError, match=r"unknown snapkernel config key.*'gpus'.*accepted keys"):
        spec_from_config({"gpus": "H100"})
    with pytest.raises(InvalidSpecError, match="cpu 'two' is not valid"):
        spec_from_config({"cpu": "two"})
    # Runtimes are the backend's plug-ins: a client checks a name's form; the backend, whether it has it.
    with pytest.raises(InvalidSpecError, match="runtime 'Docker Engine' is not a runtime's name: use gvisor, "
                                               "process or one a plug-in adds"):
        spec_from_config({"runtime": "Docker Engine"})
    assert spec_from_config({"runtime": "firecracker"}).runtime == "firecracker"
    spec = spec_from_config({"gpu": "H100:2", "cpu": 2, "memory": "8Gi", "env": {"A": "b"}})
    assert (spec.gpu, spec.cpu, spec.memory, dict(spec.env)) == ("H100:2", 2.0, "8Gi", {"A": "b"})
