# time split, call B: b.sh's teacher folder, samples and tied stage-1 student, then 10 stage-2 steps
# from it so that every arm of d.sh finds stage 2's compiled kernels cached too (b.sh compiles stage 1 only)
set -x; bash .gpu/b.sh tied; source .gpu/env.sh
timeout 200 python3 -m rwkvinside.cli -q distill --config configs/smollm2_135m_10min.yaml --teacher /tmp/t/hf --stage 2 \
  --init-from /tmp/s1_tied --output /tmp/warm2 stage2.max_time=0 stage2.max_steps=10 "$TRAIN" "data.eval=[]" 2>&1 | tail -3
cp /tmp/warm2/stage2/summary.json $OUT/warm2.json; date
