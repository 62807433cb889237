"""Reference figures from Hugging Face transformers, to compare with `moekit eval` / `moekit generate`.

    python scripts/hf_reference.py MODEL --text FILE [--max-tokens 512] [--prompt TEXT --chat]
                                   [--adapter DIR] [--dtype bfloat16]

MODEL is a directory with config.json (safetensors) or a .gguf file (de-quantised by
transformers). Prints JSON: perplexity over the first N tokens of FILE (no special tokens) and,
with --prompt, the greedy continuation. --adapter applies a PEFT LoRA directory (PeftModel, not
merged). --dtype bfloat16 loads and runs the model in bf16 (for models whose f32 weights do
not fit in memory). Needs `torch transformers gguf` (and `peft` for --adapter; see ../shared/anchors).
"""
import argparse, json, math, os, torch
from hf_load import load

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--text")
ap.add_argument("--max-tokens", type=int, default=512)
ap.add_argument("--prompt")
ap.add_argument("--chat", action="store_true")
ap.add_argument("--max-new-tokens", type=int, default=32)
ap.add_argument("--adapter")
ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
a = ap.parse_args()

tok, model = load(a.model, getattr(torch, a.dtype))
model = model.eval()
if a.adapter:
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, a.adapter).eval()
out = {}
with torch.no_grad():
    if a.text:
        ids = tok(open(a.text).read(), add_special_tokens=False, return_tensors="pt").input_ids[:, : a.max_tokens]
        logits = model(ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:])
        out.update(tokens=ids.shape[1], perplexity=math.exp(nll.item()))
    if a.prompt:
        if a.chat:
            text = tok.apply_chat_template([{"role": "user", "content": a.prompt}], tokenize=False, add_generation_prompt=True)
        else:
            text = a.prompt
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=a.max_new_tokens, do_sample=False)
        out.update(prompt_ids=ids[0].tolist(), completion=tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
print(json.dumps(out))
