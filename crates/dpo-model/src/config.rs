//! `config.json` of a Hugging Face causal LM, in both the transformers 4 layout (`rope_theta`,
//! `rope_scaling` at top level) and the transformers 5 layout (`rope_parameters`).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::ModelError;

/// The architectures this crate builds. All three share one decoder block (pre-norm RMSNorm,
/// rotary attention with grouped KV heads, SwiGLU MLP); they differ in biases and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Arch {
    Llama,
    Qwen2,
    Mistral,
}

impl Arch {
    fn from_config(architectures: &[String], model_type: Option<&str>) -> Option<Arch> {
        let by_class = architectures.iter().find_map(|a| match a.as_str() {
            "LlamaForCausalLM" => Some(Arch::Llama),
            "Qwen2ForCausalLM" => Some(Arch::Qwen2),
            "MistralForCausalLM" => Some(Arch::Mistral),
            _ => None,
        });
        by_class.or(match model_type {
            Some("llama") => Some(Arch::Llama),
            Some("qwen2") => Some(Arch::Qwen2),
            Some("mistral") => Some(Arch::Mistral),
            _ => None,
        })
    }

    /// The `architectures` entry transformers expects in `config.json`.
    pub fn class_name(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
        }
    }
}

/// How rotary frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum RopeScaling {
    /// `inv_freq = 1 / theta^(2i/d)`.
    Default,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.x: low frequencies divided by `factor`, high kept, a smooth ramp between.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

/// The fields of `config.json` the model needs, resolved to one layout.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Bias on q, k, v projections (always on for Qwen2).
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    /// Mistral's attention window; `None` attends to the whole prefix.
    pub sliding_window: Option<usize>,
    /// The embedding's `padding_idx` in transformers: that row gets no input-side gradient.
    pub pad_token_id: Option<u32>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    pad_token_id: Option<Value>,
}

impl ModelConfig {
    /// Reads and resolves `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(&text).map_err(|msg| ModelError::Config { path: path.to_path_buf(), msg })
    }

    /// Parses the text of a `config.json`; the error is a message for the caller to place.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let arch = Arch::from_config(&raw.architectures, raw.model_type.as_deref()).ok_or_else(|| {
            format!(
                "unsupported architecture {:?} (model_type {:?}); supported: LlamaForCausalLM, \
                 Qwen2ForCausalLM, MistralForCausalLM",
                raw.architectures, raw.model_type
            )
        })?;
        if raw.num_attention_heads == 0 || raw.hidden_size == 0 {
            return Err("hidden_size and num_attention_heads must be positive".into());
        }
        let num_kv = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if num_kv == 0 || !raw.num_attention_heads.is_multiple_of(num_kv) {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({num_kv})",
                raw.num_attention_heads
            ));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads);
        // transformers 5 folds theta and scaling into `rope_parameters`; 4 keeps them apart.
        let rope = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let rope_theta = raw
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(raw.rope_theta)
            .unwrap_or(10000.0);
        let rope_scaling = parse_rope_scaling(rope)?;
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2 => (true, false),
            Arch::Llama => {
                let b = raw.attention_bias.unwrap_or(false);
                (b, b)
            }
            Arch::Mistral => (false, false),
        };
        let sliding_window = match arch {
            Arch::Mistral => raw.sliding_window,
            Arch::Qwen2 if raw.use_sliding_window == Some(true) => raw.sliding_window,
            _ => None,
        };
        Ok(ModelConfig {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: num_kv,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: arch == Arch::Llama && raw.mlp_bias.unwrap_or(false),
            sliding_window,
            pad_token_id: raw.pad_token_id.as_ref().and_then(Value::as_u64).map(|v| v as u32),
        })
    }

    /// Parameters of the model, counting a tied embedding once.
    pub fn num_parameters(&self) -> usize {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (q, kv) = (self.num_attention_heads * hd, self.num_key_value_heads * hd);
        let attn = h * q
            + 2 * h * kv
            + q * h
            + if self.qkv_bias { q + 2 * kv } else { 0 }
            + if self.o_bias { h } else { 0 };
        let mlp = 3 * h * i + if self.mlp_bias { 2 * i + h } else { 0 };
        let layer = attn + mlp + 2 * h;
        let emb = self.vocab_size * h;
        emb + self.num_hidden_layers * layer + h + if self.tie_word_embeddings { 0 } else { emb }
    }
}

fn parse_rope_scaling(v: Option<&Value>) -> Result<RopeScaling, String> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::Default);
    };
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |key: &str| {
        v.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("rope scaling `{kind}` needs a numeric `{key}`"))
    };
    match kind {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => {
            Err(format!("rope scaling type `{other}` is not supported (supported: default, linear, llama3)"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN_V5: &str = r#"{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","vocab_size":100,
      "hidden_size":32,"intermediate_size":48,"num_hidden_layers":2,"num_attention_heads":4,
      "num_key_value_heads":2,"rms_norm_eps":1e-6,"tie_word_embeddings":true,"sliding_window":null,
      "rope_parameters":{"rope_type":"default","rope_theta":1000000.0}}"#;
    const QWEN_V4: &str = r#"{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","vocab_size":100,
      "hidden_size":32,"intermediate_size":48,"num_hidden_layers":2,"num_attention_heads":4,
      "num_key_value_heads":2,"rms_norm_eps":1e-6,"tie_word_embeddings":true,"rope_theta":1000000.0,
      "rope_scaling":null,"sliding_window":4096,"use_sliding_window":false}"#;

    #[test]
    fn both_layouts_resolve_to_the_same_rope() {
        let a = ModelConfig::from_json(QWEN_V5).unwrap();
        let b = ModelConfig::from_json(QWEN_V4).unwrap();
        assert_eq!(a.rope_theta, 1e6);
        assert_eq!(b.rope_theta, 1e6);
        assert_eq!(a.rope_scaling, RopeScaling::Default);
        assert_eq!(a.sliding_window, None);
        assert_eq!(b.sliding_window, None);
        assert!(a.qkv_bias && !a.o_bias && a.tie_word_embeddings);
    }

    #[test]
    fn llama3_scaling_in_v5_layout() {
        let c = ModelConfig::from_json(
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":8,
            "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,
            "rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#,
        )
        .unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.head_dim, 4);
    }

    #[test]
    fn unknown_architecture_and_rope_are_named() {
        let e = ModelConfig::from_json(
            r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":10,"hidden_size":8,
            "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2}"#,
        )
        .unwrap_err();
        assert!(e.contains("GPT2LMHeadModel"), "{e}");
        let e = ModelConfig::from_json(
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":8,
            "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,
            "rope_scaling":{"type":"yarn","factor":4.0}}"#,
        )
        .unwrap_err();
        assert!(e.contains("yarn"), "{e}");
    }
}
