#!/usr/bin/env bash
# GPU check (issue "[speed]"): short bf16 SFT and AIRL runs on one CUDA GPU, plain and under the
# FSDP1 / DeepSpeed / FSDP2 strategy configs; tokens/s and peak memory in one table. <= 8 min on
# one H200. Stops at once, exit 3, on a machine without CUDA. Details: benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh [--json gpu_check.json] [--only sft,fsdp2] [--dry-run]
# Python: $PYTHON, else .venv/bin/python when present, else python3 (the project installed in it).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
case " $* " in
  *" --dry-run "*|*" --cpu-test "*|*" -h "*|*" --help "*) ;;
  *)
    "$PY" -c 'import sys, torch
sys.exit(0 if torch.cuda.is_available() else 3)' 2>/dev/null
    rc=$?
    if [ $rc -ne 0 ]; then
      echo "gpu_check: no CUDA GPU ($PY: torch.cuda.is_available() is False or torch is missing); run it on a GPU machine" >&2
      exit 3
    fi
    ;;
esac
# the whole check under one hard limit (8 min): the rows have their own timeouts and budget inside
exec timeout --signal=TERM --kill-after=10 480 "$PY" benchmarks/gpu_check.py "$@"
