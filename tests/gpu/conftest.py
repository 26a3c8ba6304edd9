import pytest


@pytest.fixture
def exact_fp32():
    """fp32 on CUDA without TF32, so that a CUDA fp32 run is comparable with the CPU one."""
    import torch

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
