//! Atomic training checkpoints.
//!
//! A checkpoint is a directory `step-NNNNNN/` holding the trainable parameters
//! (`student.bpk`, burnpack, only the trainable set: the rest of the student is the model the
//! run started from), the distiller's projection (`projection.bpk`, when there is one), the
//! optimiser state (`optimizer.bpk`) and the run state (`state.json`: step, data order,
//! evaluations). It is written under a temporary name, synced and renamed into place; then the
//! `latest` file (itself written to a temporary file and renamed) points at it. A run killed at
//! any moment leaves either the previous checkpoint or the new one as `latest`, never a
//! half-written one.

use std::fs::File;
use std::path::{Path, PathBuf};

use burn::module::{Module, ParamGroup};
use burn::optim::OptimizerRecord;
use burn::store::ModuleRecord;
use serde::{Deserialize, Serialize};

use moekit_llama::io::atomic;

use crate::data::DataOrder;
use crate::digest::Fnv1a;
use crate::error::{Result, TrainError};
use crate::eval::EvalReport;

/// The run state saved with each checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps done.
    pub step: usize,
    /// Where the run is in its data.
    pub order: DataOrder,
    /// Tokens trained on so far.
    pub tokens: u64,
    /// Every evaluation so far.
    pub evals: Vec<EvalReport>,
    /// The learning-rate schedule's length over the run: `(first step, total steps)` for each
    /// length it ran with (a rerun with more `steps` stretches the cosine decay from there on).
    /// Empty in checkpoints written before it was recorded.
    #[serde(default)]
    pub schedule: Vec<(usize, usize)>,
    /// What must match for a resume ([`RunIdentity`]).
    pub identity: RunIdentity,
    /// The FNV-1a digest ([`crate::digest::Fnv1a`], hex) of each `.bpk` file of the
    /// checkpoint, checked when it is read: a file copied from another step, or damaged, is
    /// refused. Empty in checkpoints written before it was recorded.
    #[serde(default)]
    pub digests: std::collections::BTreeMap<String, String>,
}

/// What identifies a run: a checkpoint resumes only a run with the same identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunIdentity {
    /// The trainable set, e.g. `router,adapters`.
    pub trainable: String,
    /// The loss, e.g. `kl:1,ce:0.1`.
    pub loss: String,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Micro-batches per step.
    pub grad_accum: usize,
    /// Training windows.
    pub windows: usize,
    /// Trainable scalar parameters.
    pub params: usize,
    /// Fingerprint of the training tokens (`TokenWindows::fingerprint`). `None` in
    /// checkpoints written before it was recorded, which resume without this check and the
    /// next two.
    #[serde(default)]
    pub data: Option<u64>,
    /// The distiller's settings besides the loss: temperature, skew α, β, top-k, layer map.
    /// `None` as for `data`.
    #[serde(default)]
    pub distiller: Option<String>,
    /// What the caller says the run started from (`Trainer::with_source`: e.g. the
    /// student's and teacher's files), so that a rerun from another model of the same shape
    /// is refused. `None` when the caller gives none.
    #[serde(default)]
    pub source: Option<String>,
    /// The optimiser's settings and the schedule's shape but its length: learning rate,
    /// warm-up, floor, weight decay, betas, clipping, auxiliary-loss weight, data seed. A run
    /// may go on for more steps (the documented way to extend it), but not with other
    /// settings mixed in from its middle. `None` in checkpoints written before it was recorded.
    #[serde(default)]
    pub optimizer: Option<String>,
}

impl RunIdentity {
    /// The names of the fields in which a checkpoint's identity `saved` differs from this
    /// run's (empty: the checkpoint resumes this run). A checkpoint written before `data`,
    /// `distiller` and `source` were recorded (no `data`) is compared on the other fields.
    pub fn differences(&self, saved: &RunIdentity) -> Vec<&'static str> {
        let recorded = saved.data.is_some();
        let optional = |same: bool| !recorded || same;
        [
            ("trainable set", self.trainable == saved.trainable),
            ("loss", self.loss == saved.loss),
            (
                "batch shape",
                (self.batch_size, self.seq_len, self.grad_accum)
                    == (saved.batch_size, saved.seq_len, saved.grad_accum),
            ),
            ("number of training windows", self.windows == saved.windows),
            ("trainable parameters", self.params == saved.params),
            ("training tokens", optional(self.data == saved.data)),
            (
                "distiller settings",
                optional(self.distiller == saved.distiller),
            ),
            ("models", optional(self.source == saved.source)),
            (
                "optimiser settings",
                saved.optimizer.is_none() || self.optimizer == saved.optimizer,
            ),
        ]
        .into_iter()
        .filter(|(_, same)| !same)
        .map(|(name, _)| name)
        .collect()
    }
}

/// The parts of a checkpoint read back.
pub struct Loaded {
    /// The run state.
    pub state: TrainState,
    /// The trainable parameters.
    pub student: ModuleRecord,
    /// The projection's parameters, if the run had one.
    pub projection: Option<ModuleRecord>,
    /// The optimiser state.
    pub optimizer: OptimizerRecord,
}

const LATEST: &str = "latest";

/// The parameter files of a checkpoint.
const BPK_FILES: [&str; 3] = ["student.bpk", "projection.bpk", "optimizer.bpk"];

fn step_name(step: usize) -> String {
    format!("step-{step:06}")
}

/// Syncs a written file to disk.
fn sync(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| TrainError::io(path, e))
}

/// Syncs a directory's entries (the renames into it) to disk where the platform can.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    sync(dir)?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The step of a checkpoint directory named `step-N`.
fn step_of(name: &str) -> Option<usize> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Saves a checkpoint of step `state.step` in `dir`, points `latest` at it and removes all
/// but the newest `keep` checkpoints. Returns the checkpoint's directory.
pub fn save<M: Module, P: Module>(
    dir: &Path,
    state: &TrainState,
    student: &M,
    trainable: ParamGroup,
    projection: Option<&P>,
    optimizer: OptimizerRecord,
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let name = step_name(state.step);
    let tmp = dir.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    let fail = |path: &Path, e: burn::store::RecordError| TrainError::checkpoint(path, e);
    let p = tmp.join("student.bpk");
    student
        .clone()
        .into_record_group(trainable)
        .save(&p)
        .map_err(|e| fail(&p, e))?;
    sync(&p)?;
    if let Some(projection) = projection {
        let p = tmp.join("projection.bpk");
        projection.clone().save_file(&p).map_err(|e| fail(&p, e))?;
        sync(&p)?;
    }
    let p = tmp.join("optimizer.bpk");
    optimizer.save(&p).map_err(|e| fail(&p, e))?;
    sync(&p)?;
    let mut state = state.clone();
    state.digests = BPK_FILES
        .iter()
        .filter(|f| tmp.join(f).exists())
        .map(|f| {
            Ok((
                f.to_string(),
                format!("{:016x}", Fnv1a::of_file(&tmp.join(f))?),
            ))
        })
        .collect::<Result<_>>()?;
    let json = serde_json::to_vec_pretty(&state).expect("the state serialises");
    atomic::write(&tmp.join("state.json"), &json)?;
    let target = dir.join(&name);
    if target.exists() {
        std::fs::remove_dir_all(&target).map_err(|e| TrainError::io(&target, e))?;
    }
    std::fs::rename(&tmp, &target).map_err(|e| TrainError::io(&target, e))?;
    // The checkpoint's entry is on disk before `latest` names it, and `latest` before older
    // checkpoints go.
    sync_dir(dir)?;
    atomic::write(&dir.join(LATEST), name.as_bytes())?;
    sync_dir(dir)?;
    prune(dir, keep, state.step)?;
    tracing::info!(step = state.step, path = %target.display(), "checkpoint saved");
    Ok(target)
}

/// Removes all but the newest `keep` checkpoints up to step `latest` (the one just saved,
/// never removed; in step order, not name order), and stale temporary directories.
fn prune(dir: &Path, keep: usize, latest: usize) -> Result<()> {
    let mut steps: Vec<(usize, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| TrainError::io(dir, e))? {
        let path = entry.map_err(|e| TrainError::io(dir, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(".tmp-step-") {
            std::fs::remove_dir_all(&path).map_err(|e| TrainError::io(&path, e))?;
        } else if let Some(step) = step_of(name).filter(|&s| s <= latest) {
            steps.push((step, path));
        }
    }
    steps.sort();
    let excess = steps.len().saturating_sub(keep.max(1));
    for (_, old) in &steps[..excess] {
        std::fs::remove_dir_all(old).map_err(|e| TrainError::io(old, e))?;
    }
    Ok(())
}

/// The checkpoint `latest` points at in `dir`, if any.
///
/// # Errors
/// [`TrainError::Checkpoint`] when `latest` names a checkpoint that is not there.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    let pointer = dir.join(LATEST);
    if !pointer.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&pointer).map_err(|e| TrainError::io(&pointer, e))?;
    let name = name.trim();
    // A checkpoint's own name only: never a path out of the checkpoint folder.
    if step_of(name).is_none() {
        return Err(TrainError::checkpoint(
            &pointer,
            format!("`latest` names `{name}`, not a checkpoint of this folder (step-N)"),
        ));
    }
    let path = dir.join(name);
    if !path.join("state.json").exists() {
        return Err(TrainError::checkpoint(
            &path,
            "`latest` points at a missing checkpoint; delete the directory to start over",
        ));
    }
    Ok(Some(path))
}

/// The checkpoints a resume may start from, newest first: the one `latest` names, then the
/// older ones in `dir` (a newer one may be damaged; the trainer passes over it).
pub fn candidates(dir: &Path) -> Result<Vec<PathBuf>> {
    let Some(newest) = latest(dir)? else {
        return Ok(Vec::new());
    };
    let top = newest
        .file_name()
        .and_then(|n| step_of(&n.to_string_lossy()))
        .expect("latest names a step");
    let mut older: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| TrainError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let step = step_of(&p.file_name()?.to_string_lossy())?;
            (step < top && p.join("state.json").exists()).then_some((step, p))
        })
        .collect();
    older.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    Ok(std::iter::once(newest)
        .chain(older.into_iter().map(|(_, p)| p))
        .collect())
}

/// Reads the checkpoint in `path`.
///
/// # Errors
/// [`TrainError::Checkpoint`] for a missing or unreadable part.
pub fn load(path: &Path) -> Result<Loaded> {
    let read = |name: &str| -> Result<ModuleRecord> {
        let p = path.join(name);
        ModuleRecord::load(&p).map_err(|e| TrainError::checkpoint(&p, e))
    };
    let p = path.join("state.json");
    let text = std::fs::read_to_string(&p).map_err(|e| TrainError::io(&p, e))?;
    let state: TrainState = serde_json::from_str(&text)
        .map_err(|e| TrainError::checkpoint(&p, format!("not a training state: {e}")))?;
    for (file, want) in &state.digests {
        let p = path.join(file);
        if !BPK_FILES.contains(&file.as_str()) {
            return Err(TrainError::checkpoint(&p, "not a checkpoint file"));
        }
        let got = format!("{:016x}", Fnv1a::of_file(&p)?);
        if got != *want {
            return Err(TrainError::checkpoint(
                &p,
                "its contents are not those this checkpoint recorded (damaged, or copied from \
                 another step)",
            ));
        }
    }
    let projection = if path.join("projection.bpk").exists() {
        Some(read("projection.bpk")?)
    } else {
        None
    };
    let p = path.join("optimizer.bpk");
    let optimizer = OptimizerRecord::load(&p).map_err(|e| TrainError::checkpoint(&p, e))?;
    Ok(Loaded {
        state,
        student: read("student.bpk")?,
        projection,
        optimizer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_counts_steps_not_names_and_keeps_the_latest() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "step-999998",
            "step-999999",
            "step-1000000",
            "step-1000001",
            ".tmp-step-1000002",
            "notes",
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        // By name, step-1000000 sorts before step-999998 and would go first.
        prune(dir.path(), 2, 1_000_000).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        // A step past the latest (a crash between its rename and `latest`) is left for the
        // run to write again.
        assert_eq!(
            left,
            ["notes", "step-1000000", "step-1000001", "step-999999"]
        );
        assert_eq!(step_of("step-000042"), Some(42));
        assert_eq!(step_of("step-x"), None);
    }
}
