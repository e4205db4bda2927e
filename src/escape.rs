//! Text from outside made safe to show: a daemon's error message, a
//! hostname from the state file or a peer's data never reaches a terminal
//! or a log line raw. A leaf: `log`, `json` and `output` all use it.

use std::fmt::Write as _;

/// Whether `c` must not reach a terminal raw: control characters (C0,
/// DEL, C1 — U+009B is CSI on terminals that honour UTF-8 C1), the line
/// and paragraph separators, and the bidirectional marks, embeddings,
/// overrides and isolates, which reorder what a line shows.
pub fn is_terminal_hazard(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        )
}

/// Escapes what [`is_terminal_hazard`] names (`\n` → `\\n`, ESC →
/// `\\x1b`, U+202E → `\\u{202e}`, …), so text from outside (a daemon's
/// error message, a hostname in the state file) can neither forge log
/// lines nor send terminal escape sequences or reorder a line.
pub fn escape_control(s: &str) -> String {
    if !s.chars().any(is_terminal_hazard) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if is_terminal_hazard(c) => {
                let _ = write!(out, "\\u{{{:04x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_control_characters() {
        assert_eq!(escape_control("plain ü"), "plain ü");
        assert_eq!(escape_control("a\nb\u{1b}[31m\u{7f}"), "a\\nb\\x1b[31m\\x7f");
        assert_eq!(
            escape_control("x\u{9b}31m\u{202e}T\u{2028}\u{2066}\u{61c}\u{200f}"),
            "x\\x9b31m\\u{202e}T\\u{2028}\\u{2066}\\u{061c}\\u{200f}"
        );
        // Ordinary non-ASCII text, joiners included, passes unchanged.
        assert_eq!(escape_control("é 😀 \u{200d} ش"), "é 😀 \u{200d} ش");
    }
}
