#!/usr/bin/env bash
# The GPU checks of issue 3 as one prepared run (a GPU is lent rarely, for 15 minutes per session).
#
#   1. here, with no GPU:   bash benchmarks/gpu_session.sh --prepare
#      downloads the wheels the GPU image lacks (diffusers, spandrel) into .whl/ (git-ignored through
#      .git/info/exclude, and carried to the device machine). The golden fixtures are in the repository
#      (tests/fixtures/golden) and travel with the working tree.
#   2. on the device:       the `run` tool with carry [".whl"], timeout_s 560 and the command
#                           bash benchmarks/gpu_session.sh
#      It runs the CUDA tests (tests/gpu, the gpu-marked tests elsewhere) and bench_onestep on CUDA: fp32 / fp16
#      / bf16 eager, then bf16 + channels_last + torch.compile (CUDA graphs), then bench_multistep (SeeSR, bf16).
#      Logs go to $OUT (or /tmp/gpu_out).
#
# Each step has its own timeout so that a slow compile cannot eat the others' output.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  rm -rf .whl && mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl diffusers==0.42.1 spandrel==0.4.2 importlib-metadata
  du -sh .whl
  exit 0
fi

OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="$PWD/src:/tmp/site"
else
  export PYTHONPATH="$PWD/src"
fi

{ nvidia-smi; python3 -c "import torch, diffusers, peft, transformers; print('torch', torch.__version__,
  'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)"; } \
  2>&1 | tee "$OUT/env.txt"
timeout 170 python3 -m pytest -m gpu tests -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt"
timeout 150 python3 benchmarks/bench_onestep.py --device cuda --dtype all 2>&1 | tee "$OUT/bench_eager.txt"
timeout 200 python3 benchmarks/bench_onestep.py --device cuda --dtype bf16 --rows reference,pisa --channels-last \
  --compile --compile-mode reduce-overhead 2>&1 | tee "$OUT/bench_compiled.txt"
timeout 30 python3 benchmarks/bench_tagger.py --device cuda --dtype fp16 --kinds dape 2>&1 | tee "$OUT/bench_tagger.txt"
timeout 150 python3 benchmarks/bench_multistep.py --device cuda --dtype bf16 --repeats 2 2>&1 | tee "$OUT/bench_seesr.txt"
