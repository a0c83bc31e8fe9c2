# recipe axes, calls D and E: how a fixed time divides between the stages, at a reduced budget of
# 150 s (the recipe's 600 s divided 1:3 when this was planned). Each arm is one `distill` of stages 1
# and 2 on the teacher samples of ../2026-12-07-h100-axes/b.sh, then scored as that folder's c.sh
# scores. Run ../2026-12-07-h100-split/e.sh first, on the same warm machine: b.sh compiles stage 1
# only, and e.sh's 10 stage-2 steps fill stage 2's caches too, so no arm compiles inside its budget.
# Usage: bash .gpu/d.sh 20 40; bash .gpu/d.sh 75 (stage 1's seconds per arm; stage 2 gets the rest of 150).
set -x; source .gpu/env.sh; date; git log --oneline -1
for first in "$@"; do
  timeout 280 python3 -m rwkvinside.cli -q distill --config configs/smollm2_135m_10min.yaml --teacher /tmp/t/hf \
    --output /tmp/split_$first stage1.max_time=$first stage2.max_time=$((150 - first)) "$TRAIN" "data.eval=[]" 2>&1 | tail -3
  timeout 60 python3 -m rwkvinside.cli -q eval --model /tmp/split_$first --teacher /tmp/t/hf --seq-len 512 --max-tokens 32768 \
    --passkey-lengths 512 --passkey-trials 1 --output /tmp/es_$first --data /tmp/t/modern_tune.txt /tmp/t/shakespeare_t-z.txt 2>&1 | tail -4
  python3 -c "import json,sys; d={k: json.load(open(f)) for k, f in zip(('eval','stage1','stage2'), sys.argv[2:5])}; json.dump(d, open(sys.argv[1],'w'), indent=1)" \
    $OUT/split_$first.json /tmp/es_$first/eval.json /tmp/split_$first/stage1/summary.json /tmp/split_$first/stage2/summary.json; date
done
