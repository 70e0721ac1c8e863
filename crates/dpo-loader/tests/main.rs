//! dpo-loader's integration tests as one test binary, a module per file.

mod chat;
mod common;
mod conversational;
mod data;
mod parquet;
mod shards;
mod stream;
mod tokenize;
mod trl_parity;
