//! Hugging Face causal LMs (Llama, Qwen2, Mistral) as differentiable candle models.
//!
//! - [`ModelConfig`] reads `config.json` (transformers 4 and 5 layouts).
//! - [`Checkpoint`] finds and memory-maps `model.safetensors` or a sharded index.
//! - [`CausalLm`] is the forward pass. It returns **hidden states**, not logits: the trainer
//!   applies the LM head only where a log-prob is needed ([`CausalLm::lm_head`]).
//! - [`Policy`] wraps a model whose weights are [`candle_core::Var`]s; the reference is a
//!   separately loaded [`CausalLm`] of plain tensors, never a view of the policy.
//!
//! Every op on the forward path has a backward: candle's fused `rms_norm`, `rope`,
//! `softmax_last_dim` and `sdpa` silently drop gradients and are not used here; [`ops`] has
//! fused replacements with a backward (CPU and CUDA), switched by [`CausalLm::with_fused_ops`].

mod checkpoint;
mod config;
mod error;
mod mask;
mod matmul;
mod model;
pub mod ops;
pub mod profile;
pub mod rope;

pub use checkpoint::{Checkpoint, save_safetensors_atomic};
pub use config::{Arch, ModelConfig, RopeScaling};
pub use error::ModelError;
pub use mask::AttentionMask;
pub use matmul::{cublas_takes, matmul, matmul_bf16_f32};
pub use model::{
    CausalLm, FUSED_ON_CPU, Policy, accum_dtype, default_fused_ops, has_fused_kernels, parameter_shapes,
};

/// Parses `"f32"`, `"bf16"`, `"f16"` (also `"float32"`, `"bfloat16"`, `"float16"`).
pub fn parse_dtype(s: &str) -> Option<candle_core::DType> {
    use candle_core::DType;
    match s {
        "f32" | "float32" => Some(DType::F32),
        "bf16" | "bfloat16" => Some(DType::BF16),
        "f16" | "float16" => Some(DType::F16),
        _ => None,
    }
}
