//! Where a step's time goes. `DPO_TRAIN_PROFILE=1` times the phases of a training step (the
//! trainer's: batch, reference, policy forward, LM head and loss, backward, clip, AdamW);
//! `DPO_TRAIN_PROFILE=ops` also splits each phase into the model's ops (linear layers, norms,
//! RoPE, attention, SiLU gate, log-probs, and their backward), with `other` for what runs
//! between them (casts, copies, residual adds, candle's own backward rules).
//!
//! A lap recorder, one per thread. [`phase`] books the time since the previous phase mark under
//! the phase's name, and the ops timed since then under it; an [`op`] guard books the time before
//! it as `other` and its own time under its name (an op inside another counts in the outer one).
//! A [`kernel`] guard inside an op times one of the op's kernels into a list of its own (the op's
//! time holds it too): where an op of several kernels (the flash attention's) spends its time.
//! Every mark synchronizes the device, which removes the overlap of the CPU's kernel launches
//! with the device's work: a profiled step is slower than a plain one, so read the shares, not
//! the sum. Off, a mark costs one thread-local read.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use dpo_model::profile::{self, Level};
//!
//! let dev = Device::Cpu;
//! profile::set_level(Level::Ops);
//! profile::start(&dev)?;
//! let x = Tensor::ones((4, 8), candle_core::DType::F32, &dev)?;
//! let w = Tensor::ones(8, candle_core::DType::F32, &dev)?;
//! let y = dpo_model::ops::rms_norm(&x, &w, 1e-6)?; // one op: `rms_norm`
//! profile::phase(&dev, "forward")?;
//! let booked = profile::take();
//! assert_eq!(booked.len(), 1);
//! assert_eq!(booked[0].name, "forward");
//! let ops: Vec<_> = booked[0].ops.iter().map(|o| (o.name, o.count)).collect();
//! assert_eq!(ops, [("other", 2), ("rms_norm", 1)]);
//! # assert_eq!(y.dims(), [4, 8]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use std::cell::RefCell;
use std::fmt::Write as _;
use std::time::Instant;

use candle_core::{Device, Result};

/// What `DPO_TRAIN_PROFILE` asks to time: unset (or `0`) nothing, `ops` phases and ops, any
/// other value phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Off,
    Phases,
    Ops,
}

/// Time booked under one name: seconds in all, and how many laps.
#[derive(Debug, Clone, PartialEq)]
pub struct Lap {
    pub name: &'static str,
    pub seconds: f64,
    pub count: u32,
}

/// A phase's time and, at [`Level::Ops`], its ops' (in the order first seen).
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub name: &'static str,
    pub seconds: f64,
    pub count: u32,
    pub ops: Vec<Lap>,
}

struct Laps {
    level: Level,
    /// Ops entered and not left; only the outermost is timed.
    depth: usize,
    last_phase: Instant,
    last_op: Instant,
    /// Ops since the last phase mark.
    pending: Vec<Lap>,
    booked: Vec<Phase>,
    /// Kernels timed by [`kernel`] since [`start`].
    kernels: Vec<Lap>,
}

thread_local! {
    static LAPS: RefCell<Laps> = RefCell::new(Laps {
        level: level_from_env(),
        depth: 0,
        last_phase: Instant::now(),
        last_op: Instant::now(),
        pending: Vec::new(),
        booked: Vec::new(),
        kernels: Vec::new(),
    });
}

fn level_from_env() -> Level {
    match std::env::var("DPO_TRAIN_PROFILE") {
        Err(_) => Level::Off,
        Ok(v) if v.is_empty() || v == "0" => Level::Off,
        Ok(v) if v == "ops" => Level::Ops,
        Ok(_) => Level::Phases,
    }
}

fn add(laps: &mut Vec<Lap>, name: &'static str, seconds: f64, count: u32) {
    match laps.iter_mut().find(|l| l.name == name) {
        Some(l) => {
            l.seconds += seconds;
            l.count += count;
        }
        None => laps.push(Lap { name, seconds, count }),
    }
}

/// This thread's level (from `DPO_TRAIN_PROFILE` until [`set_level`]).
pub fn level() -> Level {
    LAPS.with(|l| l.borrow().level)
}

/// Sets this thread's level.
pub fn set_level(level: Level) {
    LAPS.with(|l| l.borrow_mut().level = level);
}

/// At `at` or above: synchronizes `device`, then runs `f` on this thread's recorder and the time.
fn synced(device: &Device, at: Level, f: impl FnOnce(&mut Laps, Instant)) -> Result<()> {
    if level() < at {
        return Ok(());
    }
    device.synchronize()?;
    LAPS.with(|l| f(&mut l.borrow_mut(), Instant::now()));
    Ok(())
}

/// Starts a step: synchronizes the device and forgets what was booked.
pub fn start(device: &Device) -> Result<()> {
    synced(device, Level::Phases, |l, now| {
        (l.last_phase, l.last_op, l.depth) = (now, now, 0);
        l.pending.clear();
        l.booked.clear();
        l.kernels.clear();
    })
}

/// Ends the phase `name`: synchronizes, books the time since the previous phase mark and the
/// ops timed since then (the time after the last of them as `other`).
pub fn phase(device: &Device, name: &'static str) -> Result<()> {
    synced(device, Level::Phases, |l, now| {
        let (seconds, tail) = ((now - l.last_phase).as_secs_f64(), (now - l.last_op).as_secs_f64());
        let mut ops = std::mem::take(&mut l.pending);
        if l.level == Level::Ops && !ops.is_empty() {
            add(&mut ops, "other", tail, 1);
        }
        (l.last_phase, l.last_op) = (now, now);
        match l.booked.iter_mut().find(|p| p.name == name) {
            Some(p) => {
                p.seconds += seconds;
                p.count += 1;
                for op in ops {
                    add(&mut p.ops, op.name, op.seconds, op.count);
                }
            }
            None => l.booked.push(Phase { name, seconds, count: 1, ops }),
        }
    })
}

/// Books the time since the last op mark under `name` in the current phase.
fn lap(l: &mut Laps, now: Instant, name: &'static str) {
    let seconds = (now - l.last_op).as_secs_f64();
    add(&mut l.pending, name, seconds, 1);
    l.last_op = now;
}

/// Times the op `name` until the guard drops, at [`Level::Ops`]. A failed synchronization is
/// not reported here: the next use of the device reports it.
pub fn op(device: &Device, name: &'static str) -> OpGuard {
    let (counted, outermost) = LAPS.with(|l| {
        let mut l = l.borrow_mut();
        if l.level != Level::Ops {
            return (false, false);
        }
        l.depth += 1;
        (true, l.depth == 1)
    });
    if !outermost {
        return OpGuard { timed: None, counted };
    }
    let _ = synced(device, Level::Ops, |l, now| lap(l, now, "other"));
    OpGuard { timed: Some((device.clone(), name)), counted }
}

/// See [`op`].
#[must_use = "the op is timed until the guard drops"]
pub struct OpGuard {
    timed: Option<(Device, &'static str)>,
    /// Whether [`op`] counted this guard in the depth.
    counted: bool,
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        if let Some((device, name)) = &self.timed {
            let _ = synced(device, Level::Ops, |l, now| lap(l, now, name));
        }
        if self.counted {
            LAPS.with(|l| {
                let mut l = l.borrow_mut();
                l.depth = l.depth.saturating_sub(1);
            });
        }
    }
}

/// Times a kernel (or a few) of an op until the guard drops, at [`Level::Ops`]: synchronizes
/// before and after and books the time under `name` in the kernel list of [`report`].
pub fn kernel(device: &Device, name: &'static str) -> KernelGuard {
    if level() != Level::Ops || device.synchronize().is_err() {
        return KernelGuard(None);
    }
    KernelGuard(Some((device.clone(), name, Instant::now())))
}

/// See [`kernel`].
#[must_use = "the kernel is timed until the guard drops"]
pub struct KernelGuard(Option<(Device, &'static str, Instant)>);

impl Drop for KernelGuard {
    fn drop(&mut self) {
        if let Some((device, name, t0)) = self.0.take()
            && device.synchronize().is_ok()
        {
            let seconds = t0.elapsed().as_secs_f64();
            LAPS.with(|l| add(&mut l.borrow_mut().kernels, name, seconds, 1));
        }
    }
}

/// What was booked since [`start`], and forgets it.
pub fn take() -> Vec<Phase> {
    LAPS.with(|l| std::mem::take(&mut l.borrow_mut().booked))
}

/// [`take`] as text: one line of phases, then at [`Level::Ops`] a line per phase with its ops,
/// longest first (milliseconds, and the number of laps where more than one), and one of the
/// [`kernel`]s timed, if any. `None` when off.
pub fn report(step: u64) -> Option<String> {
    if level() == Level::Off {
        return None;
    }
    let phases = take();
    let kernels = LAPS.with(|l| std::mem::take(&mut l.borrow_mut().kernels));
    let ms = |s: f64| format!("{:.1}ms", s * 1e3);
    let mut out = format!("profile step {step}:");
    for p in &phases {
        let _ = write!(out, " {}={}", p.name, ms(p.seconds));
    }
    let lines = phases.iter().map(|p| (p.name, &p.ops)).chain([("kernels", &kernels)]);
    for (name, laps) in lines.filter(|(_, laps)| !laps.is_empty()) {
        let mut laps = laps.clone();
        laps.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        let _ = write!(out, "\nprofile step {step} {name}:");
        for o in laps {
            let n = if o.count > 1 { format!("/{}", o.count) } else { String::new() };
            let _ = write!(out, " {}={}{n}", o.name, ms(o.seconds));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::sleep;
    use std::time::Duration;

    fn ms(n: u64) {
        sleep(Duration::from_millis(n));
    }

    #[test]
    fn phases_hold_their_ops_and_nested_ops_count_in_the_outer_one() {
        let dev = Device::Cpu;
        set_level(Level::Ops);
        start(&dev).unwrap();
        ms(5); // other
        {
            let _a = op(&dev, "a");
            ms(10);
            let _inner = op(&dev, "inner"); // counts in `a`
            ms(10);
        }
        phase(&dev, "first").unwrap();
        {
            let _b = op(&dev, "b");
            ms(5);
        }
        ms(5); // other, after the last op
        phase(&dev, "second").unwrap();
        phase(&dev, "first").unwrap(); // a phase again adds to it
        let booked = take();
        let names: Vec<_> = booked.iter().map(|p| (p.name, p.count)).collect();
        assert_eq!(names, [("first", 2), ("second", 1)]);
        let first: Vec<_> = booked[0].ops.iter().map(|o| o.name).collect();
        assert_eq!(first, ["other", "a"]);
        let a = &booked[0].ops[1];
        assert!(a.seconds >= 0.020 && a.count == 1, "{a:?}");
        let second: Vec<_> = booked[1].ops.iter().map(|o| (o.name, o.count)).collect();
        assert_eq!(second, [("other", 2), ("b", 1)]);
        for p in &booked {
            let sum: f64 = p.ops.iter().map(|o| o.seconds).sum();
            assert!((sum - p.seconds).abs() < 1e-3, "{p:?}");
        }
        assert!(take().is_empty(), "take forgets");
    }

    #[test]
    fn phases_only_and_off_book_no_ops() {
        let dev = Device::Cpu;
        set_level(Level::Phases);
        start(&dev).unwrap();
        drop(op(&dev, "a"));
        phase(&dev, "p").unwrap();
        let booked = take();
        assert_eq!(booked.len(), 1);
        assert!(booked[0].ops.is_empty());
        set_level(Level::Off);
        start(&dev).unwrap();
        drop(op(&dev, "a"));
        phase(&dev, "p").unwrap();
        assert!(take().is_empty());
        assert_eq!(report(1), None);
    }

    #[test]
    fn report_lists_phases_then_each_phase_s_ops_longest_first() {
        let dev = Device::Cpu;
        set_level(Level::Ops);
        start(&dev).unwrap();
        for _ in 0..2 {
            let _g = op(&dev, "slow");
            ms(5);
        }
        phase(&dev, "fwd").unwrap();
        let text = report(7).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("profile step 7: fwd="), "{text}");
        assert!(lines[1].starts_with("profile step 7 fwd: slow="), "{text}");
        assert!(lines[1].contains("ms/2"), "{text}");
    }

    #[test]
    fn kernels_inside_an_op_get_a_line_of_their_own() {
        let dev = Device::Cpu;
        set_level(Level::Ops);
        start(&dev).unwrap();
        {
            let _g = op(&dev, "attention");
            for _ in 0..2 {
                let _k = kernel(&dev, "fwd");
                ms(5);
            }
            let _k = kernel(&dev, "bwd");
            ms(2);
        }
        phase(&dev, "backward").unwrap();
        let text = report(3).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("profile step 3: backward=") && !lines[0].contains("kernels"), "{text}");
        assert!(lines[1].starts_with("profile step 3 backward: attention="), "{text}");
        assert!(
            lines[2].starts_with("profile step 3 kernels: fwd=") && lines[2].contains("ms/2 bwd="),
            "{text}"
        );
        set_level(Level::Phases);
        start(&dev).unwrap();
        drop(kernel(&dev, "fwd"));
        phase(&dev, "p").unwrap();
        assert_eq!(report(4).unwrap().lines().count(), 1, "no kernels below Level::Ops");
        set_level(Level::Off);
    }
}
