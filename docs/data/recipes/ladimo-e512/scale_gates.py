"""Copies a Qwen2-MoE / Mixtral model directory written by `moekit convert`, multiplying every
router gate (and, in router_factors.safetensors, every factored router's second factor) by ALPHA.

Scaling the logits by a small ALPHA keeps each token's top-k choice (the order of the logits does
not change) and flattens renormalised top-k weights towards 1/k: the chosen experts of a neuron
split then add up with equal weights, as in the untrained bound of docs/results.md. The scaled
model is an ordinary checkpoint (transformers loads it). Usage: scale_gates.py SRC DST ALPHA
(f32 files only; no numpy needed).
"""
import json, struct, sys, os, shutil
from array import array
src, dst, alpha = sys.argv[1], sys.argv[2], float(sys.argv[3])
os.makedirs(dst, exist_ok=True)
for f in os.listdir(src):
    if not f.endswith('.safetensors'):
        shutil.copy(os.path.join(src, f), os.path.join(dst, f))
def scale(path_in, path_out, pred):
    data = bytearray(open(path_in, 'rb').read())
    n = struct.unpack('<Q', data[:8])[0]
    header = json.loads(data[8:8+n])
    start = 8 + n
    count = 0
    for name, info in header.items():
        if name == '__metadata__' or not pred(name):
            continue
        assert info['dtype'] == 'F32'
        a, b = info['data_offsets']
        arr = array('f'); arr.frombytes(bytes(data[start+a:start+b]))
        for i in range(len(arr)): arr[i] *= alpha
        data[start+a:start+b] = arr.tobytes()
        count += 1
    open(path_out, 'wb').write(data)
    return count
print(scale(os.path.join(src,'model.safetensors'), os.path.join(dst,'model.safetensors'), lambda n: n.endswith('mlp.gate.weight')))
if os.path.exists(os.path.join(src,'router_factors.safetensors')):
    print(scale(os.path.join(src,'router_factors.safetensors'), os.path.join(dst,'router_factors.safetensors'), lambda n: n.endswith('mlp.gate.1.weight')))
