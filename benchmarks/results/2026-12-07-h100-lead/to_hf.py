"""De-quantise the GGUF teacher once into a plain Hugging Face folder (safetensors), so later loads skip the GGUF step."""
import sys, torch
from transformers import AutoModelForCausalLM
from rwkvinside.modeling.loading import load_teacher
model, tokenizer = load_teacher(sys.argv[1], dtype=torch.float32)
model.config.use_cache = True
plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
plain.load_state_dict(model.state_dict())
plain.generation_config = model.generation_config
plain.save_pretrained(sys.argv[2])
tokenizer.save_pretrained(sys.argv[2])
