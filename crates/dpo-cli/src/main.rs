//! `dpo-train --config <file.toml> [--set key=value ...]`: DPO fine-tuning of a Hugging Face
//! causal LM on preference pairs. See the README for the config keys.

mod config;
mod doctor;
mod experiment;
mod hub;
mod inspect;
mod interrupt;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use dpo_trainer::{Resume, Trainer};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "dpo-train",
    version,
    about = "Direct Preference Optimization for Hugging Face causal LMs, on candle",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(flatten)]
    train: TrainArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Train: `dpo-train --config <file.toml> [--set key=value ...]`.
#[derive(clap::Args, Debug)]
struct TrainArgs {
    /// The run's TOML config (see configs/).
    #[arg(long, required = true)]
    config: Option<PathBuf>,
    /// Override a config key, e.g. `--set max_steps=4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue from a checkpoint folder, or `latest` in output_dir.
    #[arg(long, value_name = "DIR|latest")]
    resume: Option<PathBuf>,
    /// With --resume: accept hyperparameters that differ from the checkpoint's.
    #[arg(long, requires = "resume")]
    resume_allow_changed: bool,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Train (the same as the top-level `--config` form).
    Train(TrainArgs),
    /// Look at the training data as the trainer sees it.
    Data {
        #[command(subcommand)]
        command: inspect::DataCommand,
    },
    /// Experiments that show the paper's claims (see docs/paper.md).
    Experiment {
        #[command(subcommand)]
        which: experiment::Experiment,
    },
    /// Check the fused ops (values and gradients) on a device against the slow path and the CPU.
    Doctor {
        /// cpu, cuda or cuda:N (default: cuda when this binary has CUDA support, else cpu).
        #[arg(long, default_value_t = doctor::default_device())]
        device: String,
    },
    /// Upload a model folder (a run's `final/` or a checkpoint) to the Hugging Face Hub.
    Push(hub::PushArgs),
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    let done = |r: Result<()>| r.map(|()| ExitCode::SUCCESS);
    let result = match cli.command {
        None => train(cli.train),
        Some(Command::Train(args)) => train(args),
        Some(Command::Data { command }) => done(inspect::run(command)),
        Some(Command::Experiment { which }) => done(experiment::run(which)),
        Some(Command::Doctor { device }) => done(doctor::run(&device)),
        Some(Command::Push(args)) => done(init_logging("info").and_then(|()| hub::push(args))),
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {}", message(&e));
        ExitCode::FAILURE
    })
}

/// `context: error: cause` down the chain, without a cause that its parent's message already
/// ends with (the library errors print their I/O source themselves: `{path}: {source}`).
fn message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain().map(ToString::to_string) {
        if out.is_empty() {
            out = cause;
        } else if !out.ends_with(&cause) {
            out = format!("{out}: {cause}");
        }
    }
    out
}

/// Trains; a run stopped by SIGINT or SIGTERM (with a checkpoint) exits with `128 + signal`.
fn train(args: TrainArgs) -> Result<ExitCode> {
    let path = args.config.context("--config is required")?;
    let mut cfg = config::load(&path, &args.overrides)?;
    let mut progress = progress::Progress::new(cfg.progress_bar);
    // With a bar, per-step metric lines go above it instead of through tracing.
    init_logging(if progress.is_bar() { "info,dpo_train::metrics=warn" } else { "info" })?;
    hub::resolve_model(&mut cfg)?;
    // Before training, so that a missing token fails now rather than after the run.
    let mut pusher = hub::Pusher::from_config(&cfg)?;
    let output_dir = cfg.output_dir.clone();
    let mut trainer = Trainer::new(cfg).context("setting up the run")?;
    let resume =
        args.resume.map(|checkpoint| Resume { checkpoint, allow_changed: args.resume_allow_changed });
    let mut observer = hub::HubObserver { inner: &mut progress, pusher: pusher.as_mut() };
    let summary = trainer.run(&mut observer, resume.as_ref()).context("training")?;
    progress.interrupt.disarm();
    let interrupt = progress.interrupt.clone();
    drop(progress);
    if summary["stopped_because"] == "interrupted" {
        tracing::warn!(
            "stopped by {} after step {} with a checkpoint of it; continue with `--resume latest`",
            interrupt.signal_name().unwrap_or_default(),
            summary["steps_run"]
        );
        return Ok(ExitCode::from(interrupt.exit_code().unwrap_or(1)));
    }
    tracing::info!(
        steps = %summary["steps_run"], stopped_because = %summary["stopped_because"],
        seconds = %format!("{:.1}", summary["wall_time_seconds"].as_f64().unwrap_or(0.0)),
        "done; outputs in {}", output_dir.display()
    );
    let skipped = trainer.skips();
    if skipped.total() > 0 {
        tracing::warn!("training rows skipped or dropped: {skipped}");
    }
    if let Some(pusher) = pusher.as_mut() {
        pusher.push_final(&output_dir, &summary)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A CPU training step (`train`, `experiment`) allocates and frees tensors of up to hundreds of MB. glibc's malloc
/// serves blocks above its mmap threshold (adaptive, at most 32 MiB) with fresh mappings and
/// hands a freed heap top above 128 KiB back to the kernel, so every step's tensors arrive as new
/// pages and their page faults cost 10-15% of a step (`scripts/bench-cpu.sh`, BENCHMARKS.md).
/// Freed memory stays in the heap for the next step instead; the peak is the same.
/// `DPO_TRAIN_MALLOC=default` keeps glibc's settings (to measure the difference).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var("DPO_TRAIN_MALLOC").as_deref() != Ok("default") {
        // SAFETY: mallopt only sets malloc parameters (glibc serializes it with allocation).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_TOP_PAD, 64 << 20);
        }
    }
}

/// Log lines to stderr; `RUST_LOG` overrides `default_filter`. hf-hub's per-request lines are
/// quieted (the Hub module logs its own; hf-hub's "retry exhausted" would show on each attempt).
fn init_logging(default_filter: &str) -> Result<()> {
    let filter =
        format!("{default_filter},hf_hub=warn,hf_hub::retry=off,hf_xet=warn,xet_client=warn,xet_data=warn");
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter)))
        .with_writer(std::io::stderr)
        .try_init()
        .map_err(|e| anyhow::anyhow!("setting up logging: {e}"))
}
