//! The decoder shared by Llama, Qwen2 and Mistral, written with differentiable candle ops.
//!
//! ```text
//! h_0 = E[ids]
//! h'  = h + Attn(RMSNorm(h))          Attn: rotary q, k; grouped KV heads; softmax in f32
//! h'' = h' + W_down(silu(W_gate x) * W_up x),  x = RMSNorm(h')
//! out = RMSNorm(h_L)                   (hidden states; logits = out @ W_head^T, by the caller)
//! ```
//! RMSNorm is `w * (x / sqrt(mean(x^2) + eps))`, computed in f32 as transformers does.
//!
//! With fused ops on ([`CausalLm::with_fused_ops`]) RMSNorm, RoPE, the SiLU gate and attention
//! run as the ops of [`crate::ops`] (same math, with a hand-written backward; attention keeps no
//! `[seq, seq]` tensor for it); off, as compositions of candle ops.

use std::collections::HashMap;

use candle_core::{D, DType, Device, Result, Tensor, TensorId, Var};

use crate::checkpoint::Checkpoint;
use crate::mask::AttentionMask;
use crate::{ModelConfig, ModelError, ops, rope};

mod backward;

/// `y = x @ w.t() + b`.
#[derive(Debug, Clone)]
struct Linear {
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    /// `x` `[rows, seq, in]` -> `[rows, seq, out]`.
    fn forward(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let (r, t, h) = x.dims3()?;
        self.forward_2d(&x.reshape((r * t, h))?, dtype)?.reshape((r, t, ()))
    }

    /// `x` `[n, in]` (any strides a matmul takes, e.g. a transposed view) -> `[n, out]`.
    fn forward_2d(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let _timed = crate::profile::op(x.device(), "linear");
        let y = crate::matmul(x, &self.w.to_dtype(dtype)?.t()?)?;
        match &self.b {
            Some(b) => y.broadcast_add(&b.to_dtype(dtype)?),
            None => Ok(y),
        }
    }

    /// The transposed output `y^T = W x^T + b`, `[out, n]`, for `x` `[n, in]`: with stacked
    /// layers ([`Linear::stack`]) each layer's output is then a contiguous block of rows.
    fn forward_t(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let _timed = crate::profile::op(x.device(), "linear");
        let y = crate::matmul(&self.w.to_dtype(dtype)?, &x.t()?)?;
        match &self.b {
            Some(b) => y.broadcast_add(&b.to_dtype(dtype)?.unsqueeze(1)?),
            None => Ok(y),
        }
    }

    /// `layers` stacked by output rows (`[Wq; Wk; Wv]`): one matmul computes their outputs side
    /// by side. The layers must all have a bias or none.
    fn stack(layers: &[&Linear]) -> Result<Linear> {
        let w = Tensor::cat(&layers.iter().map(|l| &l.w).collect::<Vec<_>>(), 0)?;
        let b = Linear::biases(layers)?.map(|b| Tensor::cat(&b, 0)).transpose()?;
        Ok(Linear { w, b })
    }

    /// The biases of layers to be stacked: all of them, or `None` where none has one.
    fn biases<'a>(layers: &[&'a Linear]) -> Result<Option<Vec<&'a Tensor>>> {
        let biases: Vec<&Tensor> = layers.iter().filter_map(|l| l.b.as_ref()).collect();
        match biases.len() {
            0 => Ok(None),
            n if n == layers.len() => Ok(Some(biases)),
            _ => candle_core::bail!("cannot stack layers with and without a bias"),
        }
    }

    /// Output rows `start..start + n` of the layer, as a view of its weights.
    fn rows(&self, start: usize, n: usize) -> Result<Linear> {
        Ok(Linear {
            w: self.w.narrow(0, start, n)?,
            b: self.b.as_ref().map(|b| b.narrow(0, start, n)).transpose()?,
        })
    }
}

/// The dtype reductions (norms, softmax) run in: f32, or f64 when computing in f64.
pub fn accum_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 { DType::F64 } else { DType::F32 }
}

/// Whether [`CausalLm`] uses the fused ops by default on `device`: always on CUDA; on the CPU
/// per [`FUSED_ON_CPU`].
pub fn default_fused_ops(device: &Device) -> bool {
    device.is_cuda() || (device.is_cpu() && FUSED_ON_CPU)
}

/// Whether [`crate::ops`] has kernels for `device`: the CPU and CUDA (not Metal).
pub fn has_fused_kernels(device: &Device) -> bool {
    device.is_cpu() || device.is_cuda()
}

/// The CPU default of the fused-ops switch (the fused path measured faster there).
pub const FUSED_ON_CPU: bool = true;

/// The gradients of `sum(x * upstream)` (`upstream`: `x`'s shape and dtype, no graph) for what
/// `x` depends on: `x`'s backward seeded with `upstream`. The sum itself is never computed: on
/// CUDA it would be a multiply and a reduction of the whole tensor in one thread block.
fn backward_from(x: &Tensor, upstream: &Tensor) -> Result<candle_core::backprop::GradStore> {
    if x.shape() != upstream.shape() || x.dtype() != upstream.dtype() {
        candle_core::bail!(
            "backward_from: upstream {:?} {:?} for {:?} {:?}",
            upstream.shape(),
            upstream.dtype(),
            x.shape(),
            x.dtype()
        );
    }
    x.apply_op2(&upstream.detach(), Seed)?.backward()
}

/// A scalar root whose backward gives its first input the second one (its value is 0). Only
/// [`backward_from`] makes one: as a root its upstream gradient is 1.
struct Seed;

/// A scalar 0 on `x`'s device, in its dtype.
fn scalar_zero<S>(x: &S) -> Result<(S, candle_core::Shape)>
where
    S: candle_core::backend::BackendStorage,
    S::Device: candle_core::backend::BackendDevice<Storage = S>,
{
    use candle_core::backend::BackendDevice;
    Ok((x.device().zeros_impl(&().into(), x.dtype())?, ().into()))
}

impl candle_core::CustomOp2 for Seed {
    fn name(&self) -> &'static str {
        "dpo-backward-seed"
    }

    fn cpu_fwd(
        &self,
        x: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        scalar_zero(x)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        scalar_zero(x)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        x: &candle_core::MetalStorage,
        _: &candle_core::Layout,
        _: &candle_core::MetalStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::MetalStorage, candle_core::Shape)> {
        scalar_zero(x)
    }

    fn bwd(
        &self,
        _: &Tensor,
        upstream: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(upstream.clone()), None))
    }
}

fn grad_of(store: &candle_core::backprop::GradStore, v: &Var) -> Result<Tensor> {
    store
        .get(v.as_tensor())
        .cloned()
        .ok_or_else(|| candle_core::Error::Msg("no gradient reached the block input".into()))
}

#[derive(Debug, Clone)]
struct Block {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    /// `q`, `k` and `v` stacked ([`Linear::stack`]; the three are then views of it): one matmul
    /// for the three projections, forward and backward. Only for weights without a graph
    /// (a frozen reference, the manual backward's cast copy).
    qkv: Option<Linear>,
    /// `gate` and `up` stacked likewise, run transposed ([`Linear::forward_t`]) so that the two
    /// outputs are contiguous halves of one matmul's output.
    gate_up: Option<Linear>,
}

impl Block {
    /// The block with `q`, `k`, `v` and `gate`, `up` stacked ([`Block::qkv`], [`Block::gate_up`];
    /// a copy of their weights, the layers then views of it).
    fn stacked(&self) -> Result<Block> {
        let mut b = self.clone();
        if b.qkv.is_none() {
            b.qkv = Some(Linear::stack(&[&b.q, &b.k, &b.v])?);
        }
        if b.gate_up.is_none() {
            b.gate_up = Some(Linear::stack(&[&b.gate, &b.up])?);
        }
        b.with_views()
    }

    /// The block's projections cast to `dt` in one [`ops::cast_cat`], `q`, `k`, `v` and `gate`,
    /// `up` stacked (`stack`) or each on its own; norms as they are.
    fn cast_projections(&self, dt: DType, stack: bool) -> Result<Block> {
        // A stack the block already has is cast as one layer.
        let stacked = |s: &Option<Linear>, layers: &[&Linear]| -> Vec<Linear> {
            match s {
                Some(s) => vec![s.clone()],
                None => layers.iter().map(|&l| l.clone()).collect(),
            }
        };
        let sets: Vec<Vec<Linear>> = if stack {
            vec![
                stacked(&self.qkv, &[&self.q, &self.k, &self.v]),
                vec![self.o.clone()],
                stacked(&self.gate_up, &[&self.gate, &self.up]),
                vec![self.down.clone()],
            ]
        } else {
            [&self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down]
                .map(|l| vec![l.clone()])
                .into()
        };
        // A group of the cast per set's weights, then one per set's biases where it has them
        // (last: small tensors at the end of the buffer).
        let mut groups: Vec<Vec<&Tensor>> =
            sets.iter().map(|set| set.iter().map(|l| &l.w).collect()).collect();
        for set in &sets {
            groups.extend(Linear::biases(&set.iter().collect::<Vec<_>>())?);
        }
        let refs: Vec<&[&Tensor]> = groups.iter().map(Vec::as_slice).collect();
        let mut cast = ops::cast_cat(&refs, dt)?.into_iter();
        let weights: Vec<Tensor> = cast.by_ref().take(sets.len()).collect();
        let lin: Vec<Linear> = sets
            .iter()
            .zip(weights)
            .map(|(set, w)| Linear { w, b: if set[0].b.is_some() { cast.next() } else { None } })
            .collect();
        let mut b = self.clone();
        if stack {
            let [qkv, o, gate_up, down]: [Linear; 4] = lin.try_into().expect("four sets");
            (b.qkv, b.o, b.gate_up, b.down) = (Some(qkv), o, Some(gate_up), down);
            b.with_views()
        } else {
            let [q, k, v, o, gate, up, down]: [Linear; 7] = lin.try_into().expect("seven sets");
            (b.q, b.k, b.v, b.o, b.gate, b.up, b.down) = (q, k, v, o, gate, up, down);
            (b.qkv, b.gate_up) = (None, None);
            Ok(b)
        }
    }

    /// Points the stacked layers at their rows of [`Block::qkv`] and [`Block::gate_up`].
    fn with_views(mut self) -> Result<Block> {
        if let Some(qkv) = &self.qkv {
            let (nq, nk, nv) = (self.q.w.dim(0)?, self.k.w.dim(0)?, self.v.w.dim(0)?);
            self.q = qkv.rows(0, nq)?;
            self.k = qkv.rows(nq, nk)?;
            self.v = qkv.rows(nq + nk, nv)?;
        }
        if let Some(gate_up) = &self.gate_up {
            let (ng, nu) = (self.gate.w.dim(0)?, self.up.w.dim(0)?);
            self.gate = gate_up.rows(0, ng)?;
            self.up = gate_up.rows(ng, nu)?;
        }
        Ok(self)
    }

    fn weights(&self) -> Vec<&Tensor> {
        let mut w = vec![&self.input_norm, &self.post_norm];
        for l in [&self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down] {
            w.push(&l.w);
            w.extend(l.b.as_ref());
        }
        w
    }
}

/// A causal LM's weights and forward pass. Weights are whatever tensors it was built from:
/// the [`Var`]s of a [`Policy`], or plain tensors for a frozen reference.
#[derive(Debug, Clone)]
pub struct CausalLm {
    pub config: ModelConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    compute_dtype: DType,
    /// The dtype of the LM head's logits and log-softmax (f32 keeps bf16 runs' log-probs precise).
    head_dtype: DType,
    /// The dtype the LM head's matmul operands are rounded to: `head_dtype`, or bf16 with an f32
    /// head (f32 sums of bf16 products: [`crate::matmul_bf16_f32`]).
    head_operands: DType,
    fused: bool,
    /// With `fused`: attention through [`ops::attention`] (probabilities recomputed in the
    /// backward) rather than the fused masked softmax between two autograd matmuls, or, without a
    /// graph, [`ops::attention_keeping_probs`] (the manual backward then recomputes nothing).
    recompute_attention: bool,
    /// Whether weights without a graph get their projections stacked ([`Block::qkv`],
    /// [`Block::gate_up`]).
    stack_projections: bool,
}

/// The Hugging Face tensor names of a model with `cfg`, in a fixed order, with their shapes.
pub fn parameter_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![cfg.vocab_size, h])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let mut push = |n: &str, s: Vec<usize>| out.push((format!("{p}.{n}"), s));
        push("input_layernorm.weight", vec![h]);
        for (n, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
            push(&format!("self_attn.{n}.weight"), vec![rows, h]);
            if cfg.qkv_bias {
                push(&format!("self_attn.{n}.bias"), vec![rows]);
            }
        }
        push("self_attn.o_proj.weight", vec![h, q]);
        if cfg.o_bias {
            push("self_attn.o_proj.bias", vec![h]);
        }
        push("post_attention_layernorm.weight", vec![h]);
        for (n, shape, bias) in [("gate_proj", [i, h], i), ("up_proj", [i, h], i), ("down_proj", [h, i], h)] {
            push(&format!("mlp.{n}.weight"), shape.to_vec());
            if cfg.mlp_bias {
                push(&format!("mlp.{n}.bias"), vec![bias]);
            }
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    }
    out
}

impl CausalLm {
    /// Builds the model from named tensors (as listed by [`parameter_shapes`]).
    pub fn from_tensors(
        config: ModelConfig,
        t: &HashMap<String, Tensor>,
        compute_dtype: DType,
    ) -> Result<Self> {
        let get =
            |n: &str| t.get(n).cloned().ok_or_else(|| candle_core::Error::Msg(format!("missing tensor {n}")));
        let lin = |p: &str, bias: bool| -> Result<Linear> {
            Ok(Linear {
                w: get(&format!("{p}.weight"))?,
                b: if bias { Some(get(&format!("{p}.bias"))?) } else { None },
            })
        };
        let blocks = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                Ok(Block {
                    input_norm: get(&format!("{p}.input_layernorm.weight"))?,
                    q: lin(&format!("{p}.self_attn.q_proj"), config.qkv_bias)?,
                    k: lin(&format!("{p}.self_attn.k_proj"), config.qkv_bias)?,
                    v: lin(&format!("{p}.self_attn.v_proj"), config.qkv_bias)?,
                    o: lin(&format!("{p}.self_attn.o_proj"), config.o_bias)?,
                    post_norm: get(&format!("{p}.post_attention_layernorm.weight"))?,
                    gate: lin(&format!("{p}.mlp.gate_proj"), config.mlp_bias)?,
                    up: lin(&format!("{p}.mlp.up_proj"), config.mlp_bias)?,
                    down: lin(&format!("{p}.mlp.down_proj"), config.mlp_bias)?,
                    qkv: None,
                    gate_up: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if config.tie_word_embeddings { None } else { Some(get("lm_head.weight")?) };
        let embed = get("model.embed_tokens.weight")?;
        Ok(CausalLm {
            fused: default_fused_ops(embed.device()),
            recompute_attention: true,
            stack_projections: true,
            head_dtype: compute_dtype,
            head_operands: compute_dtype,
            embed,
            norm: get("model.norm.weight")?,
            blocks,
            lm_head,
            config,
            compute_dtype,
        })
    }

    /// Loads a frozen model (plain tensors, no gradient) in `dtype`.
    pub fn load_frozen(
        ck: &Checkpoint,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, ModelError> {
        let tensors = load_named(ck, dtype, device)?;
        Ok(Self::from_tensors(ck.config.clone(), &tensors, dtype)?.with_stacked_projections(true)?)
    }

    /// The same model with `q`, `k`, `v` stacked into one projection, and `gate`, `up` into
    /// another (`on`, the default), wherever its weights carry no graph: at once for a frozen
    /// model, and for the cast copy of the manual backward ([`CausalLm::manual_grads`]). One
    /// matmul instead of three (two) in the forward, and in the backward one for the input's
    /// gradient and one for the weights'; same math. Weights that are trainable tensors in a
    /// graph are never stacked. Stacking copies the weights: a frozen model keeps only the copy;
    /// the manual backward stacks its per-step copy of the weights, which costs memory only where
    /// that copy would otherwise share the weights' storage (compute in the weights' dtype).
    pub fn with_stacked_projections(mut self, on: bool) -> Result<Self> {
        self.stack_projections = on;
        let frozen = !self.trainable();
        for b in &mut self.blocks {
            *b = match (on, frozen) {
                (true, true) => b.stacked()?,
                (true, false) => b.clone(),
                // The layers stay views of the stacked weights: separate layers again.
                (false, _) => Block { qkv: None, gate_up: None, ..b.clone() },
            };
        }
        Ok(self)
    }

    /// The same model on the same storage, with gradient tracking cut (for evaluation). Stacked
    /// layers' views stay views: a detached tensor keeps its storage and layout.
    pub fn detached(&self) -> Self {
        let lin = |l: &Linear| Linear { w: l.w.detach(), b: l.b.as_ref().map(Tensor::detach) };
        let block = |b: &Block| Block {
            input_norm: b.input_norm.detach(),
            q: lin(&b.q),
            k: lin(&b.k),
            v: lin(&b.v),
            o: lin(&b.o),
            post_norm: b.post_norm.detach(),
            gate: lin(&b.gate),
            up: lin(&b.up),
            down: lin(&b.down),
            qkv: b.qkv.as_ref().map(lin),
            gate_up: b.gate_up.as_ref().map(lin),
        };
        CausalLm {
            config: self.config.clone(),
            embed: self.embed.detach(),
            blocks: self.blocks.iter().map(block).collect(),
            norm: self.norm.detach(),
            lm_head: self.lm_head.as_ref().map(Tensor::detach),
            ..*self
        }
    }

    /// [`CausalLm::detached`] with the projections' weights cast to the compute dtype once (for
    /// a whole forward and backward without a graph; norms and embeddings keep their dtype),
    /// stacked as [`CausalLm::with_stacked_projections`] says: one [`ops::cast_cat`] a block.
    fn detached_for_compute(&self) -> Result<Self> {
        let mut model = self.detached();
        for b in &mut model.blocks {
            *b = b.cast_projections(self.compute_dtype, self.stack_projections)?;
        }
        Ok(model)
    }

    /// Whether the weights are trainable tensors (a [`Policy`]'s vars) rather than frozen ones.
    pub fn trainable(&self) -> bool {
        self.embed.track_op()
    }

    /// The same model with the fused ops of [`crate::ops`] switched on or off (the default is
    /// [`default_fused_ops`] of the weights' device).
    pub fn with_fused_ops(mut self, on: bool) -> Self {
        self.fused = on;
        self
    }

    /// Switches the fused ops on or off in place (see [`CausalLm::with_fused_ops`]).
    pub fn set_fused_ops(&mut self, on: bool) {
        self.fused = on;
    }

    /// With the fused ops on: whether attention keeps its `[seq, seq]` probabilities for the
    /// backward (`false`; autograd's or the manual backward's) or recomputes them there
    /// ([`ops::attention`], the default, far less memory).
    pub fn with_attention_recompute(mut self, on: bool) -> Self {
        self.recompute_attention = on;
        self
    }

    /// Whether the forward uses the fused ops.
    pub fn fused_ops(&self) -> bool {
        self.fused
    }

    /// The dtype matmuls run in.
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// The LM head `[vocab, hidden]` (the embedding when tied): a trainable model's in the head
    /// dtype (its gradient's), a frozen one's as its matmul takes it ([`Self::head_operands`]).
    pub fn lm_head(&self) -> Result<Tensor> {
        let dtype = if self.trainable() { self.head_dtype } else { self.head_operands };
        self.lm_head.as_ref().unwrap_or(&self.embed).to_dtype(dtype)
    }

    /// The same model with the LM head computed in `dtype` (e.g. f32 in a bf16 run: bf16
    /// logits are rounded to ~0.06 at magnitude 10, which is noise in a sum of log-probs), its
    /// matmul's operands too.
    pub fn with_head_dtype(mut self, dtype: DType) -> Self {
        self.head_dtype = dtype;
        self.head_operands = dtype;
        self
    }

    /// The dtype of the LM head's logits and log-softmax.
    pub fn head_dtype(&self) -> DType {
        self.head_dtype
    }

    /// The same model with the LM head's matmul operands rounded to `dtype`: bf16 in an f32
    /// head takes the hidden states as the blocks leave them and the weight rounded as every
    /// block's is, and sums their products in f32 into f32 logits (bf16 tensor cores on CUDA,
    /// twice TF32's rate); the head dtype (the default) multiplies in it.
    pub fn with_head_operands(mut self, dtype: DType) -> Self {
        self.head_operands = dtype;
        self
    }

    /// The dtype the LM head's matmul operands are rounded to ([`Self::with_head_operands`]).
    pub fn head_operands(&self) -> DType {
        self.head_operands
    }

    /// Final hidden states `[rows, seq, hidden]` (after the last norm) for `input_ids`
    /// `[rows, seq]` (u32); positions are `0..seq` on every row unless `mask` carries its own.
    pub fn hidden_states(&self, input_ids: &Tensor, mask: &AttentionMask) -> Result<Tensor> {
        let (cos, sin) = self.rope_tables(input_ids, mask)?;
        let (mut h, mut x1) = (self.embed_input(input_ids)?, None);
        for (l, b) in self.blocks.iter().enumerate() {
            let next_norm = self.blocks.get(l + 1).map(|next| &next.input_norm);
            (h, x1, _) = self.block_saving(b, &h, x1, next_norm, &cos, &sin, mask, false)?;
        }
        self.rms_norm(&h, &self.norm)
    }

    /// The gradient of `head(hidden_states)` with respect to every weight, with activation
    /// checkpointing: the forward keeps only each block's input (no graph), and the backward
    /// recomputes one block at a time, propagating `d head / d h` through it. Costs one more
    /// forward; memory holds one block's graph instead of all of them.
    ///
    /// `head` gets the final hidden states (after the last norm) and returns a scalar; the
    /// result is that scalar and the gradients keyed by weight tensor id.
    pub fn checkpointed_grads(
        &self,
        input_ids: &Tensor,
        mask: &AttentionMask,
        head: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, HashMap<TensorId, Tensor>)> {
        self.grads_by_block(input_ids, mask, head, false, true)
    }

    /// As [`CausalLm::checkpointed_grads`], with the blocks' hand-written backward
    /// (`model/backward.rs`) instead of autograd: the forward keeps the few tensors
    /// each block's backward needs (no graph), or with `checkpoint` only each block's input,
    /// recomputing those tensors block by block in the backward. Needs the fused ops.
    pub fn manual_grads(
        &self,
        input_ids: &Tensor,
        mask: &AttentionMask,
        head: impl FnOnce(&Tensor) -> Result<Tensor>,
        checkpoint: bool,
    ) -> Result<(Tensor, HashMap<TensorId, Tensor>)> {
        if !self.fused {
            candle_core::bail!("the manual backward needs the fused ops (fused_ops = true)");
        }
        self.grads_by_block(input_ids, mask, head, true, checkpoint)
    }

    /// The blocks' forward without a graph, then the head's gradient through autograd, each
    /// block's backward last to first (`manual` or with autograd; from saved tensors or, with
    /// `checkpoint`, recomputed from the block's input), then the embedding's.
    fn grads_by_block(
        &self,
        input_ids: &Tensor,
        mask: &AttentionMask,
        head: impl FnOnce(&Tensor) -> Result<Tensor>,
        manual: bool,
        checkpoint: bool,
    ) -> Result<(Tensor, HashMap<TensorId, Tensor>)> {
        debug_assert!(manual || checkpoint, "autograd without checkpointing is hidden_states + backward");
        let (cos, sin) = self.rope_tables(input_ids, mask)?;
        // The manual backward uses the cast weights again: cast them once.
        let frozen = if manual { self.detached_for_compute()? } else { self.detached() };
        let (mut inputs, mut x1) = (vec![frozen.embed_input(input_ids)?], None);
        let mut saved = Vec::with_capacity(if checkpoint { 0 } else { frozen.blocks.len() });
        for (l, b) in frozen.blocks.iter().enumerate() {
            let (h, next_norm) =
                (inputs.last().expect("one input"), frozen.blocks.get(l + 1).map(|n| &n.input_norm));
            let (next, next_x1, s) = frozen.block_saving(b, h, x1, next_norm, &cos, &sin, mask, true)?;
            x1 = next_x1;
            if !checkpoint {
                saved.push(s);
            }
            inputs.push(next);
        }
        crate::profile::phase(input_ids.device(), "policy_fwd")?;
        let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
        let collect = |grads: &mut HashMap<TensorId, Tensor>,
                       store: &candle_core::backprop::GradStore,
                       weights: Vec<&Tensor>|
         -> Result<()> {
            for w in weights {
                if let Some(g) = store.get(w) {
                    backward::add_grad(grads, w, g)?;
                }
            }
            Ok(())
        };
        // The head: final norm, LM head, loss.
        let leaf = Var::from_tensor(&inputs.pop().expect("final hidden"))?;
        let value = head(&self.rms_norm(leaf.as_tensor(), &self.norm)?)?;
        let store = value.backward()?;
        let mut head_weights = vec![&self.norm, &self.embed];
        head_weights.extend(self.lm_head.as_ref());
        collect(&mut grads, &store, head_weights)?;
        let mut upstream = grad_of(&store, &leaf)?;
        // The manual backward's upstream in the compute dtype too (block_backward).
        let mut upstream_lo = None;
        drop(store);
        crate::profile::phase(input_ids.device(), "head_loss")?;
        for (l, b) in self.blocks.iter().enumerate().rev() {
            upstream = if manual {
                let fb = &frozen.blocks[l];
                let s = match saved.pop() {
                    Some(s) => s,
                    None => frozen.block_saving(fb, &inputs[l], None, None, &cos, &sin, mask, true)?.2,
                };
                let dout = (&upstream, upstream_lo.take());
                let (dh, dh_lo) = frozen.block_backward(fb, b, s, dout, &cos, &sin, mask, &mut grads)?;
                upstream_lo = Some(dh_lo);
                dh
            } else {
                // Recomputed with its graph: d(sum(out * g))/d(in).
                let leaf = Var::from_tensor(&inputs[l])?;
                let out = self.block(b, leaf.as_tensor(), &cos, &sin, mask)?;
                let store = backward_from(&out, &upstream)?;
                collect(&mut grads, &store, b.weights())?;
                grad_of(&store, &leaf)?
            };
            inputs.truncate(l);
        }
        // The embedding, as an input: with the fused ops its rows' sums are added to the
        // gradient it has as a tied LM head (in place on CUDA: no [vocab, hidden] pass).
        if self.fused && self.embed.track_op() {
            let acc = match grads.remove(&self.embed.id()) {
                Some(g) => g,
                None => self.embed.zeros_like()?,
            };
            let (ids, dy) = (input_ids.flatten_all()?, upstream.flatten_to(1)?);
            let g = ops::add_gather_rows_backward(acc, &dy, &ids, self.config.pad_token_id)?;
            grads.insert(self.embed.id(), g);
        } else {
            let store = backward_from(&self.embed_input(input_ids)?, &upstream)?;
            collect(&mut grads, &store, vec![&self.embed])?;
        }
        Ok((value.detach(), grads))
    }

    /// The embedded tokens `[rows, seq, hidden]` in the compute dtype.
    fn embed_input(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (rows, seq) = input_ids.dims2()?;
        let residual = accum_dtype(self.compute_dtype);
        self.embed_tokens(input_ids)?.to_dtype(residual)?.reshape((rows, seq, self.config.hidden_size))
    }

    /// `cos`/`sin` for the batch: `[seq, head_dim]`, or `[rows, seq, head_dim]` with positions.
    fn rope_tables(&self, input_ids: &Tensor, mask: &AttentionMask) -> Result<(Tensor, Tensor)> {
        let (rows, seq) = input_ids.dims2()?;
        let dt = self.compute_dtype;
        match &mask.positions {
            None => rope::tables(&self.config, seq, dt, input_ids.device()),
            Some(pos) => {
                let max = match mask.max_position {
                    Some(max) => max as usize,
                    None => pos.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize,
                };
                let (cos, sin) = rope::tables(&self.config, max + 1, dt, input_ids.device())?;
                let flat = pos.flatten_all()?;
                let d = self.config.head_dim;
                Ok((
                    cos.index_select(&flat, 0)?.reshape((rows, seq, d))?,
                    sin.index_select(&flat, 0)?.reshape((rows, seq, d))?,
                ))
            }
        }
    }

    /// One decoder block: `h + Attn(RMSNorm(h))`, then `+ MLP(RMSNorm(.))`.
    ///
    /// As under PyTorch autocast, the residual stream `h` and the norms stay in f32 when the
    /// matmuls run in bf16: only the matmul inputs and outputs are bf16.
    fn block(
        &self,
        b: &Block,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttentionMask,
    ) -> Result<Tensor> {
        Ok(self.block_saving(b, h, None, None, cos, sin, mask, false)?.0)
    }

    /// [`CausalLm::block`], also returning the tensors the manual backward needs
    /// ([`backward::Saved`]: handles on tensors the forward makes anyway). Each residual add is
    /// done with the norm that reads its sum ([`CausalLm::add_norm_to`]): `x1`, the block's first
    /// norm of `h`, comes from the block before where it computed it; given the next block's
    /// first norm weight (`next_norm`), the block computes that norm of its output, returned
    /// second. `keep_probs`: the manual backward's forward, which keeps the attention
    /// probabilities where `recompute_attention` is off.
    #[allow(clippy::too_many_arguments)]
    fn block_saving(
        &self,
        b: &Block,
        h: &Tensor,
        x1: Option<Tensor>,
        next_norm: Option<&Tensor>,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttentionMask,
        keep_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>, backward::Saved)> {
        let dt = self.compute_dtype;
        let x1 = match x1 {
            Some(x1) => x1,
            None => self.rms_norm_to(h, &b.input_norm, dt)?,
        };
        let (q, k, v) = self.qkv(b, &x1, cos, sin)?;
        let (a, p) = self.attend(&q, &k, &v, mask, keep_probs)?;
        let a = merge_heads(&a)?;
        let (h2, x2) = self.add_norm_to(h, &b.o.forward(&a, dt)?, &b.post_norm, dt)?;
        let silu_mul = |g: &Tensor, u: &Tensor| if self.fused { ops::silu_mul(g, u) } else { g.silu()? * u };
        let (gate, up, mlp) = match &b.gate_up {
            // Stacked: gate^T and up^T are the halves of one [2 * inter, tokens] output.
            Some(gate_up) => {
                let (rows, seq, hidden) = x2.dims3()?;
                let y = gate_up.forward_t(&x2.reshape((rows * seq, hidden))?, dt)?;
                let inter = y.dim(0)? / 2;
                let (gate, up) = (y.narrow(0, 0, inter)?, y.narrow(0, inter, inter)?);
                let mlp = b.down.forward_2d(&silu_mul(&gate, &up)?.t()?, dt)?.reshape((rows, seq, hidden))?;
                (gate, up, mlp)
            }
            None => {
                let (gate, up) = (b.gate.forward(&x2, dt)?, b.up.forward(&x2, dt)?);
                let mlp = b.down.forward(&silu_mul(&gate, &up)?, dt)?;
                (gate, up, mlp)
            }
        };
        let (out, next_x1) = match next_norm {
            Some(w) => self.add_norm_to(&h2, &mlp, w, dt).map(|(out, x1)| (out, Some(x1)))?,
            None => (self.add_residual(&h2, &mlp)?, None),
        };
        Ok((out, next_x1, backward::Saved { h: h.clone(), x1, q, k, v, p, a, h2, x2, gate, up }))
    }

    /// `w * (x / sqrt(mean(x^2) + eps))`, the normalisation in f32.
    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        if self.fused {
            ops::rms_norm(x, w, self.config.rms_norm_eps)
        } else {
            ops::rms_norm_slow(x, w, self.config.rms_norm_eps)
        }
    }

    /// `T(RMSNorm(x, w))`: the norm that feeds a matmul in the compute dtype `T` (one pass with
    /// the fused ops).
    fn rms_norm_to(&self, x: &Tensor, w: &Tensor, dtype: DType) -> Result<Tensor> {
        if self.fused {
            ops::rms_norm_to(x, w, self.config.rms_norm_eps, dtype)
        } else {
            ops::rms_norm_slow(x, w, self.config.rms_norm_eps)?.to_dtype(dtype)
        }
    }

    /// `(h + y, T(RMSNorm(h + y, w)))`: a residual add and the norm that reads its sum. One
    /// pass with the fused ops where no graph is built (the reference's forward, the manual
    /// backward's: no input tracks a gradient), else the two ops. The same values either way.
    fn add_norm_to(&self, h: &Tensor, y: &Tensor, w: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        if self.fused && ![h, y, w].iter().any(|t| t.track_op()) {
            return ops::add_rms_norm_to(h, y, w, self.config.rms_norm_eps, dtype);
        }
        let sum = self.add_residual(h, y)?;
        let normed = self.rms_norm_to(&sum, w, dtype)?;
        Ok((sum, normed))
    }

    /// `h + y` for the residual stream `h` and a branch's output `y` in the compute dtype (one
    /// pass with the fused ops).
    fn add_residual(&self, h: &Tensor, y: &Tensor) -> Result<Tensor> {
        if self.fused { ops::add_cast(h, y) } else { h + y.to_dtype(h.dtype())? }
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if self.fused { ops::rope(x, cos, sin) } else { rope::apply(x, cos, sin) }
    }

    /// Embedding rows for `input_ids`. As `nn.Embedding(padding_idx=pad_token_id)` in
    /// transformers, the pad token's row gets no gradient from its uses as an input.
    fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (flat, pad) = (input_ids.flatten_all()?, self.config.pad_token_id);
        if self.fused {
            ops::gather_rows(&self.embed, &flat, pad)
        } else {
            ops::gather_rows_slow(&self.embed, &flat, pad)
        }
    }

    /// `1 / sqrt(head_dim)`.
    fn attention_scale(&self) -> f64 {
        1.0 / (self.config.head_dim as f64).sqrt()
    }

    /// The rotated queries and keys and the values, `[rows, heads, seq, head_dim]` each (KV
    /// heads not repeated).
    fn qkv(&self, b: &Block, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let cfg = &self.config;
        let dt = self.compute_dtype;
        let (rows, seq, _) = x.dims3()?;
        let hd = cfg.head_dim;
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let (q, k, v) = match &b.qkv {
            Some(qkv) => {
                // Without a graph the bias is added where q, k and v are read anyway: by the
                // fused RoPE and by the copy of V into heads (the same roundings; no pass of its
                // own over the projection's output).
                let bias = qkv
                    .b
                    .as_ref()
                    .filter(|b| self.fused && !(x.track_op() || qkv.w.track_op() || b.track_op()));
                let y = match bias {
                    Some(_) => Linear { w: qkv.w.clone(), b: None }.forward(x, dt)?,
                    None => qkv.forward(x, dt)?,
                };
                // [rows, seq, (nq + 2 nkv) * hd] -> heads [rows, nq + 2 nkv, seq, hd]: views.
                let y = y.reshape((rows, seq, nq + 2 * nkv, hd))?.transpose(1, 2)?;
                let (q, k, v) = (y.narrow(1, 0, nq)?, y.narrow(1, nq, nkv)?, y.narrow(1, nq + nkv, nkv)?);
                if let Some(bias) = bias {
                    let bias = bias.to_dtype(dt)?;
                    let part = |first: usize, n: usize| bias.narrow(0, first * hd, n * hd);
                    return Ok((
                        ops::rope_with_bias(&q, &part(0, nq)?, cos, sin)?,
                        ops::rope_with_bias(&k, &part(nq, nkv)?, cos, sin)?,
                        v.broadcast_add(&part(nq + nkv, nkv)?.reshape((1, nkv, 1, hd))?)?,
                    ));
                }
                (q, k, v)
            }
            None => {
                let heads = |t: Tensor, n: usize| t.reshape((rows, seq, n, hd))?.transpose(1, 2);
                (
                    heads(b.q.forward(x, dt)?, nq)?,
                    heads(b.k.forward(x, dt)?, nkv)?,
                    heads(b.v.forward(x, dt)?, nkv)?,
                )
            }
        };
        // The fused RoPE reads the head views in place and writes contiguous heads; V is copied.
        Ok((self.rope(&q, cos, sin)?, self.rope(&k, cos, sin)?, v.contiguous()?))
    }

    /// `softmax(q k^T * scale + bias) v`, `[rows, heads, seq, head_dim]`, and for the manual
    /// backward (`keep_probs`, with `recompute_attention` off and no graph) the probabilities.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &AttentionMask,
        keep_probs: bool,
    ) -> Result<(Tensor, Option<ops::KeptProbs>)> {
        let dt = self.compute_dtype;
        let n_rep = self.config.num_attention_heads / self.config.num_key_value_heads;
        let scale = self.attention_scale();
        let graph = [q, k, v].iter().any(|t| t.track_op());
        if self.fused && !graph && keep_probs && !self.recompute_attention {
            return ops::attention_keeping_probs(q, k, v, &mask.bias, scale);
        }
        if self.fused && (self.recompute_attention || !graph) {
            // Scores and probabilities are not kept: the backward recomputes them, or there is
            // none (the reference, an eval), and the rows' chunks are computed one at a time.
            return Ok((ops::attention(q, k, v, &mask.bias, scale)?, None));
        }
        let (k, v) = (repeat_kv(k, n_rep)?, repeat_kv(v, n_rep)?);
        let scores = crate::matmul(q, &k.t()?.contiguous()?)?;
        let probs = if self.fused {
            // Scores stay in the compute dtype; scale, mask and softmax run in f32 inside the op.
            ops::masked_softmax(&scores, &mask.bias, scale)?
        } else {
            let acc = accum_dtype(dt);
            let scores = (scores * scale)?.to_dtype(acc)?.broadcast_add(&mask.bias.to_dtype(acc)?)?;
            candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(dt)?
        };
        Ok((crate::matmul(&probs, &v)?, None))
    }
}

/// `[rows, heads, seq, d]` -> `[rows, seq, heads * d]` (contiguous).
fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (r, n, s, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((r, s, n * d))
}

/// `[rows, kv, seq, d]` -> `[rows, kv * n_rep, seq, d]`, each KV head serving `n_rep` query heads.
fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (r, kv, s, d) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((r, kv, n_rep, s, d))?.contiguous()?.reshape((r, kv * n_rep, s, d))
}

fn load_named(
    ck: &Checkpoint,
    dtype: DType,
    device: &Device,
) -> std::result::Result<HashMap<String, Tensor>, ModelError> {
    parameter_shapes(&ck.config)
        .into_iter()
        .map(|(name, shape)| Ok((name.clone(), ck.tensor(&name, &shape, dtype, device)?)))
        .collect()
}

/// The trainable model: a [`CausalLm`] whose weights are [`Var`]s, kept in `param_dtype`
/// (the master copy; f32 even when matmuls run in bf16), with their Hugging Face names.
pub struct Policy {
    pub model: CausalLm,
    /// `(name, var)` in [`parameter_shapes`] order. A tied LM head is the embedding's var.
    pub params: Vec<(String, Var)>,
}

impl Policy {
    /// Loads the checkpoint as trainable variables.
    pub fn load(
        ck: &Checkpoint,
        param_dtype: DType,
        compute_dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, ModelError> {
        let tensors = load_named(ck, param_dtype, device)?;
        let mut params = Vec::with_capacity(tensors.len());
        let mut as_tensors = HashMap::with_capacity(tensors.len());
        for (name, _) in parameter_shapes(&ck.config) {
            let var = Var::from_tensor(&tensors[&name])?;
            as_tensors.insert(name.clone(), var.as_tensor().clone());
            params.push((name, var));
        }
        let model = CausalLm::from_tensors(ck.config.clone(), &as_tensors, compute_dtype)?;
        Ok(Policy { model, params })
    }

    /// The parameters as named tensors in `dtype`, ready for `save_safetensors_atomic`
    /// (a tied LM head is left out, as transformers' `save_pretrained` does).
    pub fn named_tensors(&self, dtype: DType) -> Result<HashMap<String, Tensor>> {
        self.params.iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().to_dtype(dtype)?))).collect()
    }

    /// Overwrites the weights with `tensors` (by name; every parameter must be present).
    pub fn set_weights(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in &self.params {
            let t = tensors
                .get(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("no tensor `{name}` to restore")))?;
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }
}
