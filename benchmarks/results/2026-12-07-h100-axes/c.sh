# recipe axes, call C: 250 stage-2 steps per arm (equal steps and tokens: the first arm pays the
# compilation), each scored with its lead on the modern English tune half and Shakespeare T-Z
set -x; source .gpu/env.sh; date; git log --oneline -1
declare -A FROM=([base]=tied [rate1]=tied [untied]=untied [seq1024]=tied)
declare -A ARM=([base]="" [rate1]="stage2.teacher_lr_scale=1.0" [untied]="" [seq1024]="data.seq_len=1024 train.batch_size=16")
arms=${*:-base rate1 untied seq1024}; for name in $arms; do
  timeout 150 python3 -m rwkvinside.cli -q distill --config configs/smollm2_135m_10min.yaml --teacher /tmp/t/hf --stage 2 \
    --init-from /tmp/s1_${FROM[$name]} --output /tmp/s2_$name stage2.max_time=0 stage2.max_steps=250 ${ARM[$name]} \
    "$TRAIN" "data.eval=[]" 2>&1 | tail -3
  timeout 60 python3 -m rwkvinside.cli -q eval --model /tmp/s2_$name --teacher /tmp/t/hf --seq-len 512 --max-tokens 32768 \
    --passkey-lengths 512 --passkey-trials 1 --output /tmp/e_$name --data /tmp/t/modern_tune.txt /tmp/t/shakespeare_t-z.txt 2>&1 | tail -4
  python3 -c "import json,sys; d={k: json.load(open(f)) for k, f in zip(('eval','stage2'), sys.argv[2:4])}; json.dump(d, open(sys.argv[1],'w'), indent=1)" \
    $OUT/axis_$name.json /tmp/e_$name/eval.json /tmp/s2_$name/stage2/summary.json
  gzip -c /tmp/s2_$name/stage2/log.jsonl > $OUT/axis_$name.log.jsonl.gz; date
done
