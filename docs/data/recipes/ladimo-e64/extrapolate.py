#!/usr/bin/env python3
"""How many more distillation steps the 80%-activated target needs, extrapolated from the runs.

1. Perplexity against KL: ln(perplexity / dense) on the 8,192 tutorial tokens, fitted as a line
   in the held-out KL of `moekit distill`'s own evaluation, over every model that has both.
2. KL against steps: the 64-part run's held-out KL from step 160 on, fitted two ways: a line
   in ln(step), and a power law floor + b * step^-c (least squares; c on a grid of 0.01). The
   two fit these points about equally well and disagree far past them: the log line has no
   floor, the power law has one.
3. For each: the KL it predicts at step 1,100 (where the second stage measured), and the step
   at which it reaches the KL the target needs (with its time at the median measured seconds
   per step), or that it never does.
4. The same two fits to the within-budget long run (budget/distill-long-train.jsonl: top-25,
   constant learning rate after the first 700 steps), its steps counted in all (700 + its own).
Run from anywhere: python3 extrapolate.py
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
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def perplexities(folder):
    """Perplexity by result name in FOLDER/results.jsonl; names must be unique."""
    results = lines(folder / "results.jsonl")
    by_name = {r["name"]: r["perplexity"] for r in results}
    if len(by_name) != len(results):
        raise SystemExit(f"{folder}/results.jsonl: result names repeat")
    return by_name


def summary(path):
    return json.loads(path.read_text())


def fit_line(xs, ys):
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


e32, e64 = RECIPES / "ladimo-e32-fit", HERE
# (held-out KL, perplexity) of the same model under the same routing.
s32, s32b = summary(e32 / "distill-summary.json"), summary(e32 / "distill-top13-more-summary.json")
s64, s64b = summary(e64 / "distill-summary.json"), summary(e64 / "distill-more-summary.json")
p32, p64 = perplexities(e32), perplexities(e64)
pairs = [
    ("32 parts, before distillation", s32["before"]["kl"], p32["rs1000-lr1e-3"]),
    ("32 parts, 700 steps", s32["after"]["kl"], p32["distilled 700 steps"]),
    ("32 parts, 700 + 400 steps", s32b["after"]["kl"], p32["distilled 700 steps, then 400 under top-13"]),
    ("64 parts, before distillation", s64["before"]["kl"], p64["layerwise"]),
    ("64 parts, 700 steps", s64["after"]["kl"], p64["distilled 700 steps"]),
    ("64 parts, 700 + 400 steps", s64b["after"]["kl"], p64["distilled 700 steps, then 400 under its own top-k"]),
]
c, d = fit_line([kl for _, kl, _ in pairs], [math.log(p / DENSE) for _, _, p in pairs])
print("model | held-out KL | perplexity | ln(ppl/dense) | fitted")
for name, kl, p in pairs:
    print(f"{name} | {kl:.4f} | {p:.3f} | {math.log(p / DENSE):.4f} | {c + d * kl:.4f}")
kl_needed = (TARGET - c) / d
print(f"ln(ppl/dense) = {c:.4f} + {d:.4f} * KL; the target (ln 1.1 = {TARGET:.4f}) needs KL <= {kl_needed:.4f}")


def extrapolate(log, first, offset, at):
    """Fits held-out KL against steps in all (OFFSET + the log's own, from FIRST on) and reports
    where each fit reaches the target's KL; AT is a step in all to print its prediction at."""
    train = lines(log)
    evals = [(offset + r["report"]["step"], r["report"]["kl"]) for r in train
             if r["event"] == "eval" and r["report"]["step"] >= first]
    seconds = statistics.median(r["report"]["seconds"] for r in train if r["event"] == "step")

    def sse(predict):
        return sum((predict(t) - kl) ** 2 for t, kl in evals)

    def report(name, predict, floor):
        line = f"{name}: SSE {sse(predict):.2e}, predicts {predict(at):.4f} at step {at:,}; "
        if floor >= kl_needed:
            print(line + f"never reaches {kl_needed:.4f} (floor {floor:.4f}, ln(ppl/dense) "
                  f"{c + d * floor:.4f}, perplexity {DENSE * math.exp(c + d * floor):.2f})")
            return
        lo, hi = 1.0, 1e12
        while hi / lo > 1.001:  # predict decreases in the step
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if predict(mid) > kl_needed else (lo, mid)
        print(line + f"reaches {kl_needed:.4f} at step ~{hi:,.0f}: "
              f"{hi * seconds / 3600:,.0f} h at {seconds:.1f} s a step on these 2 cores")

    a, slope = fit_line([math.log(t) for t, _ in evals], [kl for _, kl in evals])
    report(f"KL = {a:.4f} - {-slope:.4f} * ln(step) ({-slope * math.log(2):.4f} per doubling)",
           lambda t: a + slope * math.log(t), -math.inf)
    fits = []
    for c100 in range(1, 301):
        power = c100 / 100
        floor, b = fit_line([t ** -power for t, _ in evals], [kl for _, kl in evals])
        fits.append((sse(lambda t: floor + b * t ** -power), floor, b, power))
    _, floor, b, power = min(fits)
    report(f"KL = {floor:.4f} + {b:.4f} * step^-{power:.2f}", lambda t: floor + b * t ** -power, floor)


print(f"64 parts, first stage, held-out KL from step 160; the second stage measured "
      f"{s64b['after']['kl']:.4f} at step 1,100 (at half the learning rate)")
extrapolate(e64 / "distill-train.jsonl", 160, 0, 1100)
print("64 parts within the budget (top-25), the long constant-rate run, steps in all (700 + its own)")
extrapolate(e64 / "budget" / "distill-long-train.jsonl", 0, 700, 2000)
