//! Plots `moekit eval --json` results against their activated-parameter fraction: one curve
//! per JSONL file (what `scripts/router_results.sh` writes), perplexity in one SVG and tokens/s
//! in another, and prints a Markdown table of the points.
//!
//! ```text
//! cargo run --release --example router_tradeoff -- OUT_PREFIX NAME=FILE.jsonl [NAME=FILE.jsonl ...]
//! ```
//! writes `OUT_PREFIX-perplexity.svg` and `OUT_PREFIX-speed.svg`. A NAME ending in `(steps)`
//! is drawn as a staircase in the perplexity plot (the best uniform top-k within a budget
//! rounds k down between its points).

use moekit::router::{Series, tradeoff_svg};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [prefix, curves @ ..] = args.as_slice() else {
        return Err("usage: router_tradeoff OUT_PREFIX NAME=FILE.jsonl...".into());
    };
    let (mut quality, mut speed) = (Vec::new(), Vec::new());
    println!("| curve | run | activated | perplexity | tokens/s |\n|---|---|---|---|---|");
    for curve in curves {
        let (name, file) = curve
            .split_once('=')
            .ok_or_else(|| format!("`{curve}` is not NAME=FILE"))?;
        let (mut q, mut s) = (Vec::new(), Vec::new());
        let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
        for line in text.lines().filter(|l| !l.is_empty()) {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("{file}: {e} in {line}"))?;
            let field = |k: &str| {
                v[k].as_f64()
                    .ok_or_else(|| format!("{file}: no number `{k}` in {line}"))
            };
            let (f, ppl, tps) = (
                field("activated_fraction")?,
                field("perplexity")?,
                field("tokens_per_second")?,
            );
            println!(
                "| {name} | {} | {:.1}% | {ppl:.3} | {tps:.1} |",
                v["name"].as_str().unwrap_or("?"),
                100.0 * f
            );
            q.push((f, ppl));
            s.push((f, tps));
        }
        q.sort_by(|a, b| a.0.total_cmp(&b.0));
        s.sort_by(|a, b| a.0.total_cmp(&b.0));
        let steps = name.ends_with("(steps)");
        let name = name.trim_end_matches("(steps)").trim().to_string();
        quality.push(Series {
            name: name.clone(),
            points: q,
            steps,
        });
        speed.push(Series {
            name,
            points: s,
            steps: false,
        });
    }
    let x = "activated parameters (fraction of the model with every expert)";
    tradeoff_svg(
        &quality,
        "Held-out perplexity against activated parameters",
        x,
        "perplexity",
        format!("{prefix}-perplexity.svg").as_ref(),
    )?;
    tradeoff_svg(
        &speed,
        "Evaluation speed against activated parameters",
        x,
        "tokens/s",
        format!("{prefix}-speed.svg").as_ref(),
    )?;
    Ok(())
}
