"""Shared fixtures: tiny tokenizers and tiny random teachers, built in-process (no hub)."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "To be, or not to be, that is the question. " * 4,
    "Once upon a time, there was a little girl who loved to read. " * 4,
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"-()[]\n",
]


def build_tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML special tokens, trained on a few sentences."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        bos_token=None,
        pad_token="<|endoftext|>",
        additional_special_tokens=special[1:],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """The test models are tiny: splitting their matrix products over two threads only adds
    synchronisation, which on a busy 2-core machine made the suite several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fla_untuned():
    """On a GPU: each of fla's autotuned kernels launches its first candidate configuration instead of
    timing them all. The tiny test models' shapes are not in the shipped record (ops/wkv7/tuned), and
    tuning them compiles every candidate of every kernel: minutes, on a fresh machine, before the
    first step of a test that checks something else (a training step, a captured graph). The WKV-7
    kernels themselves are checked against the float64 reference, with the tuned configurations, in
    tests/ops."""
    if not torch.cuda.is_available():
        yield
        return
    import fla.ops.rwkv7  # noqa: F401  (loads every kernel module the RWKV-7 ops use)

    from rwkvinside.ops.wkv7.tuned import fla_autotuners

    candidates = {autotuner: autotuner.configs for autotuner in fla_autotuners()}
    for autotuner, configs in candidates.items():
        autotuner.configs = configs[:1]
    yield
    for autotuner, configs in candidates.items():
        autotuner.configs = configs


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


# One tiny configuration per supported teacher family: 4 layers, width 64, grouped-query heads.
FAMILY_CONFIGS = {
    "llama": dict(model_type="llama", tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=True, head_dim=16),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, head_dim=16),
}
SUPPORTED_FAMILIES = list(FAMILY_CONFIGS)


def build_tiny_teacher(family: str, vocab_size: int = 320, seed: int = 0, num_layers: int = 4):
    """A random causal LM of `family`: hidden 64, 4 query heads and 2 key-value heads of 16."""
    settings = dict(FAMILY_CONFIGS[family])
    model_type = settings.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **settings,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if family == "qwen2":  # Qwen2 has q/k/v biases; make them non-trivial so tests see them copied
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.02)
    return model.eval()


@pytest.fixture(params=SUPPORTED_FAMILIES)
def family(request) -> str:
    return request.param
