set -x; source .gpu/env.sh; date; git log --oneline -1
rwk distill --config configs/smollm2_135m_10min.yaml --teacher /tmp/t/hf --stage 2 --init-from /tmp/run1 --output /tmp/run2 \
  convert.lead=true data.eos_first=false "$TRAIN" "data.eval=[]" 2>&1 | tail -25
date; mkdir -p $OUT/stage2 $OUT/eval512; cp /tmp/run2/report.md /tmp/run2/stage2/summary.json $OUT/stage2/; gzip -c /tmp/run2/stage2/log.jsonl > $OUT/stage2/log.jsonl.gz
rwk eval --model /tmp/run2 --teacher /tmp/t/hf --seq-len 512 --max-tokens 65536 --passkey-lengths 512 1024 --passkey-trials 2 --output $OUT/eval512 \
  --data /tmp/t/shakespeare_t-z.txt /tmp/t/modern_tune.txt /tmp/t/modern_report.txt 2>&1 | tail -30; date
