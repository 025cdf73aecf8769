//! Copy guesses: where the text's last tokens occurred before in the same request (its
//! prompt or its output so far), the tokens that followed them then are guessed to follow
//! again. Code that repeats a signature, a docstring's example or a variable's long name
//! continues exactly as it did, and the longer the repeated context, the longer it goes
//! on the same way. The trie's continuations match at most two tokens and weigh them by
//! frequency; this finds the longest match and copies what came after it.
//!
//! llama.cpp's n-gram modes do the same with fixed lengths (`ngram-simple`: 12 tokens
//! matched, up to 48 copied; `ngram-mod`: 24 hashed, 48 to 64). Here the match may be as
//! short as [`MIN_MATCH`] and the guess is as long as the caller allows: the trie strategy
//! copies as many tokens as were matched, `auto` keeps the ones its cost profile says pay.

/// A continuation found by [`find`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyGuess {
    /// The tokens that followed the earlier occurrence (and, past the end of the text,
    /// the copy's own tokens again).
    pub tokens: Vec<u32>,
    /// How many of the text's last tokens that occurrence matched.
    pub matched: usize,
}

/// The shortest match worth a guess: shorter contexts are the trie's.
pub const MIN_MATCH: usize = 4;
/// Matches are not extended past this many tokens.
pub const MAX_MATCH: usize = 32;

/// The continuation (`max_len` tokens) of the earlier occurrence of the longest
/// end of `text` that occurred before, the most recent among equally long ones; `None`
/// where no end of [`MIN_MATCH`] tokens or more occurred before.
pub fn find(text: &[u32], max_len: usize) -> Option<CopyGuess> {
    let n = text.len();
    if n <= MIN_MATCH || max_len == 0 {
        return None;
    }
    let last = text[n - 1];
    // (tokens matched, index of the occurrence's last token)
    let mut best: Option<(usize, usize)> = None;
    for i in (0..n - 1).rev() {
        if text[i] != last {
            continue;
        }
        let mut m = 1;
        while m < MAX_MATCH && m <= i && text[i - m] == text[n - 1 - m] {
            m += 1;
        }
        if m >= MIN_MATCH && best.is_none_or(|(b, _)| m > b) {
            best = Some((m, i));
            if m == MAX_MATCH {
                break;
            }
        }
    }
    let (matched, i) = best?;
    // Where the copy reaches the end of the text it goes on copying itself, as a repeated
    // run does (the occurrence one period back only has that period's tokens after it).
    let mut tokens = Vec::with_capacity(max_len);
    for k in 0..max_len {
        let at = i + 1 + k;
        tokens.push(if at < n { text[at] } else { tokens[at - n] });
    }
    Some(CopyGuess { tokens, matched })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_what_followed_the_longest_match() {
        // "1 2 3 4 5 | 9 2 3 4 5 6 | ... 2 3 4 5": the end (2 3 4 5) occurred twice; the
        // longer match decides where a longer end matches, else the most recent.
        let text = [1, 2, 3, 4, 5, 7, 9, 2, 3, 4, 5, 6, 8, 1, 2, 3, 4, 5];
        let c = find(&text, 10).unwrap();
        // "1 2 3 4 5" matches 5 tokens at the start, 4 at the second occurrence.
        assert_eq!(c.matched, 5);
        assert_eq!(&c.tokens[..3], &[7, 9, 2]);
        let text = [8, 2, 3, 4, 5, 7, 9, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5];
        let c = find(&text, 3).unwrap();
        assert_eq!((c.matched, c.tokens), (4, vec![6, 1, 2]));
    }

    #[test]
    fn nothing_below_the_shortest_match_or_without_room() {
        assert_eq!(find(&[1, 2, 3, 9, 2, 3], 4), None);
        assert_eq!(find(&[1, 2, 3, 4, 9, 1, 2, 3, 4], 0), None);
        assert_eq!(find(&[1, 2, 3, 4], 4), None);
    }

    #[test]
    fn a_repeated_run_continues_itself() {
        // A period-2 run: the most recent occurrence is two tokens back, and what
        // followed it overlaps the end itself; the copy goes on with the run.
        let text = [5, 6, 5, 6, 5, 6, 5, 6];
        let c = find(&text, 5).unwrap();
        assert_eq!(c.matched, 6);
        assert_eq!(c.tokens, vec![5, 6, 5, 6, 5]);
    }

    #[test]
    fn long_matches_stop_at_the_cap() {
        let mut text: Vec<u32> = (0..40).collect();
        text.push(100);
        text.extend(0..40);
        let c = find(&text, 1).unwrap();
        assert_eq!((c.matched, c.tokens), (MAX_MATCH, vec![100]));
    }
}
