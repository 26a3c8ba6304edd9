"""Run an ncnn model with the `ncnn` runtime itself (CPU, fp32, one thread): the independent reference of the
conversion parity tests."""

import numpy as np


def run_ncnn(param, binf, chw: np.ndarray) -> np.ndarray:
    """The ``output`` blob of the model for a ``[3, H, W]`` float32 input in ``[0, 1]`` (unclamped)."""
    import ncnn

    net = ncnn.Net()
    for opt in ("use_vulkan_compute", "use_fp16_storage", "use_fp16_arithmetic", "use_fp16_packed",
                "use_bf16_storage"):
        setattr(net.opt, opt, False)
    net.opt.num_threads = 1
    assert net.load_param(str(param)) == 0 and net.load_model(str(binf)) == 0
    arr = np.ascontiguousarray(chw, dtype=np.float32)  # ncnn.Mat borrows this memory: keep it alive
    ex = net.create_extractor()
    ex.input("data", ncnn.Mat(arr))
    ret, out = ex.extract("output")
    assert ret == 0
    return np.array(out)
