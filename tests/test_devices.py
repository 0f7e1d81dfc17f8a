"""``mgt.hub.devices``: one resolution of device and dtype names for the engine and the scorers."""

import pytest
import torch

from mgt.hub.devices import resolve_device, resolve_dtype


@pytest.mark.parametrize("name,dtype", [("fp32", torch.float32), ("float32", torch.float32), ("bf16", torch.bfloat16),
                                        ("bfloat16", torch.bfloat16), ("fp16", torch.float16),
                                        ("float16", torch.float16), ("half", torch.float16)])
def test_every_spelling(name, dtype):
    assert resolve_dtype(name) is dtype


def test_defaults_fp32_and_fp16_on_cuda_only_when_asked():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_dtype(None) is torch.float32 and resolve_dtype(None, cuda) is torch.float32
    assert resolve_dtype(None, cuda, cuda_default=torch.float16) is torch.float16  # the scorers' default
    assert resolve_dtype(None, cpu, cuda_default=torch.float16) is torch.float32
    assert resolve_dtype("bf16", cuda, cuda_default=torch.float16) is torch.bfloat16


def test_bad_names_list_the_choices():
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; choose one of fp32, bf16, fp16"):
        resolve_dtype("fp8")
    with pytest.raises(ValueError, match="unknown device 'tpu!'"):
        resolve_device("tpu!")


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto") == auto
