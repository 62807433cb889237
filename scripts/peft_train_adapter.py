"""Trains a small LoRA adapter for a model with Hugging Face PEFT and saves it, so that moekit can
be checked against PEFT on an adapter PEFT wrote (docs/compatibility.md).

    python scripts/peft_train_adapter.py MODEL OUT --text FILE [--steps 30] [--r 8] [--alpha 16]
           [--targets q_proj,v_proj,down_proj] [--rslora]

MODEL is a directory with config.json or a .gguf file (de-quantised by transformers). Trains with
AdamW (lr 1e-3, seed 0) on consecutive 128-token windows of FILE, so the adapter moves the model
measurably, then writes OUT/adapter_config.json and OUT/adapter_model.safetensors.
Needs `torch transformers gguf peft`.
"""
import argparse, os, torch
from hf_load import load
from peft import LoraConfig, get_peft_model

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("out")
ap.add_argument("--text", required=True)
ap.add_argument("--steps", type=int, default=30)
ap.add_argument("--r", type=int, default=8)
ap.add_argument("--alpha", type=float, default=16)
ap.add_argument("--targets", default="q_proj,v_proj,down_proj")
ap.add_argument("--rslora", action="store_true")
a = ap.parse_args()
torch.manual_seed(0)
tok, model = load(a.model)
config = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, use_rslora=a.rslora,
                    target_modules=a.targets.split(","), task_type="CAUSAL_LM")
model = get_peft_model(model, config)
ids = tok(open(a.text).read(), add_special_tokens=False, return_tensors="pt").input_ids[0]
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model.train()
for step in range(a.steps):
    window = ids[step * 128:(step + 1) * 128].unsqueeze(0)
    loss = model(window, labels=window).loss
    loss.backward(); opt.step(); opt.zero_grad()
    print(f"step {step} loss {loss.item():.4f}")
model.save_pretrained(a.out)
