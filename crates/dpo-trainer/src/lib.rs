//! DPO training: sequence log-probs, the loss family, the optimizer, and the loop.
//!
//! - [`logprobs`]: per-sequence completion log-probs from hidden states (chunked LM head).
//! - [`loss`]: the DPO losses as pure functions of per-pair log-probs.
//! - [`optim`]: AdamW with HF Trainer's decay groups, gradient clipping by global norm.
//! - [`schedule`]: learning-rate schedules.

pub mod logprobs;
pub mod loss;
pub mod optim;
pub mod schedule;
