//! The additive attention bias: 0 where a query may attend to a key, a large negative number
//! elsewhere (causal order, key padding, Mistral's sliding window).
//!
//! A large *finite* negative is used, not `-inf`: a fully masked row then gives a uniform
//! softmax instead of NaN, and NaN would survive any later zero mask.

use candle_core::{DType, Device, Result, Tensor};

/// The layout of one padded batch: the additive attention bias `[rows, 1, seq, seq]` (f32) and,
/// when they are not `0..seq` on every row, each token's position `[rows, seq]` (u32).
#[derive(Debug, Clone)]
pub struct AttentionMask {
    pub bias: Tensor,
    pub positions: Option<Tensor>,
    /// The largest of `positions`, known on the host (sizing the rotary tables without reading
    /// the device back).
    pub max_position: Option<u32>,
}

/// What a masked score becomes before the softmax (f32 softmax: `exp` of it is exactly 0).
pub const MASKED: f32 = -1e30;

impl AttentionMask {
    /// Causal mask with key padding: `key_valid[r * seq + j]` is 1 for a real token.
    /// With a `window`, query `i` sees keys `j` with `i - window < j <= i` (Mistral).
    pub fn causal(
        key_valid: &[u8],
        rows: usize,
        seq: usize,
        window: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        assert_eq!(key_valid.len(), rows * seq, "attention mask has the wrong size");
        let mut causal = vec![0f32; seq * seq];
        for i in 0..seq {
            for j in 0..seq {
                let in_window = window.is_none_or(|w| i < j + w);
                if j > i || !in_window {
                    causal[i * seq + j] = MASKED;
                }
            }
        }
        let pad: Vec<f32> = key_valid.iter().map(|&v| if v == 0 { MASKED } else { 0.0 }).collect();
        let causal = Tensor::from_vec(causal, (1, 1, seq, seq), device)?;
        let pad = Tensor::from_vec(pad, (rows, 1, 1, seq), device)?;
        // Sum of two large negatives stays finite in f32 (-2e30).
        let bias = causal.broadcast_add(&pad)?.to_dtype(DType::F32)?;
        Ok(AttentionMask { bias, positions: None, max_position: None })
    }

    /// An arbitrary layout: `allowed[(r * seq + i) * seq + j]` (0 or 1) says whether query `i`
    /// of row `r` sees key `j`; `positions[r * seq + i]` is the token's rotary position.
    ///
    /// On CUDA the mask travels as bytes and becomes the f32 bias there (`bias_from_allowed`):
    /// a quarter of the upload, and no pass over `rows * seq^2` entries on the host.
    pub fn custom(
        allowed: &[u8],
        positions: Vec<u32>,
        rows: usize,
        seq: usize,
        device: &Device,
    ) -> Result<Self> {
        assert_eq!(allowed.len(), rows * seq * seq, "mask has the wrong size");
        assert_eq!(positions.len(), rows * seq, "positions have the wrong size");
        let bias = if device.is_cuda() {
            bias_from_allowed(&Tensor::from_slice(allowed, (rows, 1, seq, seq), device)?)?
        } else {
            let bias: Vec<f32> = allowed.iter().map(|&a| if a != 0 { 0.0 } else { MASKED }).collect();
            Tensor::from_vec(bias, (rows, 1, seq, seq), device)?
        };
        Ok(AttentionMask {
            bias,
            max_position: positions.iter().copied().max(),
            positions: Some(Tensor::from_vec(positions, (rows, seq), device)?),
        })
    }
}

/// The f32 bias of a 0/1 (u8) mask where it lies, `allowed * -MASKED + MASKED`: 0 where 1,
/// [`MASKED`] where 0, exactly (`1e30 - 1e30` and `0 * 1e30 - 1e30` round to nothing).
fn bias_from_allowed(allowed: &Tensor) -> Result<Tensor> {
    allowed.to_dtype(DType::F32)?.affine(-MASKED as f64, MASKED as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bias made where the mask lies (CUDA's path, run here on the CPU) is the host's, bit
    /// for bit.
    #[test]
    fn bias_from_bytes_is_the_hosts() {
        let allowed = [1u8, 0, 1, 1, 0, 0, 1, 0];
        let positions = vec![0, 1, 0, 1];
        let host = AttentionMask::custom(&allowed, positions, 2, 2, &Device::Cpu).unwrap();
        let made =
            bias_from_allowed(&Tensor::from_slice(&allowed, (2, 1, 2, 2), &Device::Cpu).unwrap()).unwrap();
        let bits = |t: &Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(bits(&made), bits(&host.bias));
        assert_eq!(
            host.bias.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0.0, MASKED, 0.0, 0.0, MASKED, MASKED, 0.0, MASKED]
        );
    }
}
