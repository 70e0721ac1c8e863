//! The chat-template renderer on arbitrary template sources and message lists: the input is a
//! template, a NUL byte, and a JSON message list. Compile and render errors are fine; panics,
//! hangs (bounded by the renderer's fuel) and unbounded memory are not.
#![no_main]

use std::collections::BTreeMap;

use dpo_loader::{ChatTemplate, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (source, rest) = match data.iter().position(|&b| b == 0) {
        Some(k) => (&data[..k], &data[k + 1..]),
        None => (data, &b"[{\"role\": \"user\", \"content\": \"hi\"}]"[..]),
    };
    let Ok(source) = std::str::from_utf8(source) else { return };
    let messages: Vec<Message> = serde_json::from_slice(rest).unwrap_or_default();
    let specials = BTreeMap::from([
        ("bos_token".to_owned(), "<s>".to_owned()),
        ("eos_token".to_owned(), "</s>".to_owned()),
    ]);
    let Ok(template) = ChatTemplate::new(source, specials) else { return };
    for generation in [false, true] {
        let _ = template.render(&messages, generation, None, &serde_json::Map::new());
    }
});
