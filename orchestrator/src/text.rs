//! Incremental detokenization with stop strings: text is streamed only once it can no
//! longer turn into a stop string, and generation ends at the token that completes one.

use std::sync::Arc;
use tokenizers::Tokenizer;

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
    /// `tokens[decoded..]` are not in `text` yet (an unfinished UTF-8 sequence, or a
    /// token that decodes to nothing so far).
    decoded: usize,
    /// Tokens decoded again before `decoded`, so that merges across the boundary (a
    /// leading space, a multi-byte character) come out as in a whole decode.
    context: usize,
    streamed: usize,
    stopped: bool,
}

/// Tokens of context re-decoded before the new ones: enough for any byte sequence of one
/// character split over tokens.
const DECODE_CONTEXT: usize = 5;

impl StopScan {
    pub fn new(tokenizer: Arc<Tokenizer>, stops: Vec<String>) -> Self {
        Self {
            tokenizer,
            stops,
            tokens: Vec::new(),
            text: String::new(),
            decoded: 0,
            context: 0,
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

    fn decode(&self, ids: &[u32]) -> String {
        engine::tokenizer::decode(&self.tokenizer, ids, true).unwrap_or_default()
    }

    /// Appends the text that the tokens since the last call complete: the decode of a
    /// short window of earlier tokens plus the new ones, minus the window's own text.
    /// Work per token stays constant however long the output grows.
    /// With `flush`, an unfinished character at the end is taken as it decodes (U+FFFD).
    fn decode_new(&mut self, flush: bool) -> usize {
        let before = self.decode(&self.tokens[self.context..self.decoded]);
        let after = self.decode(&self.tokens[self.context..]);
        if after.len() <= before.len() || (!flush && after.ends_with('\u{FFFD}')) {
            return 0;
        }
        let old = self.text.len();
        if after.starts_with(&before) {
            self.text.push_str(&after[before.len()..]);
        } else {
            // The window decodes differently on its own: take the whole text once.
            let full = self.decode(&self.tokens);
            // Text already streamed must not change; `get` also refuses a cut inside a
            // character of either string.
            let keep = self.streamed.min(full.len());
            if full.get(..keep).is_some() && full.get(..keep) == self.text.get(..keep) {
                self.text = full;
            } else {
                return 0;
            }
        }
        self.decoded = self.tokens.len();
        self.context = self.decoded.saturating_sub(DECODE_CONTEXT);
        self.text.len().saturating_sub(old)
    }

    /// At the end of generation: the text of tokens held back as an unfinished character.
    pub fn finish(&mut self) {
        if !self.stopped && self.decoded < self.tokens.len() {
            self.decode_new(true);
        }
    }

    pub fn push(&mut self, new: &[u32]) -> Delta {
        if self.stopped {
            return Delta::default();
        }
        let before = self.tokens.len();
        if self.stops.is_empty() {
            self.tokens.extend_from_slice(new);
            self.decode_new(false);
        } else {
            // Token by token, so the kept tokens end where the stop string completes.
            for &t in new {
                self.tokens.push(t);
                let added = self.decode_new(false);
                if added == 0 {
                    continue;
                }
                // Only a stop string that ends in the new text can be new.
                let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
                let mut from = self.text.len().saturating_sub(added + longest);
                while !self.text.is_char_boundary(from) {
                    from -= 1;
                }
                if let Some(cut) = self.first_stop(&self.text[from..]) {
                    self.text.truncate(from + cut);
                    self.stopped = true;
                    break;
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen() -> Arc<Tokenizer> {
        let p = engine::models::models_dir().join("qwen-tokenizer.json");
        Arc::new(engine::tokenizer::from_file(&p).expect("scripts/fetch-models.sh tokenizer"))
    }

    const TEXTS: &[&str] = &[
        "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))",
        "日本語のテキストと中文混合, émigré naïve café 🚀🎉 done",
        "<|im_start|>user\nhi<|im_end|>\n   indented\ttabs\n\n",
    ];

    /// Pushing tokens in pieces of any size streams exactly the whole decode.
    #[test]
    fn incremental_text_equals_whole_decode() {
        let tok = qwen();
        for text in TEXTS {
            let ids = engine::tokenizer::encode(&tok, text).unwrap();
            let whole = engine::tokenizer::decode(&tok, &ids, true).unwrap();
            for piece in [1, 2, 3, 7] {
                let mut scan = StopScan::new(tok.clone(), vec![]);
                let mut streamed = String::new();
                for chunk in ids.chunks(piece) {
                    streamed += &scan.push(chunk).text;
                }
                scan.finish();
                streamed += &scan.tail();
                assert_eq!(streamed, whole, "pieces of {piece}");
                assert_eq!(scan.text(), whole);
            }
        }
    }

    /// A stop string ends the text before it and keeps the tokens up to the one that
    /// completed it, wherever the pieces split; text that could start a stop string is
    /// held back until it cannot.
    #[test]
    fn stop_strings_cut_at_their_first_occurrence() {
        let tok = qwen();
        let text = "alpha beta\n\ngamma delta\n\nepsilon";
        let ids = engine::tokenizer::encode(&tok, text).unwrap();
        for piece in [1, 2, 5, 100] {
            let mut scan = StopScan::new(tok.clone(), vec!["\n\n".into(), "zeta".into()]);
            let mut streamed = String::new();
            for chunk in ids.chunks(piece) {
                streamed += &scan.push(chunk).text;
                assert!(!streamed.contains("\n\n"), "held back: {streamed:?}");
                if scan.stopped() {
                    break;
                }
            }
            assert!(scan.stopped());
            assert_eq!(scan.text(), "alpha beta");
            streamed += &scan.tail();
            assert_eq!(streamed, "alpha beta");
            let kept = engine::tokenizer::decode(&tok, scan.tokens(), true).unwrap();
            assert!(kept.starts_with("alpha beta\n\n"), "{kept:?}");
            let one_less = &scan.tokens()[..scan.tokens().len() - 1];
            let shorter = engine::tokenizer::decode(&tok, one_less, true).unwrap();
            assert!(
                !shorter.contains("\n\n"),
                "the last kept token completes the stop"
            );
        }
    }
}
