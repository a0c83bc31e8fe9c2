# the lead's cost in training steps: none / one token more than seq_len / the first of seq_len
set -x; date
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD/src:/tmp/site PATH=/tmp/site/bin:$PATH TRITON_CACHE_DIR=/tmp/triton PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
nvidia-smi --query-gpu=name --format=csv; git log --oneline -1
for lead in none within extra; do
  python3 benchmarks/bench_stages.py --teacher random --skip wkv7 --compile --rows stage1_compiled stage2_all_compiled \
    --warmup 2 --steps 6 --lead $lead --out $OUT/$lead 2>&1 | grep -v "^\s*$" | tail -8; date
done
