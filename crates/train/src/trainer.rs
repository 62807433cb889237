//! A distillation run: data order, learning-rate schedule, periodic evaluation, checkpoints
//! and resume around [`DistillStep`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use moekit_distill::Distiller;
use moekit_llama::Llama;
use moekit_upcycle::WarmupCosine;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, RunIdentity, TrainState};
use crate::config::TrainConfig;
use crate::data::{DataOrder, TokenWindows};
use crate::error::{Result, TrainError};
use crate::eval::{EvalReport, evaluate};
use crate::step::{DistillStep, StepReport};
use crate::trainable::TrainableSet;

/// Follows a [`Trainer::run`].
pub trait TrainObserver {
    /// The run starts at step `first` (1-based; later than 1 when resumed) of `steps`.
    fn start(&mut self, _first: usize, _steps: usize) {}
    /// A step finished.
    fn step(&mut self, _report: &StepReport) {}
    /// An evaluation finished.
    fn eval(&mut self, _report: &EvalReport) {}
    /// A checkpoint was written.
    fn checkpoint(&mut self, _step: usize, _path: &Path) {}
}

/// An observer that logs through `tracing`.
pub struct LogObserver;

impl TrainObserver for LogObserver {
    fn step(&mut self, r: &StepReport) {
        tracing::info!(step = r.step, loss = r.loss, aux = r.aux, lr = r.lr, "step");
    }
    fn eval(&mut self, r: &EvalReport) {
        tracing::info!(step = r.step, perplexity = r.perplexity, kl = r.kl, "eval");
    }
}

/// What a finished run did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Steps done in total (including before a resume).
    pub steps: usize,
    /// The step this process started at (1 unless resumed).
    pub first_step: usize,
    /// Tokens trained on in total.
    pub tokens: u64,
    /// Wall time of this process's steps and evaluations, seconds.
    pub seconds: f64,
    /// Every evaluation, the last one at the end of training.
    pub evals: Vec<EvalReport>,
    /// The learning-rate schedule's length over the run: `(first step, total steps)`, one
    /// entry unless a rerun changed `steps` (see [`TrainState::schedule`]).
    pub schedule: Vec<(usize, usize)>,
    /// The last step's report.
    pub last: Option<StepReport>,
}

/// Distils a LLaMA / MoE student from a teacher.
///
/// The student trains on an autodiff version of its device, with only `trainable` requiring
/// gradients; the teacher stays on its own plain device. Each step takes `grad_accum`
/// micro-batches of `batch_size` windows in a seeded order ([`DataOrder`]); the learning rate
/// follows linear warm-up and cosine decay ([`WarmupCosine`]). With a checkpoint directory,
/// the run saves every `checkpoint_every` steps and at the end, and [`Trainer::resume`]
/// continues exactly where the last checkpoint left off (same parameters, optimiser moments,
/// data order and evaluation history).
pub struct Trainer {
    step: DistillStep,
    student: Llama,
    trainable: TrainableSet,
    config: TrainConfig,
    data: TokenWindows,
    eval_data: Option<TokenWindows>,
    order: DataOrder,
    done: usize,
    tokens: u64,
    evals: Vec<EvalReport>,
    /// See [`TrainSummary::schedule`].
    schedule: Vec<(usize, usize)>,
    checkpoints: Option<PathBuf>,
    source: Option<String>,
    /// `data.fingerprint()`, hashed once (every checkpoint records it).
    data_fingerprint: u64,
}

impl Trainer {
    /// A run of `config.steps` steps over `data` (windows of `config.seq_len`), evaluated on
    /// `eval_data` if given.
    ///
    /// # Errors
    /// [`TrainError::Config`] for a bad configuration, a trainable set that selects nothing
    /// or data windows of another length; [`TrainError::Data`] for data with fewer windows
    /// than a micro-batch or token ids past the vocabulary.
    pub fn new(
        teacher: Llama,
        student: Llama,
        distiller: Distiller,
        trainable: TrainableSet,
        config: TrainConfig,
        data: TokenWindows,
        eval_data: Option<TokenWindows>,
    ) -> Result<Self> {
        config.validate()?;
        if teacher.config.vocab_size != student.config.vocab_size {
            return Err(TrainError::Config(format!(
                "the teacher has {} tokens in its vocabulary, the student {}: they must share a tokenizer",
                teacher.config.vocab_size, student.config.vocab_size
            )));
        }
        for (what, w) in [
            ("training", Some(&data)),
            ("evaluation", eval_data.as_ref()),
        ] {
            let Some(w) = w else { continue };
            if w.seq_len() != config.seq_len {
                return Err(TrainError::Config(format!(
                    "{what} windows have {} tokens, the configuration {}",
                    w.seq_len(),
                    config.seq_len
                )));
            }
            let vocab = student.config.vocab_size;
            if w.max_token() as usize >= vocab {
                return Err(TrainError::Data(format!(
                    "the {what} text holds token id {}, past the models' vocabulary of {vocab}: \
                     was it tokenised for another model?",
                    w.max_token()
                )));
            }
        }
        if data.len() < config.batch_size {
            return Err(TrainError::Data(format!(
                "{} training windows of {} tokens, fewer than a batch of {}; give more text",
                data.len(),
                config.seq_len,
                config.batch_size
            )));
        }
        let data_fingerprint = data.fingerprint();
        let device = student.device().autodiff();
        let student = trainable.apply(student.fork(&device).train())?;
        let distiller = distiller.fork(&device).train();
        Ok(Self {
            step: DistillStep::new(teacher, distiller, &config),
            student,
            trainable,
            order: DataOrder::new(config.seed),
            schedule: vec![(1, config.steps)],
            config,
            data,
            eval_data,
            done: 0,
            tokens: 0,
            evals: Vec::new(),
            checkpoints: None,
            source: None,
            data_fingerprint,
        })
    }

    /// Saves checkpoints in `dir` (created if needed).
    pub fn with_checkpoints(mut self, dir: impl Into<PathBuf>) -> Self {
        self.checkpoints = Some(dir.into());
        self
    }

    /// Names what the run starts from (e.g. the student's and teacher's files with their
    /// sizes and times); a checkpoint resumes only a run with the same `source`.
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Trainable scalar parameters.
    pub fn trainable_params(&self) -> usize {
        self.trainable.count(&self.student)
    }

    /// Steps done.
    pub fn steps_done(&self) -> usize {
        self.done
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The student as it is now, for inference (no autodiff).
    pub fn student(&self) -> Llama {
        self.student.valid()
    }

    /// The teacher.
    pub fn teacher(&self) -> &Llama {
        &self.step.teacher
    }

    /// Mutable access to the training student (autodiff), e.g. to change routing between
    /// steps.
    pub fn student_mut(&mut self) -> &mut Llama {
        &mut self.student
    }

    /// Every evaluation so far.
    pub fn evals(&self) -> &[EvalReport] {
        &self.evals
    }

    fn identity(&self) -> RunIdentity {
        let d = &self.step.distiller.config;
        RunIdentity {
            trainable: self.trainable.to_string(),
            loss: d.loss.to_string(),
            batch_size: self.config.batch_size,
            seq_len: self.config.seq_len,
            grad_accum: self.config.grad_accum,
            windows: self.data.len(),
            params: self.trainable_params(),
            data: Some(self.data_fingerprint),
            distiller: Some(format!(
                "temperature {} alpha {} beta {} top_k {} layers {:?}",
                d.temperature, d.alpha, d.beta, d.top_k, d.layers
            )),
            source: self.source.clone(),
            optimizer: {
                let c = &self.config;
                Some(format!(
                    "lr {} warmup {} min_lr_ratio {} weight_decay {} betas {} {} max_grad_norm {:?} \
                     aux_weight {} seed {}",
                    c.lr,
                    c.warmup_steps,
                    c.min_lr_ratio,
                    c.weight_decay,
                    c.beta_1,
                    c.beta_2,
                    c.max_grad_norm,
                    c.aux_weight,
                    c.seed
                ))
            },
        }
    }

    /// Continues from the newest checkpoint in the checkpoint directory that reads whole, if
    /// there is one (a damaged newer one, or one whose files are not those it recorded, is
    /// passed over with a warning); returns the step it resumes after.
    ///
    /// # Errors
    /// [`TrainError::Checkpoint`] for a checkpoint of another run (trainable set, loss, batch
    /// shape, data or model differ), or the newest one's error when none can be read.
    pub fn resume(&mut self) -> Result<Option<usize>> {
        let Some(dir) = &self.checkpoints else {
            return Ok(None);
        };
        // The newest checkpoint that reads whole; a damaged newer one is passed over (with a
        // warning), and if none reads, the newest one's error is the answer.
        let mut first_error = None;
        let mut found = None;
        for path in checkpoint::candidates(dir)? {
            match checkpoint::load(&path) {
                Ok(loaded) => {
                    found = Some((path, loaded));
                    break;
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "checkpoint passed over");
                    first_error.get_or_insert(e);
                }
            }
        }
        let Some((path, loaded)) = found else {
            return match first_error {
                Some(e) => Err(e),
                None => Ok(None),
            };
        };
        let differences = self.identity().differences(&loaded.state.identity);
        if !differences.is_empty() {
            return Err(TrainError::checkpoint(
                &path,
                format!(
                    "made by a different run (its {} differ); use another output directory or delete it",
                    differences.join(", ")
                ),
            ));
        }
        // Everything is read before anything changes: a failed resume leaves the run as it was.
        let student = self
            .student
            .clone()
            .try_load_record(loaded.student.allow_partial(true))
            .map_err(|e| TrainError::checkpoint(&path, e))?;
        let projection = match (loaded.projection, &self.step.distiller.projection) {
            (Some(record), Some(projection)) => Some(
                projection
                    .clone()
                    .try_load_record(record)
                    .map_err(|e| TrainError::checkpoint(&path, e))?,
            ),
            (None, None) => None,
            _ => {
                return Err(TrainError::checkpoint(
                    &path,
                    "the checkpoint and this run disagree on a hidden-state projection",
                ));
            }
        };
        self.student = student;
        self.step.distiller.projection = projection;
        self.step.load_optimizer(loaded.optimizer);
        let state = loaded.state;
        if state.order.position > self.data.len() {
            return Err(TrainError::checkpoint(
                &path,
                format!(
                    "the data position {} is past the {} training windows",
                    state.order.position,
                    self.data.len()
                ),
            ));
        }
        self.done = state.step;
        self.order = state.order;
        self.tokens = state.tokens;
        self.evals = state.evals;
        // A run resumed with another length: the schedule stretches (or shrinks) from here on,
        // which the summary records.
        let mut schedule = state.schedule;
        if schedule
            .last()
            .is_none_or(|&(_, steps)| steps != self.config.steps)
        {
            if let Some(&(_, before)) = schedule.last() {
                tracing::warn!(
                    before,
                    now = self.config.steps,
                    from = self.done + 1,
                    "the run goes on with another number of steps: its learning-rate schedule \
                     changes length from here on"
                );
            }
            schedule.push((self.done + 1, self.config.steps));
        }
        self.schedule = schedule;
        tracing::info!(step = self.done, path = %path.display(), "resumed");
        Ok(Some(self.done))
    }

    /// Writes a checkpoint of the current state (needs a checkpoint directory).
    pub fn save_checkpoint(&self) -> Result<Option<PathBuf>> {
        let Some(dir) = &self.checkpoints else {
            return Ok(None);
        };
        let state = TrainState {
            step: self.done,
            order: self.order,
            tokens: self.tokens,
            evals: self.evals.clone(),
            schedule: self.schedule.clone(),
            identity: self.identity(),
            // Filled in by `checkpoint::save` from the files it writes.
            digests: Default::default(),
        };
        checkpoint::save(
            dir,
            &state,
            &self.student,
            self.trainable.group(),
            self.step.distiller.projection.as_ref(),
            self.step.optimizer().to_record(),
            self.config.keep_checkpoints,
        )
        .map(Some)
    }

    /// The learning-rate schedule.
    pub fn schedule(&self) -> WarmupCosine {
        let c = &self.config;
        WarmupCosine::new(c.lr, c.warmup_steps, c.steps, c.min_lr_ratio)
    }

    /// One optimiser step on the next batches.
    ///
    /// # Errors
    /// As [`DistillStep::step`]; on error the student and the data position are unchanged.
    pub fn train_step(&mut self) -> Result<StepReport> {
        let device = self.student.device();
        let mut order = self.order;
        let batches: Vec<_> = (0..self.config.grad_accum)
            .map(|_| {
                let ids = order.next(self.config.batch_size, self.data.len());
                self.data.batch(&ids, &device)
            })
            .collect();
        let step = self.done + 1;
        let lr = self.schedule().lr(self.done);
        let (student, report) = self.step.step(self.student.clone(), &batches, lr, step)?;
        self.student = student;
        self.order = order;
        self.done = step;
        self.tokens += report.tokens as u64;
        Ok(report)
    }

    /// Evaluates the current student on the evaluation windows (`None` without them).
    pub fn evaluate(&self) -> Result<Option<EvalReport>> {
        let Some(data) = &self.eval_data else {
            return Ok(None);
        };
        evaluate(
            &self.step.teacher,
            &self.student(),
            data,
            self.config.batch_size,
            self.done,
        )
        .map(Some)
    }

    /// Trains until `config.steps` are done (from wherever the run is), evaluating every
    /// `eval_every` steps and at the end, and checkpointing every `checkpoint_every` steps
    /// and at the end.
    ///
    /// # Errors
    /// The first step, evaluation or checkpoint error; the last checkpoint written stays the
    /// latest.
    pub fn run(&mut self, observer: &mut dyn TrainObserver) -> Result<TrainSummary> {
        let start = Instant::now();
        let first_step = self.done + 1;
        observer.start(first_step, self.config.steps);
        let mut last = None;
        if self.done == 0
            && let Some(r) = self.evaluate()?
        {
            observer.eval(&r);
            self.evals.push(r);
        }
        while self.done < self.config.steps {
            let r = self.train_step()?;
            observer.step(&r);
            last = Some(r);
            let at_end = self.done == self.config.steps;
            let every = |n: usize| n > 0 && self.done.is_multiple_of(n);
            if (every(self.config.eval_every) || at_end)
                && let Some(r) = self.evaluate()?
            {
                observer.eval(&r);
                self.evals.push(r);
            }
            if (every(self.config.checkpoint_every) || at_end)
                && let Some(path) = self.save_checkpoint()?
            {
                observer.checkpoint(self.done, &path);
            }
        }
        Ok(TrainSummary {
            steps: self.done,
            first_step,
            tokens: self.tokens,
            seconds: start.elapsed().as_secs_f64(),
            evals: self.evals.clone(),
            schedule: self.schedule.clone(),
            last,
        })
    }
}
