//! Collation of tokenized pairs into padded batches, like TRL's `DataCollatorForPreference`.

use crate::error::RowRef;
use crate::tokenize::TokenizedPair;

/// A padded batch of `n_pairs` pairs: `2 * n_pairs` rows of `seq_len` tokens, row-major.
///
/// Rows `0..n_pairs` are prompt+chosen, rows `n_pairs..2*n_pairs` prompt+rejected, in pair order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub n_pairs: usize,
    pub seq_len: usize,
    /// Token ids, `pad_id` after each row's end.
    pub input_ids: Vec<u32>,
    /// 1 on real tokens, 0 on padding.
    pub attention_mask: Vec<u8>,
    /// 1 on completion tokens, 0 on prompt tokens and padding.
    pub completion_mask: Vec<u8>,
    /// Where each pair comes from.
    pub sources: Vec<RowRef>,
    /// Number of real tokens (sum of `attention_mask`).
    pub n_tokens: usize,
}

impl Batch {
    /// Number of rows, `2 * n_pairs`.
    pub fn n_rows(&self) -> usize {
        2 * self.n_pairs
    }

    /// Row `r` of `input_ids`.
    pub fn input_row(&self, r: usize) -> &[u32] {
        &self.input_ids[r * self.seq_len..(r + 1) * self.seq_len]
    }
}

/// Collates pairs: each row is truncated to its first `max_length` tokens, right-padded with
/// `pad_id` to the longest row, rounded up to a multiple of `pad_to_multiple_of` if set.
pub fn collate(
    pairs: &[TokenizedPair],
    pad_id: u32,
    max_length: Option<usize>,
    pad_to_multiple_of: Option<usize>,
) -> Batch {
    let rows: Vec<(&[u32], &[u32])> = [false, true]
        .into_iter()
        .flat_map(|rejected| {
            pairs.iter().map(move |p| {
                let completion = if rejected { &p.rejected_ids } else { &p.chosen_ids };
                (p.prompt_ids.as_slice(), completion.as_slice())
            })
        })
        .collect();
    let row_len = |(p, c): &(&[u32], &[u32])| {
        let len = p.len() + c.len();
        max_length.map_or(len, |m| len.min(m))
    };
    let mut seq_len = rows.iter().map(row_len).max().unwrap_or(0);
    if let Some(m) = pad_to_multiple_of.filter(|&m| m > 0) {
        seq_len = seq_len.div_ceil(m) * m;
    }

    let size = rows.len() * seq_len;
    let mut input_ids = vec![pad_id; size];
    let mut attention_mask = vec![0; size];
    let mut completion_mask = vec![0; size];
    let mut n_tokens = 0;
    for (r, row) in rows.iter().enumerate() {
        let (prompt, completion) = *row;
        let len = row_len(row);
        let base = r * seq_len;
        let tokens = prompt.iter().chain(completion).take(len);
        for (k, &t) in tokens.enumerate() {
            input_ids[base + k] = t;
            attention_mask[base + k] = 1;
            completion_mask[base + k] = u8::from(k >= prompt.len());
        }
        n_tokens += len;
    }
    Batch {
        n_pairs: pairs.len(),
        seq_len,
        input_ids,
        attention_mask,
        completion_mask,
        sources: pairs.iter().map(|p| p.source.clone()).collect(),
        n_tokens,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::*;

    fn pair(prompt: &[u32], chosen: &[u32], rejected: &[u32], line: u64) -> TokenizedPair {
        TokenizedPair {
            prompt_ids: prompt.to_vec(),
            chosen_ids: chosen.to_vec(),
            rejected_ids: rejected.to_vec(),
            source: RowRef { file: Arc::new(PathBuf::from("x.jsonl")), line },
        }
    }

    /// The example from TRL's `DataCollatorForPreference` docstring.
    #[test]
    fn matches_trl_docstring_example() {
        let pairs = [pair(&[1, 2, 3], &[4, 5], &[6], 1), pair(&[7, 8], &[9], &[10, 11], 2)];
        let b = collate(&pairs, 0, None, None);
        assert_eq!((b.n_pairs, b.seq_len, b.n_rows()), (2, 5, 4));
        #[rustfmt::skip]
        assert_eq!(b.input_ids, [1, 2, 3, 4, 5,  7, 8, 9, 0, 0,  1, 2, 3, 6, 0,  7, 8, 10, 11, 0]);
        #[rustfmt::skip]
        assert_eq!(b.attention_mask, [1, 1, 1, 1, 1,  1, 1, 1, 0, 0,  1, 1, 1, 1, 0,  1, 1, 1, 1, 0]);
        #[rustfmt::skip]
        assert_eq!(b.completion_mask, [0, 0, 0, 1, 1,  0, 0, 1, 0, 0,  0, 0, 0, 1, 0,  0, 0, 1, 1, 0]);
        assert_eq!(b.n_tokens, 16);
        assert_eq!(b.sources.iter().map(|s| s.line).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(b.input_row(3), [7, 8, 10, 11, 0]);
    }

    #[test]
    fn truncates_rows_to_max_length_and_pads_to_multiple() {
        let pairs = [pair(&[1, 2], &[3, 4, 5], &[6], 1)];
        let b = collate(&pairs, 9, Some(4), Some(3));
        assert_eq!(b.seq_len, 6);
        assert_eq!(b.input_ids, [1, 2, 3, 4, 9, 9, 1, 2, 6, 9, 9, 9]);
        assert_eq!(b.attention_mask, [1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0]);
        assert_eq!(b.completion_mask, [0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(b.n_tokens, 7);
        // An exact multiple is not padded further.
        assert_eq!(collate(&pairs, 9, Some(4), Some(2)).seq_len, 4);
    }
}
