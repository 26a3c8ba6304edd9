#!/usr/bin/env bash
# Every GPU check of the project as one prepared run (a GPU is lent rarely, for 15 minutes per session; one
# command may run 10). The tables of issue 14 (speed, stages, batch sizes, toggles, memory, NaN checks; CCSR and
# SeeSR-turbo rows too) come from benchmarks/bench_speed.py; SeeSR's 50 steps from bench_multistep.py; the CUDA
# tests from tests/gpu and the gpu-marked tests elsewhere.
#
#   1. here, with no GPU:   bash benchmarks/gpu_session.sh --prepare
#      downloads the wheels the GPU image lacks (diffusers, spandrel, importlib-metadata) into .whl/ (git-ignored
#      through .git/info/exclude; the golden fixtures travel with the tree, tests/fixtures/).
#   2. on the device:       the `run` tool with carry [".whl"], timeout_s 600 and the command
#                           bash benchmarks/gpu_session.sh
#      Steps, each with its own timeout so that a slow compile cannot eat the others' output; the whole run stays
#      within BUDGET_S (570 s, 9.5 minutes): a step's timeout is cut to what is left after the floors of the steps
#      still to come, so time a fast step saves goes to the later ones. Logs under $OUT (or /tmp/gpu_out):
#        env.txt            nvidia-smi, versions                                            ~10 s
#        gpu_tests.txt      pytest -m gpu                                                   <= 150 s
#        bench_speed.txt    speed (stages, fp16/bf16), nan, toggles, batch 1/4/16, 4096 memory  <= 220 s
#        bench_speed.json   every row of bench_speed
#        bench_compile.txt  PiSA-SR default, channels_last + torch.compile(reduce-overhead: CUDA graphs)  <= 120 s
#        bench_seesr.txt    bench_multistep: SeeSR 50 steps with CFG (tagger excluded / included), turbo, bf16  <= 90 s
#        bench_tagger.txt   the DAPE tagger in fp16                                         <= 25 s
#      The closing lines of bench_speed.txt check the issue's targets.
#   Here, without CUDA, the same command runs every step and says which ones need a GPU; --smoke instead runs
#   the benchmark steps on this CPU with tiny models (minutes), to test this script before a lent run.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  EXCLUDE=$(git rev-parse --git-path info/exclude)  # .git/info/exclude (a worktree's is its main checkout's)
  mkdir -p "$(dirname "$EXCLUDE")"
  grep -qx "/.whl/" "$EXCLUDE" 2>/dev/null || echo "/.whl/" >> "$EXCLUDE"
  rm -rf .whl && mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl diffusers==0.42.1 spandrel==0.4.2 importlib-metadata || exit 1
  du -sh .whl
  echo "tracked files: $(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1) bytes (+ .whl: under 64 MiB)"
  exit 0
fi
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1

START=$(date +%s)
BUDGET_S=${BUDGET_S:-570}
# budget CAP FLOOR_OF_LATER_STEPS: the timeout of the next step (at least 10 s)
budget() {
  local left=$(( BUDGET_S - ($(date +%s) - START) - $2 ))
  local t=$(( left < $1 ? left : $1 ))
  echo $(( t < 10 ? 10 : t ))
}

OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="$PWD/src:$PWD/tests:/tmp/site"
else
  export PYTHONPATH="$PWD/src:$PWD/tests"
fi
PY=python3
command -v python3 >/dev/null 2>&1 || PY=python

{ nvidia-smi 2>&1 || echo "nvidia-smi: not here"; $PY -c "import torch, diffusers, peft, transformers; print('torch',
  torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'peft', peft.__version__,
  'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/env.txt"
CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
# caps of the steps, and the floors kept for the steps after each one
T_TESTS=150; T_BENCH=220; T_COMPILE=120; T_SEESR=90; T_TAGGER=25
F_BENCH=150; F_COMPILE=60; F_SEESR=60; F_TAGGER=15
if [ "$SMOKE" = 1 ]; then
  BENCH=(--device cpu --model-size tiny --quick)
  export OMP_NUM_THREADS=1  # tiny models: thread synchronisation would cost more than it gives
  BUDGET_S=100000; T_BENCH=900
elif [ "$CUDA" = 1 ]; then
  BENCH=(--device cuda)
else
  echo "no CUDA device: the GPU tests skip and the benchmarks say so (bash $0 --smoke runs them on this CPU)"
  BENCH=(--device cuda)
fi

timeout "$(budget $T_TESTS $((F_BENCH + F_COMPILE + F_SEESR + F_TAGGER)))" $PY -m pytest -m gpu tests -q -rs \
  -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt"
timeout "$(budget $T_BENCH $((F_COMPILE + F_SEESR + F_TAGGER)))" $PY benchmarks/bench_speed.py "${BENCH[@]}" \
  --sections speed,nan,toggles,batch,memory --json "$OUT/bench_speed.json" 2>&1 | tee "$OUT/bench_speed.txt"
if [ "$SMOKE" = 1 ]; then
  echo "smoke: the compile, SeeSR and tagger steps need a GPU to finish in time (compiling takes minutes on a CPU)"
else
  timeout "$(budget $T_COMPILE $((F_SEESR + F_TAGGER)))" $PY benchmarks/bench_speed.py "${BENCH[@]}" --dtype bf16 \
    --sections compile --compile-mode reduce-overhead 2>&1 | tee "$OUT/bench_compile.txt"
  if [ "$CUDA" = 1 ]; then
    timeout "$(budget $T_SEESR $F_TAGGER)" $PY benchmarks/bench_multistep.py --device cuda --dtype bf16 --repeats 1 \
      2>&1 | tee "$OUT/bench_seesr.txt"
    timeout "$(budget $T_TAGGER 0)" $PY benchmarks/bench_tagger.py --device cuda --dtype fp16 --kinds dape 2>&1 \
      | tee "$OUT/bench_tagger.txt"
  fi
fi
echo "gpu_session: done in $(( $(date +%s) - START )) s; logs in $OUT"
