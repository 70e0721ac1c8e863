//! `dpo-train data inspect --config X [--rows N]`: what the trainer will make of the data. For the
//! first rows: the rendered prompt and completions, the token ids, where the prompt ends and what
//! truncation removes; then, over every row: counts, skipped or dropped rows by reason (with the
//! first example of each), token length quantiles, and the padding of an epoch's batches with and
//! without `group_by_length`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use dpo_loader::{
    DataConfig, DataPosition, LoaderError, PreferenceDataset, PreferenceTokenizer, SkipCounts, TokenizedPair,
};

use crate::config;

#[derive(clap::Subcommand, Debug)]
pub enum DataCommand {
    /// Show how rows are rendered, tokenized, truncated and counted.
    Inspect(InspectArgs),
}

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// The run's TOML config (its model, train_file/eval_file and data settings are used).
    #[arg(long)]
    config: PathBuf,
    /// Rows shown in full, from the start of the file.
    #[arg(long, default_value_t = 3)]
    rows: usize,
    /// Inspect `eval_file` instead of `train_file`.
    #[arg(long)]
    eval: bool,
    /// Override a config key, e.g. `--set max_length=2048` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

pub fn run(command: DataCommand) -> Result<()> {
    let DataCommand::Inspect(args) = command;
    let mut cfg = config::load(&args.config, &args.overrides)?;
    crate::hub::resolve_model(&mut cfg)?;
    let file = if args.eval {
        cfg.eval_file.clone().context("--eval: the config has no `eval_file`")?
    } else {
        cfg.train_file.clone()
    };
    let data_cfg = cfg.data_config(cfg.batch_size);
    let tokenizer =
        Arc::new(PreferenceTokenizer::from_model_dir(&cfg.model).context("loading the tokenizer")?);
    let dataset = Arc::new(PreferenceDataset::open(&file).context("opening the data")?);
    let mut report = inspect(&dataset, &tokenizer, &data_cfg, args.rows)?;
    padding(&mut report, &dataset, &tokenizer, &data_cfg);
    print!("{report}");
    Ok(())
}

/// The whole report as text.
pub fn inspect(
    dataset: &PreferenceDataset,
    tokenizer: &PreferenceTokenizer,
    cfg: &DataConfig,
    rows: usize,
) -> Result<String> {
    let mut out = String::new();
    header(&mut out, dataset, tokenizer, cfg);
    for i in 0..rows.min(dataset.len()) {
        show_row(&mut out, dataset, tokenizer, cfg, i);
    }
    summary(&mut out, dataset, tokenizer, cfg)?;
    Ok(out)
}

fn header(out: &mut String, dataset: &PreferenceDataset, tokenizer: &PreferenceTokenizer, cfg: &DataConfig) {
    let _ = writeln!(out, "data: {} ({} rows)", dataset.path().display(), dataset.len());
    if dataset.n_shards() > 1 {
        for p in dataset.shard_paths() {
            let _ = writeln!(out, "  shard {}", p.display());
        }
    }
    let order = match (cfg.shuffle, dataset.random_access()) {
        (false, _) => "file order".to_owned(),
        (true, true) => format!("full shuffle (seed {})", cfg.seed),
        (true, false) => {
            format!("streamed, shuffle buffer of {} rows (seed {})", cfg.shuffle_buffer, cfg.seed)
        }
    };
    let _ = writeln!(out, "order: {order}; on_bad_row = {:?}", cfg.on_bad_row);
    let tok = tokenizer.inner();
    let name = |id: u32| tok.id_to_token(id).unwrap_or_default();
    let _ = writeln!(
        out,
        "tokenizer: eos {:?} (id {}), pad {:?} (id {}); chat template: {}",
        tokenizer.eos_token(),
        tokenizer.eos_id(),
        name(tokenizer.pad_id()),
        tokenizer.pad_id(),
        match tokenizer.chat_template() {
            Ok(t) => format!("yes ({} bytes)", t.source().len()),
            Err(why) => format!("none ({why})"),
        }
    );
    let _ = writeln!(
        out,
        "max_length: {}",
        cfg.max_length.map_or("none".to_owned(), |m| format!("{m} (rows keep their first {m} tokens)"))
    );
}

fn show_row(
    out: &mut String,
    dataset: &PreferenceDataset,
    tokenizer: &PreferenceTokenizer,
    cfg: &DataConfig,
    i: usize,
) {
    let source = dataset.source(i);
    let _ = writeln!(out, "\n=== row {} ({source})", i + 1);
    let row = match dataset.read_row(i) {
        Ok(row) => row,
        Err(e) => {
            let _ = writeln!(out, "BAD ROW ({}): {e}", e.skip_reason().unwrap_or("fatal"));
            return;
        }
    };
    let kind = if row.is_conversational() { "conversational (chat template)" } else { "text" };
    let rendered = match tokenizer.render_row(&row, &source) {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(out, "format: {kind}\nBAD ROW ({}): {e}", e.skip_reason().unwrap_or("fatal"));
            return;
        }
    };
    let _ = writeln!(
        out,
        "format: {kind}; special tokens added by the tokenizer: {}",
        if rendered.add_special_tokens { "yes" } else { "no (the template writes them)" }
    );
    let pair = match tokenizer.tokenize_rendered(&rendered, source) {
        Ok(p) => p,
        Err(e) => {
            let _ = writeln!(out, "BAD ROW: {e}");
            return;
        }
    };
    let decode = |ids: &[u32]| tokenizer.inner().decode(ids, false).unwrap_or_else(|e| format!("<{e}>"));
    let full_prompt = tokenizer.inner().encode_fast(rendered.prompt.as_str(), rendered.add_special_tokens);
    let full_prompt_len = full_prompt.map(|e| e.get_ids().len()).unwrap_or(pair.prompt_ids.len());
    let _ = writeln!(out, "--- prompt text:\n{}", indent(&rendered.prompt));
    let _ = writeln!(out, "--- prompt ids ({}): {:?}", pair.prompt_ids.len(), pair.prompt_ids);
    if full_prompt_len > pair.prompt_ids.len() {
        let _ = writeln!(
            out,
            "    note: the prompt alone has {full_prompt_len} tokens but only the first {} start both \
             completions; the rest is left out (the template renders the prompt alone differently, or tokens \
             merge across the boundary)",
            pair.prompt_ids.len()
        );
    }
    for (name, text, ids) in [
        ("chosen", &rendered.prompt_chosen, &pair.chosen_ids),
        ("rejected", &rendered.prompt_rejected, &pair.rejected_ids),
    ] {
        let _ = writeln!(out, "--- prompt + {name} text:\n{}", indent(text));
        let _ = writeln!(
            out,
            "--- {name} completion (starts at token {}), decoded: {:?}",
            pair.prompt_ids.len(),
            decode(ids)
        );
        let _ = writeln!(out, "--- {name} ids ({}): {:?}", ids.len(), ids);
        if let Some(m) = cfg.max_length {
            let len = pair.prompt_ids.len() + ids.len();
            if len > m {
                let cut = len - m;
                let _ = writeln!(
                    out,
                    "    truncated: {len} -> {m} tokens; removed the last {cut}: {:?}",
                    decode(&ids[ids.len().saturating_sub(cut)..])
                );
            }
        }
    }
    if cfg.max_length.is_some_and(|m| pair.prompt_ids.len() >= m) {
        let _ = writeln!(out, "DROPPED (prompt_too_long): the prompt alone fills max_length");
    }
}

/// Padding of the batches of epoch 0: `(real tokens, padded tokens, batches)`.
pub fn epoch_padding(
    dataset: &Arc<PreferenceDataset>,
    tokenizer: &Arc<PreferenceTokenizer>,
    cfg: &DataConfig,
) -> std::result::Result<(usize, usize, usize), LoaderError> {
    let (mut real, mut padded, mut n) = (0, 0, 0);
    for batch in
        dpo_loader::batches(dataset.clone(), tokenizer.clone(), cfg.clone(), DataPosition::start_of(0))?
    {
        let batch = batch?;
        real += batch.n_tokens;
        padded += batch.n_rows() * batch.seq_len;
        n += 1;
    }
    Ok((real, padded, n))
}

/// The padding line of the report: epoch 0 batched without and with `group_by_length`.
fn padding(
    out: &mut String,
    dataset: &Arc<PreferenceDataset>,
    tokenizer: &Arc<PreferenceTokenizer>,
    cfg: &DataConfig,
) {
    let _ = writeln!(
        out,
        "padding of epoch 0's batches of {} (share of batch tokens that are padding; the standard layout):",
        cfg.batch_size
    );
    for group in [false, true] {
        let what = if group {
            format!("group_by_length = true (windows of {} batches)", cfg.length_group_batches)
        } else {
            "group_by_length = false".to_owned()
        };
        let mark = if group == cfg.group_by_length { "   <- this config" } else { "" };
        let c = DataConfig { group_by_length: group, ..cfg.clone() };
        let line = match epoch_padding(dataset, tokenizer, &c) {
            Ok((real, padded, n)) => format!(
                "{:5.1}% ({} padded tokens, {real} real, {n} batches)",
                100.0 * (padded - real) as f64 / padded.max(1) as f64,
                padded
            ),
            Err(e) => format!("not computed ({e})"),
        };
        let _ = writeln!(out, "  {what:<48} {line}{mark}");
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    | {l}")).collect::<Vec<_>>().join("\n")
}

/// Quantiles of a list of lengths.
fn quantiles(values: &mut [u32]) -> String {
    if values.is_empty() {
        return "-".into();
    }
    values.sort_unstable();
    let q = |p: f64| values[((values.len() - 1) as f64 * p).round() as usize];
    format!(
        "min {:>6}  p50 {:>6}  p90 {:>6}  p99 {:>6}  max {:>6}",
        values[0],
        q(0.5),
        q(0.9),
        q(0.99),
        values[values.len() - 1]
    )
}

fn summary(
    out: &mut String,
    dataset: &PreferenceDataset,
    tokenizer: &PreferenceTokenizer,
    cfg: &DataConfig,
) -> Result<()> {
    let mut skips = SkipCounts::default();
    let mut first: BTreeMap<&'static str, String> = BTreeMap::new();
    let mut first_fatal: Option<String> = None;
    let (mut prompt, mut chosen, mut rejected) = (Vec::new(), Vec::new(), Vec::new());
    let (mut kept, mut truncated_chosen, mut truncated_rejected) = (0usize, 0usize, 0usize);
    dpo_loader::scan_rows(dataset, tokenizer, cfg.tokenizer_threads, |_, row| {
        let pair: TokenizedPair = match row {
            Ok(pair) => pair,
            Err(e) => {
                let reason = e.skip_reason();
                if first_fatal.is_none()
                    && (reason.is_none() || cfg.on_bad_row == dpo_loader::OnBadRow::Error)
                {
                    first_fatal = Some(e.to_string());
                }
                match reason {
                    Some(reason) => {
                        skips.add(reason);
                        first.entry(reason).or_insert_with(|| e.to_string());
                    }
                    None => return Err(e),
                }
                return Ok(());
            }
        };
        let p = pair.prompt_ids.len();
        prompt.push(p as u32);
        chosen.push((p + pair.chosen_ids.len()) as u32);
        rejected.push((p + pair.rejected_ids.len()) as u32);
        match cfg.max_length {
            Some(m) if p >= m => {
                skips.add("prompt_too_long");
                first
                    .entry("prompt_too_long")
                    .or_insert_with(|| format!("{}: prompt of {p} tokens", pair.source));
            }
            m => {
                kept += 1;
                truncated_chosen += usize::from(m.is_some_and(|m| p + pair.chosen_ids.len() > m));
                truncated_rejected += usize::from(m.is_some_and(|m| p + pair.rejected_ids.len() > m));
            }
        }
        Ok::<(), LoaderError>(())
    })
    .context("reading the data")?;
    let _ = writeln!(out, "\n=== summary");
    let _ = writeln!(
        out,
        "rows: {}   pairs kept: {kept}   skipped or dropped: {}   batches of {}: {}",
        dataset.len(),
        skips.total(),
        cfg.batch_size,
        if cfg.drop_last { kept / cfg.batch_size } else { kept.div_ceil(cfg.batch_size) }
    );
    for (reason, n) in &skips.0 {
        let example = first.get(reason.as_str()).map(String::as_str).unwrap_or_default();
        let _ = writeln!(out, "  {reason}: {n}   (first: {example})");
    }
    if let Some(e) = first_fatal {
        let _ = writeln!(out, "with on_bad_row = \"error\" training stops at: {e}");
    }
    let _ = writeln!(out, "token lengths (before truncation, rows that tokenize):");
    let _ = writeln!(out, "  prompt           {}", quantiles(&mut prompt));
    let _ = writeln!(out, "  prompt+chosen    {}", quantiles(&mut chosen));
    let _ = writeln!(out, "  prompt+rejected  {}", quantiles(&mut rejected));
    if let Some(m) = cfg.max_length {
        let _ = writeln!(
            out,
            "truncated to max_length {m}: {truncated_chosen} chosen rows, {truncated_rejected} rejected rows (of {kept} kept pairs)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/chat/mistral");

    #[test]
    fn report_shows_rows_and_counts() {
        let tok = PreferenceTokenizer::from_model_dir(FIXTURES).unwrap();
        let data = PreferenceDataset::open(format!("{FIXTURES}/data.jsonl")).unwrap();
        let cfg = DataConfig { max_length: Some(40), shuffle: false, ..DataConfig::default() };
        let report = inspect(&data, &tok, &cfg, 2).unwrap();
        assert!(report.contains("=== row 1 ("), "{report}");
        assert!(report.contains("format: conversational (chat template)"), "{report}");
        assert!(report.contains("    | <s>[INST] What color is the sky?[/INST]"), "{report}");
        assert!(report.contains("--- chosen completion (starts at token"), "{report}");
        assert!(report.contains("rows: 11"), "{report}");
        assert!(report.contains("template_error: 1   (first: "), "{report}");
        assert!(report.contains("with on_bad_row = \"error\" training stops at: "), "{report}");
        assert!(report.contains("  prompt           min "), "{report}");
        assert!(report.contains("truncated to max_length 40: "), "{report}");
    }

    #[test]
    fn padding_line_compares_grouped_and_ungrouped_batches() {
        let tok = Arc::new(PreferenceTokenizer::from_model_dir(FIXTURES).unwrap());
        let data = Arc::new(PreferenceDataset::open(format!("{FIXTURES}/data.jsonl")).unwrap());
        let cfg = DataConfig {
            max_length: Some(40),
            batch_size: 2,
            on_bad_row: dpo_loader::OnBadRow::Skip,
            ..DataConfig::default()
        };
        let mut report = String::new();
        padding(&mut report, &data, &tok, &cfg);
        assert!(report.contains("padding of epoch 0's batches of 2"), "{report}");
        assert!(report.contains("group_by_length = false"), "{report}");
        assert!(report.contains("<- this config"), "{report}");
        let (real, plain, n) = epoch_padding(&data, &tok, &cfg).unwrap();
        let grouped = DataConfig { group_by_length: true, ..cfg };
        let (real_g, padded_g, n_g) = epoch_padding(&data, &tok, &grouped).unwrap();
        assert_eq!((real, n), (real_g, n_g));
        assert!(padded_g <= plain, "{padded_g} > {plain}");
    }
}
