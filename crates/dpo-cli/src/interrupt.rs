//! SIGINT (Ctrl-C) and SIGTERM (what a scheduler sends before it kills a job) during training.
//!
//! The first signal asks the trainer to stop after the step it is running: it writes a
//! checkpoint of that step (even without `save_steps`) and no final model, and the process exits
//! with `128 + signal` (130, 143), so that `--resume latest` continues the run exactly. A second
//! signal exits at once; the newest complete checkpoint survives that too (checkpoints are written
//! to a temporary folder and renamed into place).
//!
//! Listening starts when the training loop does ([`Interrupt::listen`] from `on_start`): a signal
//! during setup stops the process as it always does, with nothing to lose. After the loop
//! ([`Interrupt::disarm`]: saving the final model, uploading it) the first signal exits at once
//! again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// The first stop signal received, if any (0: none yet), and whether one still means "stop after
/// this step" (armed) rather than "exit now".
#[derive(Debug, Default, Clone)]
pub struct Interrupt {
    signal: Arc<AtomicI32>,
    disarmed: Arc<AtomicBool>,
}

impl Interrupt {
    /// Starts a thread that records the first SIGINT or SIGTERM and exits on the second.
    #[cfg(unix)]
    pub fn listen() -> std::io::Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
        let this = Interrupt::default();
        let (seen, disarmed) = (this.signal.clone(), this.disarmed.clone());
        std::thread::Builder::new().name("dpo-signals".into()).spawn(move || {
            for sig in signals.forever() {
                if disarmed.load(Ordering::SeqCst) {
                    std::process::exit(128 + sig);
                }
                if seen.swap(sig, Ordering::SeqCst) != 0 {
                    eprintln!("\nsecond {}: exiting now (the newest complete checkpoint is kept)", name(sig));
                    std::process::exit(128 + sig);
                }
                eprintln!(
                    "\n{}: stopping after this step with a checkpoint of it (again to exit at once)",
                    name(sig)
                );
            }
        })?;
        Ok(this)
    }

    /// Signals are left to their default action where the signal thread is not available.
    #[cfg(not(unix))]
    pub fn listen() -> std::io::Result<Self> {
        Ok(Interrupt::default())
    }

    /// From now on a signal exits at once (the training loop is over).
    pub fn disarm(&self) {
        self.disarmed.store(true, Ordering::SeqCst);
    }

    /// The signal that asked to stop, if one did.
    pub fn signal(&self) -> Option<i32> {
        Some(self.signal.load(Ordering::SeqCst)).filter(|&s| s != 0)
    }

    /// The conventional exit status of a process stopped by that signal: `128 + signal`.
    pub fn exit_code(&self) -> Option<u8> {
        self.signal().map(|s| u8::try_from(128 + s).unwrap_or(1))
    }

    /// `SIGINT`, `SIGTERM` (or the number).
    pub fn signal_name(&self) -> Option<String> {
        self.signal().map(|s| name(s).to_string())
    }
}

fn name(sig: i32) -> std::borrow::Cow<'static, str> {
    match sig {
        2 => "SIGINT".into(),
        15 => "SIGTERM".into(),
        n => format!("signal {n}").into(),
    }
}
