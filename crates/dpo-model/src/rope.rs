//! Rotary position embedding (RoPE), rotate-half convention, as transformers computes it:
//! `inv_freq_i = 1 / theta^(2i/d)` (rescaled per [`RopeScaling`]), angle `= position * inv_freq`,
//! `rope(x) = x * cos + rotate_half(x) * sin` with `rotate_half([x1, x2]) = [-x2, x1]`.
//! Tables are computed in f32, as transformers does, so long positions round the same way.

use candle_core::{D, DType, Device, Result, Tensor};

use crate::config::{ModelConfig, RopeScaling};

/// Inverse frequencies, `head_dim / 2` of them, in f32 like transformers.
pub fn inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    inv_freq_as::<f32>(cfg)
}

/// Inverse frequencies computed in `F` (f32 as transformers does; f64 for reference checks).
pub fn inv_freq_as<F: num_traits::Float + num_traits::FloatConst>(cfg: &ModelConfig) -> Vec<F> {
    let c = |x: f64| F::from(x).expect("float");
    let d = cfg.head_dim;
    let base = c(cfg.rope_theta);
    let plain: Vec<F> = (0..d).step_by(2).map(|i| F::one() / base.powf(c(i as f64) / c(d as f64))).collect();
    match cfg.rope_scaling {
        RopeScaling::Default => plain,
        RopeScaling::Linear { factor } => plain.iter().map(|&f| f / c(factor)).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, low, high, old) =
                (c(factor), c(low_freq_factor), c(high_freq_factor), c(original_max_position_embeddings));
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            plain
                .iter()
                .map(|&f| {
                    let wavelen = c(2.0) * F::PI() / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    // As transformers writes it (`~(a < b) & ~(a > c)`).
                    #[allow(clippy::neg_cmp_op_on_partial_ord)]
                    let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                    if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (F::one() - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

/// `cos` and `sin` tables for positions `0..seq_len`, each `[seq_len, head_dim]`
/// (`[freqs, freqs]` along the last axis), in `dtype`; computed in f32 (f64 when `dtype` is).
pub fn tables(cfg: &ModelConfig, seq_len: usize, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    if dtype == DType::F64 {
        tables_as::<f64>(cfg, seq_len, device)
    } else {
        let (c, s) = tables_as::<f32>(cfg, seq_len, device)?;
        Ok((c.to_dtype(dtype)?, s.to_dtype(dtype)?))
    }
}

fn tables_as<F: num_traits::Float + num_traits::FloatConst + candle_core::WithDType>(
    cfg: &ModelConfig,
    seq_len: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let inv = inv_freq_as::<F>(cfg);
    let half = inv.len();
    let mut cos = Vec::with_capacity(seq_len * 2 * half);
    let mut sin = Vec::with_capacity(seq_len * 2 * half);
    for p in 0..seq_len {
        for _ in 0..2 {
            for &f in &inv {
                let angle = F::from(p).expect("position") * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    let shape = (seq_len, 2 * half);
    Ok((Tensor::from_vec(cos, shape, device)?, Tensor::from_vec(sin, shape, device)?))
}

/// Applies RoPE to `x` of shape `[batch, heads, seq, head_dim]`; `cos`/`sin` are `[seq, head_dim]`
/// (or `[batch, seq, head_dim]` for per-row positions).
/// Built from differentiable ops only (candle's fused `rope` has no backward).
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    // Per-row tables `[rows, seq, d]` broadcast over the heads axis.
    let (cos, sin) =
        if cos.rank() == 3 { (cos.unsqueeze(1)?, sin.unsqueeze(1)?) } else { (cos.clone(), sin.clone()) };
    x.broadcast_mul(&cos)?.add(&rotated.broadcast_mul(&sin)?)
}
