# stage 2's rate for the teacher's weights, a short A/B: 300 stage-2 steps at each from the same lead stage-1 student
# (/tmp/run1), scored with the lead on modern_tune and Shakespeare T-Z
set -x; source .gpu/env.sh; date; git log --oneline -1
declare -A LR=([base]="stage2.lr=1.0e-4 stage2.teacher_lr_scale=0.1" [all1e4]="stage2.lr=1.0e-4 stage2.teacher_lr_scale=1.0")
for name in base all1e4; do
  timeout 150 python3 -m rwkvinside.cli -q distill --config configs/smollm2_135m_10min.yaml --teacher /tmp/t/hf --stage 2 --init-from /tmp/run1 --output /tmp/lrrun_$name \
    convert.lead=true data.eos_first=false stage2.max_time=0 stage2.max_steps=300 ${LR[$name]} "$TRAIN" "data.eval=[]" 2>&1 | tail -3
  timeout 60 python3 -m rwkvinside.cli -q eval --model /tmp/lrrun_$name --teacher /tmp/t/hf --seq-len 512 --max-tokens 32768 --passkey-lengths 512 --passkey-trials 1 --output /tmp/lreval_$name --data /tmp/t/modern_tune.txt /tmp/t/shakespeare_t-z.txt 2>&1 | tail -3
  python3 -c "import json,sys; d={k: json.load(open(f)) for k, f in zip(('eval','stage2'), sys.argv[2:4])}; json.dump(d, open(sys.argv[1],'w'), indent=1)" $OUT/lr_$name.json /tmp/lreval_$name/eval.json /tmp/lrrun_$name/stage2/summary.json; gzip -c /tmp/lrrun_$name/stage2/log.jsonl > $OUT/lr_$name.log.jsonl.gz; date
done
