//! Text a relay sends us (CLOSED and OK reasons, NOTICEs, AUTH refusals) is untrusted: it
//! reaches logs, RelaySync status and Kubernetes Events. Before it does, control characters
//! (newlines that forge log lines, terminal escapes, bidirectional overrides that disguise
//! text) are replaced and the length is bounded.

/// `text` with every control or bidirectional-formatting character replaced by a space, cut
/// to at most `max` bytes (on a character boundary, marked with `…`).
pub fn clean(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 3);
    for c in text.chars() {
        let c = if c.is_control() || is_bidi_control(c) {
            ' '
        } else {
            c
        };
        if out.len() + c.len_utf8() > max {
            out.push('…');
            return out;
        }
        out.push(c);
    }
    out
}

/// Characters that reorder how text is shown (Trojan Source, CVE-2021-42574).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_bidi_characters_are_blanked() {
        let cases = [
            ("blocked: spam", "blocked: spam"),
            ("line\nINFO forged log line", "line INFO forged log line"),
            ("\u{1b}[31mred\u{1b}[0m", " [31mred [0m"),
            ("tab\tand\r\0nul", "tab and  nul"),
            ("abc\u{202E}fed", "abc fed"),
            ("\u{2066}x\u{2069}\u{200F}", " x  "),
            ("ünïcödé ✓ 日本", "ünïcödé ✓ 日本"),
        ];
        for (input, want) in cases {
            assert_eq!(clean(input, 1000), want, "{input:?}");
        }
    }

    #[test]
    fn length_is_bounded_on_a_character_boundary() {
        assert_eq!(clean("abcdef", 4), "abcd…");
        assert_eq!(clean("abcd", 4), "abcd");
        // 'é' is two bytes: never split.
        assert_eq!(clean("aéé", 4), "aé…");
        assert_eq!(clean("", 0), "");
        let long = "x".repeat(1 << 20);
        assert!(clean(&long, 500).len() <= 500 + '…'.len_utf8());
    }
}
