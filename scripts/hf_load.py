"""Shared by the reference scripts: load a model and its tokenizer with transformers, in float32,
from a Hugging Face directory or a .gguf file (which transformers de-quantises); another
`dtype` (bfloat16) for models whose f32 weights do not fit in memory."""
import os
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def load(path, dtype=torch.float32):
    if path.endswith(".gguf"):
        d, f = os.path.split(os.path.abspath(path))
        kw = dict(gguf_file=f)
    else:
        d, kw = path, {}
    tok = AutoTokenizer.from_pretrained(d, **kw)
    return tok, AutoModelForCausalLM.from_pretrained(d, dtype=dtype, **kw)
