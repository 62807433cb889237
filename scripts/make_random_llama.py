"""A random-weight Llama (or Qwen3) checkpoint of a named shape, in bf16, written tensor by tensor.

    python scripts/make_random_llama.py SHAPE OUT_DIR --tokenizer TOKENIZER_DIR [--layers N]

SHAPE is one of smollm2-135m, llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, qwen3-0.6b (their
published shapes: hidden size, FFN width, layers, query / KV heads, vocabulary, tied embeddings,
RoPE; Qwen3's head width of its own and per-head q_norm / k_norm).
Weights are N(0, 0.02²) (norms 1), rounded to bf16; shards of at most 5 GB with
model.safetensors.index.json, as transformers writes them. Memory follows one block of rows,
not the model: an 8B checkpoint (16 GB) is written on a machine with a few GB free. The
tokenizer files of TOKENIZER_DIR are copied (their ids must be below the vocabulary). The
folder is written under OUT_DIR.partial and renamed when complete; an existing OUT_DIR with
config.json is left as it is. Needs numpy only.
"""
import argparse
import json
import os
import shutil

import numpy as np

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocabulary, tied, rope theta, llama3 scaling
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, True, 100000.0, False),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256, True, 500000.0, True),
    "llama-3.2-3b": (3072, 8192, 28, 24, 8, 128256, True, 500000.0, True),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256, False, 500000.0, True),
    "qwen3-0.6b": (1024, 3072, 28, 16, 8, 151936, True, 1000000.0, False),
}
# Shapes of another family: model_type and head width.
FAMILY = {"qwen3-0.6b": ("qwen3", 128)}


def head_dim(name, shape):
    return FAMILY.get(name, ("llama", shape[0] // shape[3]))[1]
SHARD_BYTES = 5_000_000_000
BLOCK_VALUES = 1 << 24


def bf16_bytes(values):
    """Round-to-nearest-even f32 -> bf16, as little-endian bytes."""
    u = values.astype(np.float32).view(np.uint32)
    u = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return (u >> np.uint32(16)).astype("<u2").tobytes()


def tensors(name, shape, layers):
    h, i, _, heads, kv, v, tied, _, _ = shape
    d = head_dim(name, shape)
    yield "model.embed_tokens.weight", (v, h)
    for l in range(layers):
        p = f"model.layers.{l}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (heads * d, h)
        yield p + "self_attn.k_proj.weight", (kv * d, h)
        yield p + "self_attn.v_proj.weight", (kv * d, h)
        yield p + "self_attn.o_proj.weight", (h, heads * d)
        if name in FAMILY:
            yield p + "self_attn.q_norm.weight", (d,)
            yield p + "self_attn.k_norm.weight", (d,)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    if not tied:
        yield "lm_head.weight", (v, h)


def write_shard(path, entries, rng):
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in entries:
            n = int(np.prod(shape))
            if name.endswith("norm.weight"):
                f.write(bf16_bytes(np.ones(n, dtype=np.float32)))
                continue
            for start in range(0, n, BLOCK_VALUES):
                block = rng.standard_normal(min(BLOCK_VALUES, n - start), dtype=np.float32)
                f.write(bf16_bytes(block * np.float32(0.02)))
        f.flush()
        os.fsync(f.fileno())
    return offset


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--layers", type=int, help="layers (default: the shape's)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if os.path.exists(os.path.join(a.out, "config.json")):
        print(a.out)
        return
    shape = SHAPES[a.shape]
    h, i, layers, heads, kv, v, tied, theta, llama3 = shape
    layers = a.layers or layers
    tmp = a.out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    # Shards of whole tensors, at most SHARD_BYTES each.
    shards, size = [[]], 0
    for name, shp in tensors(a.shape, shape, layers):
        n = int(np.prod(shp)) * 2
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += n
    rng = np.random.default_rng(a.seed)
    weight_map, total = {}, 0
    for k, entries in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05}-of-{len(shards):05}.safetensors"
        total += write_shard(os.path.join(tmp, file), entries, rng)
        weight_map.update({name: file for name, _ in entries})
    if len(shards) > 1:
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    family = FAMILY.get(a.shape, ("llama", 0))[0]
    config = {
        "architectures": ["Qwen3ForCausalLM" if family == "qwen3" else "LlamaForCausalLM"],
        "model_type": family,
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim(a.shape, shape),
        "vocab_size": v,
        "tie_word_embeddings": tied,
        "rope_theta": theta,
        "rms_norm_eps": 1e-6 if family == "qwen3" else 1e-5,
        "max_position_embeddings": 131072 if llama3 else 8192,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    if llama3:
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 32.0 if h < 4096 else 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    for name in os.listdir(a.tokenizer):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            shutil.copy(os.path.join(a.tokenizer, name), tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shutil.rmtree(a.out, ignore_errors=True)
    os.rename(tmp, a.out)
    print(a.out)


if __name__ == "__main__":
    main()
