# Sourced by the scripts/h100_*.sh runs on the lent GPU (after scripts/h100_prepare.sh on the same warm machine).
export PYTHONUNBUFFERED=1 GMA6_CACHE=/tmp/gcache TOKENIZERS_PARALLELISM=false PYTHONPATH=/tmp/pylib:src
M=/tmp/g/gemma.gguf
mkdir -p /tmp/runs /tmp/ev
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
