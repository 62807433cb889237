#!/usr/bin/env python3
"""How many more distillation steps the 80%-activated target needs, extrapolated from the runs.

1. Perplexity against KL: ln(perplexity / dense) on the 8,192 tutorial tokens, fitted as a line
   in the held-out KL of `moekit distill`'s own evaluation, over every model that has both.
2. KL against steps: the 64-part run's held-out KL from step 160 on, fitted as a - b * ln(step)
   (a power law a + b * step^-c fitted to the same points drives c to 0, i.e. to this form).
3. The steps at which the fitted KL reaches the KL the target needs, and their time at the
   median measured seconds per step. Run from anywhere: python3 extrapolate.py
"""
import json
import math
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent
DENSE = 12.5870  # docs/results.md: the dense model on the same 8,192 tokens
TARGET = math.log(1.1)  # at most 10% above dense


def lines(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def perplexity(folder, name):
    found = [r["perplexity"] for r in lines(folder / "results.jsonl") if r.get("name") == name]
    if len(found) != 1:
        raise SystemExit(f"{folder}/results.jsonl: expected one result named {name!r}, found {len(found)}")
    return found[0]


def summary(path):
    return json.load(open(path))


def fit_line(xs, ys):
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


e32, e64 = RECIPES / "ladimo-e32-fit", HERE
# (held-out KL, perplexity) of the same model under the same routing.
s32, s32b = summary(e32 / "distill-summary.json"), summary(e32 / "distill-top13-more-summary.json")
s64, s64b = summary(e64 / "distill-summary.json"), summary(e64 / "distill-more-summary.json")
pairs = [
    ("32 parts, before distillation", s32["before"]["kl"], perplexity(e32, "rs1000-lr1e-3")),
    ("32 parts, 700 steps", s32["after"]["kl"], perplexity(e32, "distilled 700 steps")),
    ("32 parts, 700 + 400 steps", s32b["after"]["kl"], perplexity(e32, "distilled 700 steps, then 400 under top-13")),
    ("64 parts, before distillation", s64["before"]["kl"], perplexity(e64, "layerwise")),
    ("64 parts, 700 steps", s64["after"]["kl"], perplexity(e64, "distilled 700 steps")),
    ("64 parts, 700 + 400 steps", s64b["after"]["kl"], perplexity(e64, "distilled 700 steps, then 400 under its own top-k")),
]
c, d = fit_line([kl for _, kl, _ in pairs], [math.log(p / DENSE) for _, _, p in pairs])
print("model | held-out KL | perplexity | ln(ppl/dense) | fitted")
for name, kl, p in pairs:
    print(f"{name} | {kl:.4f} | {p:.3f} | {math.log(p / DENSE):.4f} | {c + d * kl:.4f}")
kl_needed = (TARGET - c) / d
print(f"ln(ppl/dense) = {c:.4f} + {d:.4f} * KL; the target (ln 1.1 = {TARGET:.4f}) needs KL <= {kl_needed:.4f}")

train = lines(e64 / "distill-train.jsonl")
evals = [(r["report"]["step"], r["report"]["kl"]) for r in train if r["event"] == "eval" and r["report"]["step"] >= 160]
a, slope = fit_line([math.log(t) for t, _ in evals], [kl for _, kl in evals])
b = -slope
print(f"64 parts, steps {evals[0][0]}-{evals[-1][0]}: KL = {a:.4f} - {b:.4f} * ln(step) "
      f"({b * math.log(2):.4f} per doubling; residual max "
      f"{max(abs(a - b * math.log(t) - kl) for t, kl in evals):.4f})")
steps = math.exp((a - kl_needed) / b)
seconds = statistics.median(r["report"]["seconds"] for r in train if r["event"] == "step")
print(f"KL {kl_needed:.4f} at step ~{steps:,.0f} of that schedule: "
      f"{steps * seconds / 3600:,.0f} h at {seconds:.1f} s a step on these 2 cores")
