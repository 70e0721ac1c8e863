//! AdamW with decoupled weight decay, owned here so its state can be saved and restored.
//!
//! For each parameter `p` with gradient `g` at step `t` (PyTorch's `torch.optim.AdamW`):
//! ```text
//! p <- p * (1 - lr * wd)                       (only parameters that decay)
//! m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
//! p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//! Moments are f32 whatever the parameter dtype. As the Hugging Face Trainer does, biases and
//! normalisation weights do not decay; everything else (embeddings included) does.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor, Var};
use dpo_model::ops::AdamWPart;

/// AdamW hyper-parameters (the learning rate comes with each step, from the schedule).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Whether the Hugging Face Trainer applies weight decay to a parameter of this name.
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("norm"))
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// The optimizer and its state.
pub struct AdamW {
    cfg: AdamWConfig,
    step: u64,
    slots: Vec<Slot>,
}

impl AdamW {
    pub fn new(params: &[(String, Var)], cfg: AdamWConfig) -> Result<Self> {
        let slots = params
            .iter()
            .map(|(name, var)| {
                // Two buffers: the fused CUDA update writes m and v in place, so clones of one
                // zero tensor (which share it) would be one moment.
                let zeros = || Tensor::zeros(var.shape(), DType::F32, var.device());
                Ok(Slot {
                    name: name.clone(),
                    var: var.clone(),
                    m: zeros()?,
                    v: zeros()?,
                    decay: decays(name),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { cfg, step: 0, slots })
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update from the gradients `grads[i] * factor` (`grads[i]` belongs to the i-th
    /// parameter given to [`AdamW::new`]; `factor` is `clip`'s, applied as each gradient is read
    /// rather than in a pass of its own). Where the gradient norm is not finite nothing is
    /// updated (the caller reports it, [`Clip::read`]). With a [`Clip::Device`] and f32
    /// parameters on CUDA, the update is queued in a launch per 16 parameters, and the factor
    /// is read where it is: nothing waits for the device.
    pub fn step(&mut self, grads: &[Tensor], lr: f64, clip: &Clip) -> Result<()> {
        assert_eq!(grads.len(), self.slots.len(), "one gradient per parameter");
        self.step += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.cfg;
        let t = self.step as i32;
        let step_size = lr / (1.0 - beta1.powi(t));
        let bc2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        let decay = |slot: &Slot| if slot.decay { 1.0 - lr * weight_decay } else { 1.0 };
        let grads = grads.iter().map(|g| g.to_dtype(DType::F32)?.contiguous()).collect::<Result<Vec<_>>>()?;
        if let Clip::Device(on_device) = clip {
            let parts: Vec<AdamWPart> = self
                .slots
                .iter()
                .zip(&grads)
                .map(|(s, g)| AdamWPart { p: s.var.as_tensor(), m: &s.m, v: &s.v, g, decay: decay(s) })
                .collect();
            if dpo_model::ops::adamw_fused(&parts, on_device, (beta1, beta2, eps), step_size, bc2_sqrt)? {
                return Ok(());
            }
        }
        let (norm, factor) = clip.read()?;
        if !norm.is_finite() {
            return Ok(());
        }
        for (slot, g) in self.slots.iter_mut().zip(grads) {
            let g = if factor != 1.0 { (g * factor)? } else { g };
            slot.m = ((&slot.m * beta1)? + (&g * (1.0 - beta1))?)?;
            slot.v = ((&slot.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let p = slot.var.as_tensor().to_dtype(DType::F32)?;
            let d = decay(slot);
            let p = if d != 1.0 { (p * d)? } else { p };
            let denom = ((slot.v.sqrt()? / bc2_sqrt)? + eps)?;
            let p = (p - ((&slot.m / denom)? * step_size)?)?;
            slot.var.set(&p.to_dtype(slot.var.dtype())?)?;
        }
        Ok(())
    }

    /// `m.<name>`, `v.<name>` for every parameter (for a checkpoint).
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(format!("m.{}", s.name), s.m.clone());
            out.insert(format!("v.{}", s.name), s.v.clone());
        }
        out
    }

    /// Restores moments and the step count saved by [`AdamW::state_tensors`].
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for s in &mut self.slots {
            for (key, slot) in [("m", &mut s.m), ("v", &mut s.v)] {
                let name = format!("{key}.{}", s.name);
                let t = state
                    .get(&name)
                    .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state has no `{name}`")))?;
                if t.shape() != slot.shape() {
                    candle_core::bail!(
                        "optimizer state `{name}` has shape {:?}, expected {:?}",
                        t.shape(),
                        slot.shape()
                    );
                }
                *slot = t.to_dtype(DType::F32)?.to_device(slot.device())?;
            }
        }
        self.step = step;
        Ok(())
    }

    /// The parameters that decay and those that do not, by name.
    pub fn groups(&self) -> (Vec<&str>, Vec<&str>) {
        let decay = self.slots.iter().filter(|s| s.decay).map(|s| s.name.as_str()).collect();
        let plain = self.slots.iter().filter(|s| !s.decay).map(|s| s.name.as_str()).collect();
        (decay, plain)
    }
}

/// The gradients' global L2 norm `sqrt(sum_i ||g_i||^2)` (before clipping) and PyTorch's
/// `clip_grad_norm_` factor `min(1, max_norm / (norm + 1e-6))` (1 when `max_norm <= 0`), which
/// [`AdamW::step`] applies to the gradients as it reads them.
pub enum Clip {
    /// Computed on the host.
    Host { norm: f64, factor: f64 },
    /// `[norm, factor]` (f64) on the device, with no synchronization: the update reads the
    /// factor there, and the host reads both once the step is queued. The factor is NaN when
    /// the norm is not finite.
    Device(Tensor),
}

impl Clip {
    /// The norm and factor of `grads`: on the device for f32 gradients on CUDA (a launch per 16
    /// gradients and one to add up), else on the host.
    pub fn of(grads: &[Tensor], max_norm: f64) -> Result<Clip> {
        if let Some(on_device) = dpo_model::ops::clip_fused(grads, max_norm)? {
            return Ok(Clip::Device(on_device));
        }
        let mut sq = 0f64;
        for g in grads {
            sq += g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        let norm = sq.sqrt();
        let factor = if max_norm > 0.0 { clip_factor(norm, max_norm) } else { 1.0 };
        Ok(Clip::Host { norm, factor })
    }

    /// `(norm, factor)` on the host (from the device, this waits for it).
    pub fn read(&self) -> Result<(f64, f64)> {
        match self {
            Clip::Host { norm, factor } => Ok((*norm, *factor)),
            Clip::Device(t) => dpo_model::ops::read_clip(t),
        }
    }
}

/// Global L2 norm of `tensors`, `sqrt(sum_i ||t_i||^2)`.
pub fn global_norm(tensors: &[Tensor]) -> Result<f64> {
    Ok(Clip::of(tensors, 0.0)?.read()?.0)
}

/// PyTorch's `clip_grad_norm_` factor for gradients of global norm `norm`:
/// `min(1, max_norm / (norm + 1e-6))`.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn decay_groups_follow_hf_trainer() {
        assert!(decays("model.embed_tokens.weight"));
        assert!(decays("model.layers.0.self_attn.q_proj.weight"));
        assert!(!decays("model.layers.0.self_attn.q_proj.bias"));
        assert!(!decays("model.layers.0.input_layernorm.weight"));
        assert!(!decays("model.norm.weight"));
    }

    #[test]
    fn two_adamw_steps_match_a_hand_computation() {
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let mut opt = AdamW::new(&[("w".into(), var.clone())], cfg).unwrap();
        let (mut p, mut m, mut v) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2]);
        let grads = [[0.5f64, -1.0], [0.25, 2.0]];
        for (t, g) in grads.iter().enumerate() {
            let no_clip = Clip::Host { norm: 1.0, factor: 1.0 };
            opt.step(&[Tensor::new(&[g[0] as f32, g[1] as f32], &Device::Cpu).unwrap()], 0.01, &no_clip)
                .unwrap();
            let t = (t + 1) as i32;
            for i in 0..2 {
                p[i] *= 1.0 - 0.01 * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let denom = (v[i].sqrt() / (1.0 - 0.999f64.powi(t)).sqrt()) + 1e-8;
                p[i] -= 0.01 / (1.0 - 0.9f64.powi(t)) * m[i] / denom;
            }
        }
        let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        for i in 0..2 {
            assert!((got[i] as f64 - p[i]).abs() < 1e-6, "{got:?} vs {p:?}");
        }
        assert_eq!(opt.steps(), 2);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let g = [Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()];
        let norm = global_norm(&g).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let (norm, factor) = Clip::of(&g, 1.0).unwrap().read().unwrap();
        assert_eq!((norm, factor), (5.0, clip_factor(5.0, 1.0)));
        assert!((factor * norm - 1.0).abs() < 1e-6);
        assert_eq!(Clip::of(&g, 10.0).unwrap().read().unwrap().1, 1.0);
        assert_eq!(Clip::of(&g, 0.0).unwrap().read().unwrap().1, 1.0, "max_norm 0: no clipping");
    }

    /// A gradient norm that is not finite leaves the parameters and moments as they were.
    #[test]
    fn a_non_finite_norm_skips_the_update() {
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(&[("w".into(), var.clone())], cfg).unwrap();
        let g = [Tensor::new(&[f32::INFINITY, 1.0], &Device::Cpu).unwrap()];
        let clip = Clip::of(&g, 1.0).unwrap();
        assert!(clip.read().unwrap().0.is_infinite());
        opt.step(&g, 0.01, &clip).unwrap();
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), [1.0, -2.0]);
        for (name, t) in opt.state_tensors() {
            assert_eq!(t.to_vec1::<f32>().unwrap(), [0.0, 0.0], "{name}");
        }
    }

    /// A step with a gradient scale is the step from the scaled gradients, bit for bit.
    #[test]
    fn the_gradient_scale_is_the_clipping() {
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let g = Tensor::new(&[0.3f32, -7.0, 1e-9], &Device::Cpu).unwrap();
        let run = |grad: &Tensor, factor: f64| {
            let var = Var::new(&[1.0f32, -2.0, 0.5], &Device::Cpu).unwrap();
            let mut opt = AdamW::new(&[("w".into(), var.clone())], cfg).unwrap();
            for _ in 0..3 {
                opt.step(std::slice::from_ref(grad), 0.01, &Clip::Host { norm: 1.0, factor }).unwrap();
            }
            var.as_tensor().to_vec1::<f32>().unwrap()
        };
        let factor = clip_factor(global_norm(std::slice::from_ref(&g)).unwrap(), 1.0);
        assert!(factor < 0.2);
        assert_eq!(run(&g, factor), run(&(&g * factor).unwrap(), 1.0));
        assert_ne!(run(&g, factor), run(&g, 1.0));
    }
}

/// The fused CUDA update against the tensor ops on the CPU (a GPU, or without one the emulated
/// driver of `scripts/cuda-emu.sh`, which runs the kernels on the CPU).
#[cfg(all(test, feature = "cuda"))]
mod cuda_tests {
    use super::*;
    use candle_core::Device;

    /// Three steps with gradients that change sign, clipped at the second: the moments carry
    /// from step to step, so an update that mixed m with v would drift from the second step.
    #[test]
    fn fused_adamw_on_cuda_steps_as_the_cpu() -> Result<()> {
        let gpu = Device::new_cuda(0).expect("a CUDA device (without a GPU: scripts/cuda-emu.sh)");
        let values =
            |n: usize, seed: f32| -> Vec<f32> { (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect() };
        let sizes = [("layer.weight", 300), ("layer.bias", 7), ("norm.weight", 1000)];
        let params = |dev: &Device| -> Result<Vec<(String, Var)>> {
            sizes
                .iter()
                .map(|&(name, n)| Ok((name.to_string(), Var::from_vec(values(n, 1.0), n, dev)?)))
                .collect()
        };
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let (on_cpu, on_gpu) = (params(&Device::Cpu)?, params(&gpu)?);
        let (mut cpu, mut cuda) = (AdamW::new(&on_cpu, cfg)?, AdamW::new(&on_gpu, cfg)?);
        for (step, (sign, max_norm)) in [(1.0f32, 100.0), (-1.0, 1.0), (1.0, 100.0)].into_iter().enumerate() {
            let grads = |dev: &Device| -> Result<Vec<Tensor>> {
                let g =
                    |n: usize| values(n, 10.0 * step as f32 + 3.0).into_iter().map(|x| sign * x).collect();
                sizes.iter().map(|&(_, n)| Tensor::from_vec(g(n), n, dev)).collect()
            };
            let (g_cpu, g_gpu) = (grads(&Device::Cpu)?, grads(&gpu)?);
            let (c_cpu, c_gpu) = (Clip::of(&g_cpu, max_norm)?, Clip::of(&g_gpu, max_norm)?);
            assert!(matches!(c_gpu, Clip::Device(_)), "the norm is computed on the device");
            cpu.step(&g_cpu, 1e-2, &c_cpu)?;
            cuda.step(&g_gpu, 1e-2, &c_gpu)?;
            for ((name, p), (_, q)) in on_cpu.iter().zip(&on_gpu) {
                let (want, got) = (p.as_tensor().to_vec1::<f32>()?, q.as_tensor().to_vec1::<f32>()?);
                let err = want.iter().zip(&got).fold(0f32, |e, (w, g)| e.max((w - g).abs()));
                // The same f32 formula; a GPU contracts a * b + c into one rounding.
                assert!(err <= 1e-6, "step {}: {name} differs by {err} from the CPU's", step + 1);
            }
        }
        Ok(())
    }
}
