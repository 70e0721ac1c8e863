//! Where a step's time goes. `DPO_TRAIN_PROFILE=1` times the phases of a training step (the
//! trainer's: batch, reference, policy forward, LM head and loss, backward, clip, AdamW);
//! `DPO_TRAIN_PROFILE=ops` also splits each phase into the model's ops (linear layers, norms,
//! RoPE, attention, SiLU gate, log-probs, and their backward), with `other` for what runs
//! between them (casts, copies, residual adds, candle's own backward rules).
//!
//! A lap recorder, one per thread. [`start`] begins a step; [`phase`] ends a phase, which holds
//! the ops timed since the previous phase mark; an [`op`] guard marks where an op starts (the
//! time before it, since the previous op, is `other`) and ends (an op inside another counts in
//! the outer one). A [`kernel`] guard inside an op times one of the op's kernels into a list of
//! its own (the op's time holds it too): where an op of several kernels (the flash attention's)
//! spends its time. [`take`] (and [`report`]) books the marks of the step.
//!
//! Two clocks. On a CUDA device each mark is an event recorded into the device's stream: the
//! device's own clock, read only when the step is booked, so nothing is synchronized between
//! the marks and the launches still run ahead of the device as in an unprofiled step (an op's
//! time is then the device's time from the previous mark to its end, which includes any wait
//! for the host). Elsewhere, and with `DPO_TRAIN_PROFILE_CLOCK=host`, every mark synchronizes
//! the device and reads the host's clock: a profiled step is slower than a plain one, so read
//! the shares, not the sum. Off, a mark costs one thread-local read.
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
//! let booked = profile::take()?;
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
    /// The host's time over the same spans. On the device's clock: what the host took to issue
    /// the phase's work, plus any wait for the device inside it (a value read back); about
    /// `seconds` means the device waited for the host. On the host's clock: `seconds`.
    pub host_seconds: f64,
    pub count: u32,
    pub ops: Vec<Lap>,
}

/// What a mark marks.
#[derive(Debug, Clone, Copy)]
enum Mark {
    Start,
    Phase(&'static str),
    OpStart,
    OpEnd(&'static str),
    KernelStart,
    KernelEnd(&'static str),
}

/// A mark and when it happened: the host's time, and on the device's clock the event recorded
/// into its stream (on the host's clock the host's time, taken after a synchronization, is the
/// step's).
struct Stamp {
    mark: Mark,
    host: Instant,
    #[cfg(feature = "cuda")]
    event: Option<cudarc::driver::CudaEvent>,
}

/// The step's clock, chosen by [`start`] from its device.
enum Clock {
    Host,
    #[cfg(feature = "cuda")]
    Events(std::sync::Arc<cudarc::driver::CudaStream>),
}

struct Laps {
    level: Level,
    /// Ops entered and not left; only the outermost is timed.
    depth: usize,
    /// From [`start`] until the step is booked; `None` outside a step (an evaluation between
    /// steps, the reference's precompute pass): marks are not kept.
    clock: Option<Clock>,
    marks: Vec<Stamp>,
    /// Events of booked marks, recorded again by later ones.
    #[cfg(feature = "cuda")]
    spare: Vec<cudarc::driver::CudaEvent>,
}

thread_local! {
    static LAPS: RefCell<Laps> = RefCell::new(Laps {
        level: level_from_env(),
        depth: 0,
        clock: None,
        marks: Vec::new(),
        #[cfg(feature = "cuda")]
        spare: Vec::new(),
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

impl Laps {
    /// Appends `mark` at the current time of the step's clock (none outside a step).
    fn mark(&mut self, device: &Device, mark: Mark) -> Result<()> {
        #[cfg(feature = "cuda")]
        let mut event = None;
        match &self.clock {
            None => return Ok(()),
            Some(Clock::Host) => device.synchronize()?,
            #[cfg(feature = "cuda")]
            Some(Clock::Events(stream)) => {
                let e = match self.spare.pop() {
                    Some(e) => e,
                    None => stream
                        .context()
                        .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                        .map_err(candle_core::Error::wrap)?,
                };
                e.record(stream).map_err(candle_core::Error::wrap)?;
                event = Some(e);
            }
        }
        self.marks.push(Stamp {
            mark,
            host: Instant::now(),
            #[cfg(feature = "cuda")]
            event,
        });
        Ok(())
    }

    /// Each mark's time in seconds after the first, on the step's clock and on the host's; the
    /// events go back to `spare`.
    fn seconds(&mut self) -> Result<Vec<(Mark, f64, f64)>> {
        let marks = std::mem::take(&mut self.marks);
        let Some(first) = marks.first() else { return Ok(Vec::new()) };
        let mut out = Vec::with_capacity(marks.len());
        for m in &marks {
            let host = (m.host - first.host).as_secs_f64();
            #[cfg(feature = "cuda")]
            if let (Some(a), Some(b)) = (&first.event, &m.event) {
                out.push((
                    m.mark,
                    f64::from(a.elapsed_ms(b).map_err(candle_core::Error::wrap)?) * 1e-3,
                    host,
                ));
                continue;
            }
            out.push((m.mark, host, host));
        }
        #[cfg(feature = "cuda")]
        self.spare.extend(marks.into_iter().filter_map(|m| m.event));
        Ok(out)
    }
}

/// At `at` or above: appends `mark` to this thread's recorder.
fn mark(device: &Device, at: Level, mark: Mark) -> Result<()> {
    LAPS.with(|l| {
        let mut l = l.borrow_mut();
        if l.level < at {
            return Ok(());
        }
        l.mark(device, mark)
    })
}

/// Starts a step on `device`'s clock and forgets the marks of the previous one.
pub fn start(device: &Device) -> Result<()> {
    LAPS.with(|l| {
        let mut l = l.borrow_mut();
        if l.level == Level::Off {
            return Ok(());
        }
        l.seconds()?; // recycles the events
        l.depth = 0;
        l.clock = Some(clock(device));
        l.mark(device, Mark::Start)
    })
}

/// The clock for a step on `device`: its stream's events on CUDA (unless
/// `DPO_TRAIN_PROFILE_CLOCK=host`), the host's elsewhere.
fn clock(device: &Device) -> Clock {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device
        && std::env::var("DPO_TRAIN_PROFILE_CLOCK").as_deref() != Ok("host")
    {
        return Clock::Events(dev.cuda_stream());
    }
    let _ = device;
    Clock::Host
}

/// Whether this thread's step runs on the device's clock (its stream's events).
pub(crate) fn on_events() -> bool {
    #[cfg(feature = "cuda")]
    return LAPS.with(|l| matches!(l.borrow().clock, Some(Clock::Events(_))));
    #[cfg(not(feature = "cuda"))]
    false
}

/// Ends the phase `name`: it holds the time since the previous phase mark, and the ops marked
/// since then (the time after the last of them as `other`).
pub fn phase(device: &Device, name: &'static str) -> Result<()> {
    mark(device, Level::Phases, Mark::Phase(name))
}

/// Times the op `name` until the guard drops, at [`Level::Ops`]. A failed mark is not reported
/// here: the next use of the device reports it.
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
    let _ = mark(device, Level::Ops, Mark::OpStart);
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
            let _ = mark(device, Level::Ops, Mark::OpEnd(name));
        }
        if self.counted {
            LAPS.with(|l| {
                let mut l = l.borrow_mut();
                l.depth = l.depth.saturating_sub(1);
            });
        }
    }
}

/// Times a kernel (or a few) of an op until the guard drops, at [`Level::Ops`], into the kernel
/// list of [`report`].
pub fn kernel(device: &Device, name: &'static str) -> KernelGuard {
    if level() != Level::Ops || mark(device, Level::Ops, Mark::KernelStart).is_err() {
        return KernelGuard(None);
    }
    KernelGuard(Some((device.clone(), name)))
}

/// See [`kernel`].
#[must_use = "the kernel is timed until the guard drops"]
pub struct KernelGuard(Option<(Device, &'static str)>);

impl Drop for KernelGuard {
    fn drop(&mut self) {
        if let Some((device, name)) = self.0.take() {
            let _ = mark(&device, Level::Ops, Mark::KernelEnd(name));
        }
    }
}

/// The phases booked from the marks since [`start`] and the kernels timed, in the order first
/// seen, and whether they are on the device's clock; ends the step (marks are no longer kept).
/// Reads the device's clock: waits for the device to reach the last mark.
fn book() -> Result<(Vec<Phase>, Vec<Lap>, bool)> {
    let events = on_events();
    let marks = LAPS.with(|l| {
        let mut l = l.borrow_mut();
        l.clock = None;
        l.seconds()
    })?;
    let (mut booked, mut kernels, mut pending) = (Vec::<Phase>::new(), Vec::new(), Vec::new());
    let (mut last_phase, mut last_host, mut last_op, mut kernel_starts) = (0.0, 0.0, 0.0, Vec::new());
    for (mark, t, host) in marks {
        match mark {
            Mark::Start => (last_phase, last_host, last_op) = (t, host, t),
            Mark::OpStart => {
                add(&mut pending, "other", t - last_op, 1);
                last_op = t;
            }
            Mark::OpEnd(name) => {
                add(&mut pending, name, t - last_op, 1);
                last_op = t;
            }
            Mark::KernelStart => kernel_starts.push(t),
            Mark::KernelEnd(name) => {
                let t0 = kernel_starts.pop().unwrap_or(t);
                add(&mut kernels, name, t - t0, 1);
            }
            Mark::Phase(name) => {
                let mut ops = std::mem::take(&mut pending);
                if !ops.is_empty() {
                    add(&mut ops, "other", t - last_op, 1);
                }
                let (seconds, host_seconds) = (t - last_phase, host - last_host);
                (last_phase, last_host, last_op) = (t, host, t);
                match booked.iter_mut().find(|p| p.name == name) {
                    Some(p) => {
                        p.seconds += seconds;
                        p.host_seconds += host_seconds;
                        p.count += 1;
                        for op in ops {
                            add(&mut p.ops, op.name, op.seconds, op.count);
                        }
                    }
                    None => booked.push(Phase { name, seconds, host_seconds, count: 1, ops }),
                }
            }
        }
    }
    Ok((booked, kernels, events))
}

/// The phases booked since [`start`]; forgets them.
pub fn take() -> Result<Vec<Phase>> {
    Ok(book()?.0)
}

/// [`take`] as text: one line of phases (on the device's clock, a second with the host's time
/// per phase, [`Phase::host_seconds`]), then at [`Level::Ops`] a line per phase with its ops,
/// longest first (milliseconds, and the number of laps where more than one), and one of the
/// [`kernel`]s timed, if any. `None` when off.
pub fn report(step: u64) -> Result<Option<String>> {
    if level() == Level::Off {
        return Ok(None);
    }
    let (phases, kernels, events) = book()?;
    let ms = |s: f64| format!("{:.1}ms", s * 1e3);
    let mut out = format!("profile step {step}:");
    for p in &phases {
        let _ = write!(out, " {}={}", p.name, ms(p.seconds));
    }
    if events {
        let _ = write!(out, "\nprofile step {step} host:");
        for p in &phases {
            let _ = write!(out, " {}={}", p.name, ms(p.host_seconds));
        }
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
    Ok(Some(out))
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
        let booked = take().unwrap();
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
            assert!((p.host_seconds - p.seconds).abs() < 1e-3, "the host's clock: {p:?}");
        }
        assert!(take().unwrap().is_empty(), "take forgets");
        // Between steps (an evaluation) nothing is kept, nor synchronized.
        drop(op(&dev, "eval"));
        phase(&dev, "eval").unwrap();
        assert!(take().unwrap().is_empty(), "marks between steps");
    }

    #[test]
    fn phases_only_and_off_book_no_ops() {
        let dev = Device::Cpu;
        set_level(Level::Phases);
        start(&dev).unwrap();
        drop(op(&dev, "a"));
        phase(&dev, "p").unwrap();
        let booked = take().unwrap();
        assert_eq!(booked.len(), 1);
        assert!(booked[0].ops.is_empty());
        set_level(Level::Off);
        start(&dev).unwrap();
        drop(op(&dev, "a"));
        phase(&dev, "p").unwrap();
        assert!(take().unwrap().is_empty());
        assert_eq!(report(1).unwrap(), None);
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
        let text = report(7).unwrap().unwrap();
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
        let text = report(3).unwrap().unwrap();
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
        assert_eq!(report(4).unwrap().unwrap().lines().count(), 1, "no kernels below Level::Ops");
        set_level(Level::Off);
    }
}
