//! DPO training: sequence log-probs, the loss family, the optimizer, and the loop.
//!
//! - [`logprobs`]: per-sequence completion log-probs from hidden states (chunked LM head).
//! - [`loss`]: the DPO losses as pure functions of per-pair log-probs.
//! - [`optim`]: AdamW with HF Trainer's decay groups, gradient clipping by global norm.
//! - [`schedule`]: learning-rate schedules.
//! - [`constraints`]: the run's constraint set as a record.
//! - [`memory`]: the memory a run holds (device pool or resident set), for the logs.
//! - [`gap`]: Prop. 3.1 on a tabular problem solved exactly (`dpo-train experiment constraint-gap`).
//! - [`trainer`]: setup and the loop; [`config`]: every knob.

pub mod checkpoint;
pub mod config;
pub mod constraints;
pub mod data_counts;
mod error;
pub mod gap;
pub mod logprobs;
pub mod loss;
pub mod memory;
pub mod metrics;
pub mod optim;
mod outputs;
pub mod ref_cache;
pub mod schedule;
pub mod step;
pub mod trainer;

pub use config::{HubStrategy, LossType, Precision, TrainConfig};
pub use error::{Result, TrainError};
pub use outputs::MODEL_SIDE_FILES;
pub use trainer::{Observer, Resume, Silent, StopReason, Trainer, parse_device};
