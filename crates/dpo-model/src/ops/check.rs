//! [`self_check`]: every fused op on a device against the slow path there and against the CPU
//! implementation, forward values and all gradients, with a rough timing.

use std::fmt::Write as _;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::AttentionMask;

/// Deterministic pseudo-random N(0, std^2) values (xorshift64* and Box-Muller).
pub(crate) fn randn(n: usize, seed: u64, std: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        ((state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32 * std
        })
        .collect()
}

/// A CPU f32 tensor of deterministic N(0, std^2) values (the inputs of the kernel checks; also
/// for tests).
pub fn randn_tensor(shape: &[usize], seed: u64, std: f32) -> Result<Tensor> {
    Tensor::from_vec(randn(shape.iter().product(), seed, std), shape, &Device::Cpu)
}

/// Rotate-half tables `[seq, d]` (every row at `offsets[0]`) or `[rows, seq, d]` (row r's
/// positions start at `offsets[r]`), theta 10000, f32 on the CPU.
pub(crate) fn rope_tables(
    offsets: &[usize],
    per_row: bool,
    seq: usize,
    d: usize,
) -> Result<(Tensor, Tensor)> {
    let rows = if per_row { offsets.len() } else { 1 };
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for &off in &offsets[..rows] {
        for p in 0..seq {
            for j in 0..d {
                let i = j % (d / 2);
                let angle = (off + p) as f64 / 10000f64.powf(2.0 * i as f64 / d as f64);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    let shape: Vec<usize> = if per_row { vec![rows, seq, d] } else { vec![seq, d] };
    Ok((
        Tensor::from_vec(cos, shape.as_slice(), &Device::Cpu)?,
        Tensor::from_vec(sin, shape.as_slice(), &Device::Cpu)?,
    ))
}

/// A causal + key-padding bias `[rows, 1, seq, seq]`: row r keeps `seq - 3r` keys (right
/// padding), row 1 also drops its first 5 keys (queries 0..5 fully masked), and the last row of
/// three or more is all padding.
pub(crate) fn test_mask(rows: usize, seq: usize) -> Result<Tensor> {
    let mut valid = vec![1u8; rows * seq];
    for r in 0..rows {
        for j in 0..seq {
            let pad_right = j + 3 * r >= seq;
            let pad_left = r == 1 && j < 5;
            let all = rows >= 3 && r == rows - 1;
            if pad_right || pad_left || all {
                valid[r * seq + j] = 0;
            }
        }
    }
    Ok(AttentionMask::causal(&valid, rows, seq, None, &Device::Cpu)?.bias)
}

/// A bias `[1, 1, q, k]`: about 20% of entries masked at random, row 0 fully masked.
pub(crate) fn random_bias(q: usize, k: usize, seed: u64) -> Result<Tensor> {
    let noise = randn(q * k, seed, 1.0);
    let v: Vec<f32> = noise
        .iter()
        .enumerate()
        .map(|(i, &z)| if i < k || z > 0.84 { crate::mask::MASKED } else { 0.0 })
        .collect();
    Tensor::from_vec(v, (1, 1, q, k), &Device::Cpu)
}

type OpFn = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;

/// Input tensors, and the `Var`s among them (named).
type Inputs = (Vec<Tensor>, Vec<(&'static str, Var)>);

/// One input of an op under test: CPU f32 values.
#[derive(Clone)]
pub(crate) struct Input {
    pub name: &'static str,
    pub value: Tensor,
    /// Takes a gradient (checked).
    pub grad: bool,
    /// Stays f32 whatever the dtype under test (the attention bias).
    pub keep_f32: bool,
}

pub(crate) struct Case {
    pub op: &'static str,
    /// The output's dims, where they are not the first input's.
    pub out_dims: Option<Vec<usize>>,
    pub shape: String,
    pub inputs: Vec<Input>,
    pub fused: OpFn,
    pub slow: OpFn,
}

/// An op's output and the gradients of `sum(y * upstream)` for the inputs that take one.
pub(crate) struct Run {
    pub out: Tensor,
    pub grads: Vec<(&'static str, Tensor)>,
}

impl Case {
    /// The inputs on `dev` in `dt` (first rounded through `round`, if given).
    fn inputs_on(&self, dev: &Device, dt: DType, round: Option<DType>) -> Result<Inputs> {
        let mut xs = Vec::new();
        let mut vars = Vec::new();
        for inp in &self.inputs {
            let t = inp.value.to_device(dev)?;
            let t = match (inp.keep_f32, round) {
                (true, _) => t,
                (false, None) => t.to_dtype(dt)?,
                (false, Some(r)) => t.to_dtype(r)?.to_dtype(dt)?,
            };
            if inp.grad {
                let v = Var::from_tensor(&t)?;
                xs.push(v.as_tensor().clone());
                vars.push((inp.name, v));
            } else {
                xs.push(t);
            }
        }
        Ok((xs, vars))
    }

    /// Runs `fused` (or the slow path) on `dev` in `dt`, forward and backward with `upstream`;
    /// with `round`, inputs and upstream gradient are first rounded to that dtype.
    pub fn run(
        &self,
        fused: bool,
        dev: &Device,
        dt: DType,
        upstream: &Tensor,
        round: Option<DType>,
    ) -> Result<Run> {
        let (xs, vars) = self.inputs_on(dev, dt, round)?;
        let f = if fused { &self.fused } else { &self.slow };
        let out = f(&xs)?;
        let upstream = match round {
            Some(r) => upstream.to_dtype(r)?,
            None => upstream.clone(),
        };
        let g = upstream.to_device(dev)?.to_dtype(out.dtype())?;
        let grads = (&out * &g)?.sum_all()?.backward()?;
        let grads = vars
            .iter()
            .map(|(name, v)| {
                let g = grads.get(v.as_tensor()).ok_or_else(|| {
                    candle_core::Error::Msg(format!("{}: input {name} received no gradient", self.op))
                })?;
                Ok((*name, g.clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Run { out, grads })
    }

    /// Mean milliseconds of forward + backward over `iters` runs (after one warm-up run).
    fn time(&self, fused: bool, dev: &Device, dt: DType, upstream: &Tensor, iters: usize) -> Result<f64> {
        let (xs, _vars) = self.inputs_on(dev, dt, None)?;
        let f = if fused { &self.fused } else { &self.slow };
        let g = upstream.to_device(dev)?.to_dtype(dt)?;
        let step = || -> Result<()> {
            let out = f(&xs)?;
            let g = g.to_dtype(out.dtype())?;
            (&out * &g)?.sum_all()?.backward()?;
            Ok(())
        };
        step()?;
        dev.synchronize()?;
        let start = Instant::now();
        for _ in 0..iters {
            step()?;
        }
        dev.synchronize()?;
        Ok(start.elapsed().as_secs_f64() * 1e3 / iters as f64)
    }

    /// The op's upstream gradient (CPU f32), the shape of its output (`out_dims`, else its first input's).
    pub fn upstream(&self, seed: u64) -> Result<Tensor> {
        randn_tensor(self.out_dims.as_deref().unwrap_or(self.inputs[0].value.dims()), seed, 1.0)
    }
}

/// Max abs difference, max |reference|, and whether both are finite everywhere.
pub(crate) fn compare(got: &Tensor, want: &Tensor) -> Result<(f64, f64, bool)> {
    let want = want.to_device(got.device())?.to_dtype(DType::F32)?;
    let got = got.to_dtype(DType::F32)?;
    let max = |t: &Tensor| -> Result<f64> { Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64) };
    let finite = |t: &Tensor| -> Result<bool> {
        Ok(t.to_dtype(DType::F64)?.abs()?.sum_all()?.to_scalar::<f64>()?.is_finite())
    };
    let d = max(&(&got - &want)?)?;
    let scale = max(&want)?;
    Ok((d, scale, finite(&got)? && finite(&want)?))
}

/// Every (name, tensor) of a run: the output, then the gradients.
fn parts(r: &Run) -> Vec<(&'static str, &Tensor)> {
    std::iter::once(("out", &r.out)).chain(r.grads.iter().map(|(n, g)| (*n, g))).collect()
}

pub(crate) fn cases(big: bool) -> Result<Vec<Case>> {
    let mut cases = Vec::new();
    // masked softmax: attention-shaped with a causal + padding mask, then long rows with a
    // broadcast bias and large logits.
    let (r, h, s) = if big { (16, 14, 512) } else { (3, 2, 37) };
    let scale = 0.125;
    for (shape, std, bias, scale) in [
        ((r, h, s, s), 16.0, test_mask(r, s)?, scale),
        (
            if big { (2, 2, 3, 8193) } else { (1, 2, 3, 1029) },
            30.0,
            random_bias(3, if big { 8193 } else { 1029 }, 7)?,
            1.0,
        ),
    ] {
        let dims = [shape.0, shape.1, shape.2, shape.3];
        cases.push(Case {
            op: "masked_softmax",
            out_dims: None,
            shape: format!("{dims:?}"),
            inputs: vec![
                Input { name: "scores", value: randn_tensor(&dims, 1, std)?, grad: true, keep_f32: false },
                Input { name: "bias", value: bias, grad: false, keep_f32: true },
            ],
            fused: Box::new(move |x| super::masked_softmax(&x[0], &x[1], scale)),
            slow: Box::new(move |x| super::masked_softmax_slow(&x[0], &x[1], scale)),
        });
    }
    // Attention: grouped KV heads (Qwen2-0.5B: 14 query, 2 KV heads) with a causal + padding
    // mask, at head sizes 64 and 32 (the tensor-core kernels' two); then plain multi-head with a
    // broadcast bias, computed a row at a time.
    let shapes =
        if big { [(16, 14, 2, 512, 64), (4, 8, 2, 256, 32)] } else { [(3, 4, 2, 70, 64), (3, 4, 2, 70, 32)] };
    let mut attention_cases = Vec::new();
    for (r, h, kv, s, d) in shapes {
        attention_cases.push(((r, h, kv, s, d), test_mask(r, s)?, super::SCORE_BUDGET));
    }
    let small = (2, 3, 3, 29, 8);
    attention_cases.push((small, random_bias(small.3, small.3, 8)?, 1));
    for ((r, h, kv, s, d), bias, budget) in attention_cases {
        let scale = 1.0 / (d as f64).sqrt();
        cases.push(Case {
            op: if budget == 1 { "attention(row-chunks)" } else { "attention" },
            out_dims: None,
            shape: format!("q [{r}, {h}, {s}, {d}], kv heads {kv}, bias {:?}", bias.dims()),
            inputs: vec![
                Input {
                    name: "q",
                    value: randn_tensor(&[r, h, s, d], 21, 1.0)?,
                    grad: true,
                    keep_f32: false,
                },
                Input {
                    name: "k",
                    value: randn_tensor(&[r, kv, s, d], 22, 1.0)?,
                    grad: true,
                    keep_f32: false,
                },
                Input {
                    name: "v",
                    value: randn_tensor(&[r, kv, s, d], 23, 1.0)?,
                    grad: true,
                    keep_f32: false,
                },
                Input { name: "bias", value: bias, grad: false, keep_f32: true },
            ],
            fused: Box::new(move |x| {
                Ok(super::attention::forward_in_chunks(&x[0], &x[1], &x[2], &x[3], scale, budget, false)?.0)
            }),
            slow: Box::new(move |x| super::attention_slow(&x[0], &x[1], &x[2], &x[3], scale)),
        });
    }
    // RMSNorm over hidden 896 (Qwen2-0.5B), some rows far from unit scale.
    let (rows, hidden) = if big { (16 * 512, 896) } else { (2 * 37, 96) };
    let row_scale: Vec<f32> = (0..rows).map(|i| [1.0, 30.0, 0.01][i % 3]).collect();
    let x = randn_tensor(&[rows, hidden], 2, 1.0)?.broadcast_mul(&Tensor::from_vec(
        row_scale,
        (rows, 1),
        &Device::Cpu,
    )?)?;
    let w = (randn_tensor(&[hidden], 3, 0.1)? + 1.0)?;
    cases.push(Case {
        op: "rms_norm",
        out_dims: None,
        shape: format!("[{rows}, {hidden}]"),
        inputs: vec![
            Input { name: "x", value: x, grad: true, keep_f32: false },
            Input { name: "w", value: w, grad: true, keep_f32: false },
        ],
        fused: Box::new(|x| super::rms_norm(&x[0], &x[1], 1e-6)),
        slow: Box::new(|x| super::rms_norm_slow(&x[0], &x[1], 1e-6)),
    });
    // The same norm on the f32 residual stream, its result in the dtype under test (the one
    // pass that feeds a matmul); `like` carries that dtype. Then the residual add of a branch
    // computed in that dtype.
    let like = Input {
        name: "like",
        value: Tensor::zeros(1, DType::F32, &Device::Cpu)?,
        grad: false,
        keep_f32: false,
    };
    cases.push(Case {
        op: "rms_norm_to",
        out_dims: None,
        shape: format!("[{rows}, {hidden}]"),
        inputs: vec![
            Input {
                name: "x",
                value: cases.last().expect("rms_norm").inputs[0].value.clone(),
                grad: true,
                keep_f32: true,
            },
            Input { name: "w", value: (randn_tensor(&[hidden], 3, 0.1)? + 1.0)?, grad: true, keep_f32: true },
            like,
        ],
        fused: Box::new(|x| super::rms_norm_to(&x[0], &x[1], 1e-6, x[2].dtype())),
        // The two ops it fuses (rms_norm is checked against its slow path above).
        slow: Box::new(|x| super::rms_norm(&x[0], &x[1], 1e-6)?.to_dtype(x[2].dtype())),
    });
    // The manual backward's norm gradient: dy in the dtype under test (a matmul's output
    // gradient), x, w and the residual gradient in f32; dx + res and dw packed in one output,
    // reported in the dtype under test.
    let fused_bwd = |x: &[Tensor]| -> Result<Tensor> {
        let (dx, dw) = super::rms_norm_backward_add(&x[0], &x[1], 1e-6, &x[2], &x[3])?;
        Tensor::cat(&[&dx.flatten_all()?, &dw], 0)?.to_dtype(x[2].dtype())
    };
    let slow_bwd = |x: &[Tensor]| -> Result<Tensor> {
        let (dn, dw) = super::rms_norm_backward(&x[0], &x[1], 1e-6, &x[2].to_dtype(x[0].dtype())?)?;
        Tensor::cat(&[&(&x[3] + dn)?.flatten_all()?, &dw], 0)?.to_dtype(x[2].dtype())
    };
    cases.push(Case {
        op: "rms_norm_backward_add",
        out_dims: Some(vec![rows * hidden + hidden]),
        shape: format!("[{rows}, {hidden}]"),
        inputs: vec![
            Input { name: "x", value: randn_tensor(&[rows, hidden], 12, 10.0)?, grad: false, keep_f32: true },
            Input {
                name: "w",
                value: (randn_tensor(&[hidden], 13, 0.1)? + 1.0)?,
                grad: false,
                keep_f32: true,
            },
            Input {
                name: "dy",
                value: randn_tensor(&[rows, hidden], 14, 1.0)?,
                grad: false,
                keep_f32: false,
            },
            Input {
                name: "res",
                value: randn_tensor(&[rows, hidden], 15, 1.0)?,
                grad: false,
                keep_f32: true,
            },
        ],
        fused: Box::new(fused_bwd),
        slow: Box::new(slow_bwd),
    });
    cases.push(Case {
        op: "add_cast",
        out_dims: None,
        shape: format!("[{rows}, {hidden}]"),
        inputs: vec![
            Input { name: "h", value: randn_tensor(&[rows, hidden], 9, 10.0)?, grad: true, keep_f32: true },
            Input { name: "y", value: randn_tensor(&[rows, hidden], 10, 1.0)?, grad: true, keep_f32: false },
        ],
        fused: Box::new(|x| super::add_cast(&x[0], &x[1])),
        slow: Box::new(|x| &x[0] + x[1].to_dtype(x[0].dtype())?),
    });
    // The manual backward's weights from f32 into bf16, stacked: [Wq; Wk] and the bias on its
    // own (the output compared in the run's dtype).
    let (nq, nk) = if big { (896, 128) } else { (12, 4) };
    type CastCat = fn(&[&[&Tensor]], DType) -> Result<Vec<Tensor>>;
    let weights = |x: &[Tensor], cast: CastCat| -> Result<Tensor> {
        let f = x.iter().map(|t| t.to_dtype(DType::F32)).collect::<Result<Vec<_>>>()?;
        let out = cast(&[&[&f[0], &f[1]], &[&f[2]]], DType::BF16)?;
        Tensor::cat(&out.iter().map(|o| o.flatten_all()).collect::<Result<Vec<_>>>()?, 0)?
            .to_dtype(x[0].dtype())
    };
    cases.push(Case {
        op: "cast_cat",
        out_dims: Some(vec![(nq + nk) * hidden + nq]),
        shape: format!("[{nq}, {hidden}] + [{nk}, {hidden}], [{nq}]"),
        inputs: vec![
            Input { name: "wq", value: randn_tensor(&[nq, hidden], 21, 1.0)?, grad: false, keep_f32: false },
            Input { name: "wk", value: randn_tensor(&[nk, hidden], 22, 1.0)?, grad: false, keep_f32: false },
            Input { name: "bq", value: randn_tensor(&[nq], 23, 1.0)?, grad: false, keep_f32: false },
        ],
        fused: Box::new(move |x| weights(x, super::cast_cat)),
        slow: Box::new(move |x| weights(x, super::cast_cat_slow)),
    });
    // RoPE with shared and with per-row positions.
    let (r, h, s, d) = if big { (16, 14, 512, 64) } else { (2, 3, 37, 16) };
    let offsets: Vec<usize> = (0..r).map(|i| 7 * i).collect();
    for per_row in [false, true] {
        let (cos, sin) = rope_tables(&offsets, per_row, s, d)?;
        cases.push(Case {
            op: if per_row { "rope(per-row)" } else { "rope" },
            out_dims: None,
            shape: format!("[{r}, {h}, {s}, {d}] / {:?}", cos.dims()),
            inputs: vec![
                Input { name: "x", value: randn_tensor(&[r, h, s, d], 4, 1.0)?, grad: true, keep_f32: false },
                Input { name: "cos", value: cos.clone(), grad: false, keep_f32: false },
                Input { name: "sin", value: sin.clone(), grad: false, keep_f32: false },
            ],
            fused: Box::new(|x| super::rope(&x[0], &x[1], &x[2])),
            slow: Box::new(|x| super::rope_slow(&x[0], &x[1], &x[2])),
        });
        // The heads of a stacked projection's output, read in place: x [rows, seq, heads + 2,
        // d] viewed as [rows, heads, seq, d] from head 1 (strided, with an offset); the result
        // goes back between the two heads left alone (the output has x's shape).
        type Rope = fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;
        let heads = move |rope: Rope, x: &[Tensor]| -> Result<Tensor> {
            let y = rope(&x[0].transpose(1, 2)?.narrow(1, 1, h)?, &x[1], &x[2])?.transpose(1, 2)?;
            Tensor::cat(&[&x[0].narrow(2, 0, 1)?, &y, &x[0].narrow(2, h + 1, 1)?], 2)
        };
        cases.push(Case {
            op: if per_row { "rope(per-row, head view)" } else { "rope(head view)" },
            out_dims: None,
            shape: format!("[{r}, {s}, {}, {d}] / {:?}", h + 2, cos.dims()),
            inputs: vec![
                Input {
                    name: "x",
                    value: randn_tensor(&[r, s, h + 2, d], 5, 1.0)?,
                    grad: true,
                    keep_f32: false,
                },
                Input { name: "cos", value: cos, grad: false, keep_f32: false },
                Input { name: "sin", value: sin, grad: false, keep_f32: false },
            ],
            fused: Box::new(move |x| heads(super::rope, x)),
            slow: Box::new(move |x| heads(super::rope_slow, x)),
        });
    }
    // RoPE's backward merged into the stacked q/k/v layout (the manual backward's), 2 KV heads.
    let (cos, sin) = rope_tables(&offsets, true, s, d)?;
    let grad = |dims: &[usize], seed| -> Result<Input> {
        Ok(Input { name: "d", value: randn_tensor(dims, seed, 1.0)?, grad: false, keep_f32: false })
    };
    cases.push(Case {
        op: "rope_backward_merged",
        out_dims: Some(vec![r, s, (h + 4) * d]),
        shape: format!("[{r}, {h} + 2 x 2, {s}, {d}] / {:?}", cos.dims()),
        inputs: vec![
            grad(&[r, h, s, d], 6)?,
            grad(&[r, 2, s, d], 7)?,
            grad(&[r, 2, s, d], 8)?,
            Input { name: "cos", value: cos, grad: false, keep_f32: false },
            Input { name: "sin", value: sin, grad: false, keep_f32: false },
        ],
        fused: Box::new(|x| super::rope_backward_merged(&x[0], &x[1], &x[2], &x[3], &x[4])),
        // The ops it fuses: RoPE's backward on dq and dk, the concatenation, the merge of heads.
        slow: Box::new(|x| {
            let (dq, dk) =
                (super::rope_backward(&x[0], &x[3], &x[4])?, super::rope_backward(&x[1], &x[3], &x[4])?);
            let heads = Tensor::cat(&[&dq, &dk, &x[2]], 1)?;
            let (r, n, s, d) = heads.dims4()?;
            heads.transpose(1, 2)?.reshape((r, s, n * d))
        }),
    });
    // SiLU gate over intermediate 4864 (Qwen2-0.5B).
    let shape = if big { [16, 512, 4864] } else { [2, 37, 160] };
    cases.push(Case {
        op: "silu_mul",
        out_dims: None,
        shape: format!("{shape:?}"),
        inputs: vec![
            Input { name: "gate", value: randn_tensor(&shape, 5, 3.0)?, grad: true, keep_f32: false },
            Input { name: "up", value: randn_tensor(&shape, 6, 1.0)?, grad: true, keep_f32: false },
        ],
        fused: Box::new(|x| super::silu_mul(&x[0], &x[1])),
        slow: Box::new(|x| super::silu_mul_slow(&x[0], &x[1])),
    });
    // Rows by index (the embedding): repeated ids, a skipped (pad) id, rows never picked.
    let (vocab, hidden, n) = if big { (32_000, 896, 8192) } else { (53, 40, 97) };
    let ids: Vec<u32> = (0..n as u64).map(|j| ((j * j * 7 + 3 * j) % vocab as u64 / 2) as u32).collect();
    let no_grad = ids[5];
    let ids = Tensor::from_vec(ids, n, &Device::Cpu)?;
    cases.push(Case {
        op: "gather_rows",
        out_dims: Some(vec![n, hidden]),
        shape: format!("[{vocab}, {hidden}] at {n} ids"),
        inputs: vec![
            Input {
                name: "table",
                value: randn_tensor(&[vocab, hidden], 18, 1.0)?,
                grad: true,
                keep_f32: false,
            },
            Input { name: "ids", value: ids.clone(), grad: false, keep_f32: true },
        ],
        fused: Box::new(move |x| super::gather_rows(&x[0], &x[1], Some(no_grad))),
        slow: Box::new(move |x| super::gather_rows_slow(&x[0], &x[1], Some(no_grad))),
    });
    // Its backward added to a gradient the table has already (a tied embedding's as the LM
    // head; in place on CUDA for f32), against candle's index_add.
    cases.push(Case {
        op: "gather_rows_backward_added",
        out_dims: Some(vec![vocab, hidden]),
        shape: format!("[{vocab}, {hidden}] at {n} ids"),
        inputs: vec![
            Input {
                name: "acc",
                value: randn_tensor(&[vocab, hidden], 19, 1.0)?,
                grad: false,
                keep_f32: false,
            },
            Input { name: "dy", value: randn_tensor(&[n, hidden], 20, 1.0)?, grad: false, keep_f32: false },
            Input { name: "ids", value: ids, grad: false, keep_f32: true },
        ],
        // A copy: the op writes into the gradient it is given, and the inputs serve every run.
        fused: Box::new(move |x| super::add_gather_rows_backward(x[0].copy()?, &x[1], &x[2], Some(no_grad))),
        slow: Box::new(move |x| {
            let keep = x[2].ne(no_grad)?.to_dtype(x[1].dtype())?.unsqueeze(1)?;
            let dy = x[1].broadcast_mul(&keep)?;
            &x[0] + x[0].zeros_like()?.index_add(&x[2], &dy, 0)?
        }),
    });
    // The LM head's log-softmax at the targets: logits of a vocabulary not a multiple of the
    // block, one target per row (the first and the last token among them), spread logits; the
    // (logp, lse) pair reported in the dtype under test. Then the backward, with the lse that
    // its own forward gave and g in f32.
    let (n, vocab) = if big { (256, 151_936) } else { (29, 5003) };
    let targets: Vec<u32> =
        (0..n as u32).map(|i| [0, vocab as u32 - 1, (i * 7919) % vocab as u32][i as usize % 3]).collect();
    let targets = Input {
        name: "targets",
        value: Tensor::from_vec(targets, n, &Device::Cpu)?,
        grad: false,
        keep_f32: true,
    };
    let logits =
        Input { name: "logits", value: randn_tensor(&[n, vocab], 16, 4.0)?, grad: false, keep_f32: false };
    type LogProbs = fn(&Tensor, &Tensor) -> Result<(Tensor, Tensor)>;
    let pair = |f: LogProbs, x: &[Tensor]| -> Result<Tensor> {
        let (logp, lse) = f(&x[0], &x[1])?;
        Tensor::cat(&[logp, lse], 0)?.to_dtype(x[0].dtype())
    };
    cases.push(Case {
        op: "target_logprobs",
        out_dims: Some(vec![2 * n]),
        shape: format!("[{n}, {vocab}]"),
        inputs: vec![logits.clone(), targets.clone()],
        fused: Box::new(move |x| pair(super::target_logprobs, x)),
        slow: Box::new(move |x| pair(super::target_logprobs_slow, x)),
    });
    type LogProbsBwd = fn(&Tensor, &Tensor, &Tensor, &Tensor, usize) -> Result<Tensor>;
    let backward = |f: LogProbs, b: LogProbsBwd, x: &[Tensor]| -> Result<Tensor> {
        b(&x[0], &f(&x[0], &x[1])?.1, &x[1], &x[2], 0)
    };
    cases.push(Case {
        op: "target_logprobs_backward",
        out_dims: None,
        shape: format!("[{n}, {vocab}]"),
        inputs: vec![
            logits,
            targets,
            Input { name: "g", value: randn_tensor(&[n], 17, 1.0)?, grad: false, keep_f32: true },
        ],
        fused: Box::new(move |x| backward(super::target_logprobs, super::target_logprobs_backward, x)),
        slow: Box::new(move |x| {
            backward(super::target_logprobs_slow, super::target_logprobs_backward_slow, x)
        }),
    });
    // The same into bf16 (the head's bf16 operands): from f32 logits when the dtype is f32.
    cases.push(Case {
        op: "target_logprobs_backward_to_bf16",
        out_dims: None,
        shape: format!("[{n}, {vocab}]"),
        inputs: cases.last().expect("the backward's case").inputs.clone(),
        fused: Box::new(move |x| {
            let to = |z: &Tensor, lse: &Tensor, t: &Tensor, g: &Tensor, first| {
                super::target_logprobs_backward_to(z, lse, t, g, first, DType::BF16)
            };
            backward(super::target_logprobs, to, x)?.to_dtype(x[0].dtype())
        }),
        slow: Box::new(move |x| {
            let slow = |z: &Tensor, lse: &Tensor, t: &Tensor, g: &Tensor, first| {
                super::target_logprobs_backward_slow(z, lse, t, g, first)?.to_dtype(DType::BF16)
            };
            backward(super::target_logprobs_slow, slow, x)?.to_dtype(x[0].dtype())
        }),
    });
    // The LM head's matmuls from bf16 operands into f32 (cuBLAS on CUDA), in its three layouts:
    // logits `h W^T`, `dh = dz W`, `dW = dz^T h`, flattened into one output.
    let (rows, cols, hidden) = if big { (256, 37_984, 896) } else { (29, 301, 64) };
    let mut mats = Vec::new();
    for (name, dims, seed) in [("h", [rows, hidden], 18), ("w", [cols, hidden], 19), ("dz", [rows, cols], 20)]
    {
        mats.push(Input { name, value: randn_tensor(&dims, seed, 1.0)?, grad: false, keep_f32: false });
    }
    let head_matmuls = |mm: fn(&Tensor, &Tensor) -> Result<Tensor>, x: &[Tensor]| -> Result<Tensor> {
        let (h, w, dz) =
            (x[0].to_dtype(DType::BF16)?, x[1].to_dtype(DType::BF16)?, x[2].to_dtype(DType::BF16)?);
        let outs = [mm(&h, &w.t()?)?, mm(&dz, &w)?, mm(&dz.t()?, &h)?];
        Tensor::cat(&outs.iter().map(|o| o.flatten_all()).collect::<Result<Vec<_>>>()?, 0)?
            .to_dtype(x[0].dtype())
    };
    cases.push(Case {
        op: "matmul_bf16_f32",
        out_dims: Some(vec![rows * cols + rows * hidden + cols * hidden]),
        shape: format!("[{rows}, {hidden}] x [{cols}, {hidden}]^T"),
        inputs: mats,
        fused: Box::new(move |x| head_matmuls(crate::matmul_bf16_f32, x)),
        slow: Box::new(move |x| {
            head_matmuls(|a, b| crate::matmul(&a.to_dtype(DType::F32)?, &b.to_dtype(DType::F32)?), x)
        }),
    });
    Ok(cases)
}

/// Tolerance on `max |got - want| / max |want|`.
pub(crate) fn tolerance(dt: DType, against_cpu: bool) -> f64 {
    match (dt, against_cpu) {
        (DType::F64, _) => 1e-12,
        (DType::F32, _) => 5e-5,
        // Same algorithm on both sides: at most about one rounding apart.
        (DType::F16, true) => 2e-3,
        (_, true) => 1.6e-2,
        // Against the f32 slow path on the same (bf16-rounded) inputs.
        (_, false) => 2e-2,
    }
}

/// Runs every fused op on `device` in f32 and bf16 on realistic shapes (small ones on the CPU),
/// forward and backward, and compares outputs and gradients with (a) the slow path on the same
/// device (for bf16: the slow path in f32 on the same bf16-rounded inputs, as the more exact
/// reference) and (b) the fused op on the CPU. Returns a report with one PASS/FAIL line per
/// comparison, mean forward+backward timings of fused vs slow, and a last line that starts with
/// `RESULT: PASS` or `RESULT: FAIL`.
pub fn self_check(device: &Device) -> Result<String> {
    let big = !device.is_cpu();
    let iters = if big { 5 } else { 2 };
    let mut rep = String::new();
    let _ = writeln!(rep, "dpo-model fused ops self-check on {device:?}");
    let _ = writeln!(
        rep,
        "error = max|got - want| / max|want| over the output and every gradient of sum(y * upstream)"
    );
    let (mut checks, mut failed) = (0usize, 0usize);
    let mut timings = String::new();
    for case in cases(big)? {
        let upstream = case.upstream(11)?;
        for dt in [DType::F32, DType::BF16] {
            let _ = writeln!(rep, "\n{} {:?} {}", case.op, dt, case.shape);
            let mut line = |what: &str, against: &str, r: Result<(f64, f64, bool)>, tol: f64| {
                checks += 1;
                match r {
                    Ok((d, scale, finite)) => {
                        let rel = d / scale.max(1e-30);
                        let ok = finite && rel <= tol;
                        failed += usize::from(!ok);
                        let _ = writeln!(
                            rep,
                            "  {what:<7} vs {against:<9} max_abs {d:9.2e}  rel {rel:9.2e}  tol {tol:7.1e}  {}{}",
                            if ok { "PASS" } else { "FAIL" },
                            if finite { "" } else { " (non-finite values)" }
                        );
                    }
                    Err(e) => {
                        failed += 1;
                        let _ = writeln!(rep, "  {what:<7} vs {against:<9} FAIL: {e}");
                    }
                }
            };
            let fused = case.run(true, device, dt, &upstream, None);
            // The slow reference: in f32 on the same values (rounded to dt first).
            let slow = case.run(false, device, DType::F32, &upstream, Some(dt));
            let cpu = if big { Some(case.run(true, &Device::Cpu, dt, &upstream, None)) } else { None };
            match &fused {
                Err(e) => line("fused", "-", Err(candle_core::Error::Msg(e.to_string())), 0.0),
                Ok(fused) => {
                    for (i, (what, got)) in parts(fused).into_iter().enumerate() {
                        let want = slow.as_ref().map_err(|e| candle_core::Error::Msg(e.to_string()));
                        let r = want.and_then(|w| compare(got, parts(w)[i].1));
                        line(what, "slow", r, tolerance(dt, false));
                        if let Some(cpu) = &cpu {
                            let want = cpu.as_ref().map_err(|e| candle_core::Error::Msg(e.to_string()));
                            let r = want.and_then(|w| compare(got, parts(w)[i].1));
                            line(what, "cpu-fused", r, tolerance(dt, true));
                        }
                    }
                }
            }
            let t = case.time(true, device, dt, &upstream, iters).and_then(|tf| {
                let ts = case.time(false, device, dt, &upstream, iters)?;
                Ok((tf, ts))
            });
            let _ = match t {
                Ok((tf, ts)) => writeln!(
                    timings,
                    "  {:<15} {:<5} {:<28} fused {tf:9.3} ms  slow {ts:9.3} ms  ({:.2}x)",
                    case.op,
                    format!("{dt:?}"),
                    case.shape,
                    ts / tf
                ),
                Err(e) => writeln!(timings, "  {:<15} {dt:?}: timing error: {e}", case.op),
            };
        }
    }
    // The optimizer's fused kernels (CUDA only): AdamW in place and the clipping norm.
    if device.is_cuda() {
        checks += 2;
        match adamw_and_norm_check(device) {
            Ok((adam, norm)) => {
                let (ok_a, ok_n) = (adam <= 1e-6, norm <= 1e-6);
                failed += usize::from(!ok_a) + usize::from(!ok_n);
                let verdict = |ok: bool| if ok { "PASS" } else { "FAIL" };
                let _ = writeln!(
                    rep,
                    "\nadamw (fused in place vs tensor ops) rel {adam:9.2e}  {}",
                    verdict(ok_a)
                );
                let _ =
                    writeln!(rep, "gradient norm (fused vs tensor ops) rel {norm:9.2e}  {}", verdict(ok_n));
            }
            Err(e) => {
                failed += 2;
                let _ = writeln!(rep, "\nadamw / gradient norm: FAIL: {e}");
            }
        }
    }
    let _ = writeln!(rep, "\nforward+backward timings (mean of {iters}, device synchronized):\n{timings}");
    if failed == 0 {
        let _ = writeln!(rep, "RESULT: PASS ({checks} checks)");
    } else {
        let _ = writeln!(rep, "RESULT: FAIL ({failed} of {checks} checks)");
    }
    Ok(rep)
}

/// The fused kernels on `device` against the same ops on the CPU, forward and every gradient,
/// in f32 and bf16, on small shapes (no timing; a fraction of a second): what a trainer runs
/// before it trusts a device's kernels (a GPU architecture or a build the kernels were never
/// checked on), so that a wrong kernel stops a run instead of training it silently wrong.
/// `Err` lists every disagreement; [`self_check`] gives the full report.
pub fn verify(device: &Device) -> Result<()> {
    if device.is_cpu() {
        return Ok(()); // the CPU kernels are the reference
    }
    // Full-precision f32 matmuls for the f32 checks, whatever an earlier run switched on (TF32).
    let tf32 = candle_core::cuda::gemm_reduced_precision_f32();
    candle_core::cuda::set_gemm_reduced_precision_f32(false);
    let failures = disagreements(device);
    candle_core::cuda::set_gemm_reduced_precision_f32(tf32);
    let failures = failures?;
    if failures.is_empty() {
        Ok(())
    } else {
        candle_core::bail!("{} (see `dpo-train doctor --device ...`)", failures.join("; "))
    }
}

/// [`verify`]'s comparisons, one line per disagreement (on the CPU: the CPU against itself).
pub(crate) fn disagreements(device: &Device) -> Result<Vec<String>> {
    let mut failures = Vec::new();
    for case in cases(false)? {
        let upstream = case.upstream(11)?;
        for dt in [DType::F32, DType::BF16] {
            let got = case.run(true, device, dt, &upstream, None);
            let want = case.run(true, &Device::Cpu, dt, &upstream, None)?;
            let got = match got {
                Ok(got) => got,
                Err(e) => {
                    failures.push(format!("{} {dt:?}: {e}", case.op));
                    continue;
                }
            };
            for ((what, g), (_, w)) in parts(&got).into_iter().zip(parts(&want)) {
                let (d, scale, finite) = compare(g, w)?;
                let rel = d / scale.max(1e-30);
                if !finite || rel > tolerance(dt, true) {
                    failures.push(format!("{} {dt:?} {what}: relative error {rel:.2e}", case.op));
                }
            }
        }
    }
    if device.is_cuda() {
        let (adam, norm) = adamw_and_norm_check(device)?;
        for (what, rel) in [("adamw", adam), ("gradient norm", norm)] {
            if rel.is_nan() || rel > 1e-6 {
                failures.push(format!("{what}: relative error {rel:.2e}"));
            }
        }
    }
    Ok(failures)
}

/// Relative errors of the fused AdamW step and clipping norm against tensor-op versions: the
/// norm of two tensors (the parameter and the gradient, so that they clip at 1) and the step
/// from the gradient scaled by its factor.
fn adamw_and_norm_check(device: &Device) -> Result<(f64, f64)> {
    let n = 1_000_003;
    let r = |seed: f64| -> Result<Tensor> {
        Tensor::arange(0u32, n as u32, device)?.to_dtype(DType::F32)?.affine(0.618_034, seed)?.sin()
    };
    let (p, m, g) = (r(0.1)?, (r(0.2)? * 0.01)?, r(0.3)?);
    let v = (r(0.4)?.sqr()? * 1e-4)?;
    let (decay, b1, b2, eps, step, bc2) = (0.999, 0.9, 0.999, 1e-8, 1e-3, 0.0447);
    let norm = [&p, &g]
        .iter()
        .map(|t| t.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>())
        .sum::<Result<f64>>()?
        .sqrt();
    let Some(clip) = super::clip_fused(&[p.clone(), g.clone()], 1.0)? else {
        candle_core::bail!("no fused clipping on {device:?}");
    };
    let (got_norm, factor) = super::read_clip(&clip)?;
    let factor_rel = (factor - 1.0 / (norm + 1e-6)).abs() * norm;
    // The reference, as crates/dpo-trainer/src/optim.rs computes it (the gradient clipped first).
    let gs = (&g * factor)?;
    let m2 = ((&m * b1)? + (&gs * (1.0 - b1))?)?;
    let v2 = ((&v * b2)? + (gs.sqr()? * (1.0 - b2))?)?;
    let p2 = ((&p * decay)? - ((&m2 / ((v2.sqrt()? / bc2)? + eps)?)? * step)?)?;
    let (p1, m1, v1) = (p.copy()?, m.copy()?, v.copy()?);
    let part = super::AdamWPart { p: &p1, m: &m1, v: &v1, g: &g, decay };
    if !super::adamw_fused(&[part], &clip, (b1, b2, eps), step, bc2)? {
        candle_core::bail!("no fused AdamW on {device:?}");
    }
    let rel = |a: &Tensor, b: &Tensor| -> Result<f64> {
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        Ok(d / (b.abs()?.max_all()?.to_scalar::<f32>()? as f64).max(1e-30))
    };
    let adam = rel(&p1, &p2)?.max(rel(&m1, &m2)?).max(rel(&v1, &v2)?);
    Ok((adam, ((got_norm - norm).abs() / norm).max(factor_rel)))
}
