"""Compute NIQE reference values with basicsr 1.4.2's own implementation (run once; output committed as
niqe_reference.json). Not imported by the tests.

Command that produced tests/data/niqe_reference.json:

    pip download basicsr==1.4.2 --no-deps --no-binary :all: --no-build-isolation -d /tmp/basicsr_sdist
    python tests/data/make_niqe_reference.py /tmp/basicsr_sdist/basicsr-1.4.2.tar.gz > tests/data/niqe_reference.json

basicsr cannot be imported whole on current torchvision (basicsr/data/degradations.py imports the removed
``torchvision.transforms.functional_tensor``), so this script extracts only the four modules NIQE uses
(metrics/niqe.py, metrics/metric_util.py, utils/color_util.py, utils/matlab_functions.py, utils/registry.py)
plus niqe_pris_params.npz into a temporary package and calls ``calculate_niqe`` unchanged.

Two conventions: ``niqe_y`` is basicsr's default (``convert_to='y'``, Y of YCbCr); ``niqe_gray`` is the official
MATLAB script's input, ``rgb2gray`` of the uint8 image, computed here with MATLAB's coefficients
(0.298936021293775, 0.587043074451121, 0.114020904255103; rounded half away from zero to uint8, as MATLAB's
``imlincomb`` does) and handed to ``calculate_niqe(gray, crop_border, input_order='HW')``.
"""

import json
import platform
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

MODULES = ["metrics/niqe.py", "metrics/metric_util.py", "metrics/niqe_pris_params.npz", "utils/color_util.py",
           "utils/matlab_functions.py", "utils/registry.py"]
IMAGES = ["astronaut", "coffee", "chelsea", "rocket", "camera"]
MATLAB_RGB2GRAY = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])


def main(sdist: str) -> None:
    tmp = Path(tempfile.mkdtemp())
    root = tmp / "basicsr"
    with tarfile.open(sdist) as tar:
        for rel in MODULES:
            member = tar.getmember(f"basicsr-1.4.2/basicsr/{rel}")
            data = tar.extractfile(member).read()
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
    (root / "__init__.py").write_text("")
    (root / "metrics" / "__init__.py").write_text("")
    (root / "utils" / "__init__.py").write_text("from .color_util import bgr2ycbcr\n")
    sys.path.insert(0, str(tmp))
    from basicsr.metrics.niqe import calculate_niqe  # noqa: E402

    import scipy
    import skimage
    import skimage.data
    import torch

    values = {}
    for name in IMAGES:
        rgb = getattr(skimage.data, name)()
        if rgb.ndim == 2:
            rgb = np.stack([rgb] * 3, axis=2)
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        gray = np.floor(rgb.astype(np.float64) @ MATLAB_RGB2GRAY + 0.5).astype(np.uint8)
        values[name] = {"shape": list(rgb.shape), "niqe_y": calculate_niqe(bgr, crop_border=0, convert_to="y"),
                        "niqe_y_crop4": calculate_niqe(bgr, crop_border=4, convert_to="y"),
                        "niqe_gray": calculate_niqe(gray, crop_border=0, input_order="HW"),
                        "niqe_gray_crop4": calculate_niqe(gray, crop_border=4, input_order="HW")}
    out = {"source": "basicsr 1.4.2 sdist (PyPI), basicsr.metrics.niqe.calculate_niqe(img_bgr_uint8, crop_border, "
                     "input_order='HWC', convert_to='y') and calculate_niqe(matlab_rgb2gray_uint8, crop_border, "
                     "input_order='HW')",
           "command": "pip download basicsr==1.4.2 --no-deps --no-binary :all: --no-build-isolation -d "
                      "/tmp/basicsr_sdist && python tests/data/make_niqe_reference.py "
                      "/tmp/basicsr_sdist/basicsr-1.4.2.tar.gz > tests/data/niqe_reference.json",
           "images": "skimage.data.<name>() RGB uint8 (grey images replicated to 3 channels), fed as BGR",
           "versions": {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
                        "torch": torch.__version__, "scikit-image": skimage.__version__},
           "values": values}
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
