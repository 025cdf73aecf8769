//! Text around the token loop: the chat template, and incremental detokenization with
//! stop strings (text is streamed only once it can no longer turn into a stop string, and
//! generation ends at the token that completes one).

use proto::v1::ChatMessage;
use std::sync::Arc;
use tokenizers::Tokenizer;

/// Renders chat messages in ChatML (the template of the Qwen2.5 and SmolLM2 instruct
/// models), ending with the assistant's turn.
pub fn chat_template(messages: &[ChatMessage]) -> Result<String, String> {
    if messages.is_empty() {
        return Err("chat: no messages".into());
    }
    for (i, m) in messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(format!(
                "chat.messages[{i}].role: '{}' is not system, user or assistant",
                m.role
            ));
        }
    }
    Ok(chatml(
        messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str())),
    ))
}

/// ChatML text of `(role, content)` turns, ending with the assistant's turn.
pub fn chatml<'a>(turns: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (role, content) in turns {
        out.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

/// New text and tokens since the previous push.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    pub text: String,
    pub tokens: Vec<u32>,
}

pub struct StopScan {
    tokenizer: Arc<Tokenizer>,
    stops: Vec<String>,
    tokens: Vec<u32>,
    text: String,
    streamed: usize,
    stopped: bool,
}

impl StopScan {
    pub fn new(tokenizer: Arc<Tokenizer>, stops: Vec<String>) -> Self {
        Self {
            tokenizer,
            stops,
            tokens: Vec::new(),
            text: String::new(),
            streamed: 0,
            stopped: false,
        }
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Tokens kept: everything up to the one that completed a stop string.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The text, cut before the first stop string.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Text not yet handed out by [`Self::push`].
    pub fn tail(&self) -> String {
        self.text[self.streamed..].to_string()
    }

    fn decode(&self) -> String {
        engine::tokenizer::decode(&self.tokenizer, &self.tokens, true).unwrap_or_default()
    }

    pub fn push(&mut self, new: &[u32]) -> Delta {
        if self.stopped {
            return Delta::default();
        }
        let before = self.tokens.len();
        if self.stops.is_empty() {
            self.tokens.extend_from_slice(new);
            self.text = self.decode();
        } else {
            // Token by token, so the kept tokens end where the stop string completes.
            for &t in new {
                self.tokens.push(t);
                let full = self.decode();
                if let Some(cut) = self.first_stop(&full) {
                    self.text = full[..cut].to_string();
                    self.stopped = true;
                    break;
                }
                self.text = full;
            }
        }
        let safe = if self.stopped {
            self.text.len()
        } else {
            self.safe_end()
        };
        let text = if safe > self.streamed {
            let t = self.text[self.streamed..safe].to_string();
            self.streamed = safe;
            t
        } else {
            String::new()
        };
        Delta {
            text,
            tokens: self.tokens[before..].to_vec(),
        }
    }

    fn first_stop(&self, full: &str) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| full.find(s.as_str()))
            .min()
    }

    /// End of the text that can be shown now: not an unfinished UTF-8 sequence (decoded as
    /// U+FFFD) and not a suffix that could still grow into a stop string.
    fn safe_end(&self) -> usize {
        let shown = self.text.trim_end_matches('\u{FFFD}').len();
        let mut end = shown;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.text[..shown].ends_with(&s[..i]) {
                    end = end.min(shown - i);
                }
            }
        }
        // Never step back over text already streamed.
        end.max(self.streamed)
    }
}
