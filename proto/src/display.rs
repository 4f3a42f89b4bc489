//! Showing text that came from elsewhere (an agent's report, a peer's name) in a log line or
//! on a terminal. Raw, such text could forge log lines (CR, LF), drive the terminal (ESC
//! sequences, C1 controls) or make what is shown read differently from what is stored
//! (Unicode bidi overrides); escaped, it shows every character it has.

use std::fmt;

/// Displays the text with control characters, bidi controls and line/paragraph separators
/// written as escapes (`\n`, `\r`, `\t`, `\u{1b}`, `\u{202e}`), and `\` as `\\` so an escape
/// in the input cannot pass for one written here. Everything else is shown as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Escaped<'a>(pub &'a str);

/// Whether `c` is shown escaped: C0 and C1 controls and DEL (`char::is_control`), the
/// Unicode bidi marks, embeddings, overrides and isolates, and U+2028/U+2029 (which some
/// log viewers break lines at).
fn escaped(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        || matches!(c, '\u{2028}' | '\u{2029}')
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        // Plain runs are written in one piece; only the characters to escape are split out.
        while let Some(at) = rest.find(|c: char| c == '\\' || escaped(c)) {
            f.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            // `escape_default` writes `\\`, `\t`, `\r`, `\n` and `\u{..}` for the rest.
            write!(f, "{}", c.escape_default())?;
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(s: &str) -> String {
        Escaped(s).to_string()
    }

    #[test]
    fn terminal_and_log_controls_are_escaped() {
        assert_eq!(shown("\x1b[31mred\x1b[0m"), r"\u{1b}[31mred\u{1b}[0m");
        assert_eq!(shown("db1\nINFO node enrolled"), r"db1\nINFO node enrolled");
        assert_eq!(shown("a\rb\tc\0d\x7fe"), r"a\rb\tc\u{0}d\u{7f}e");
        // C1: CSI (U+009B) starts an escape sequence on some terminals without ESC.
        assert_eq!(shown("x\u{9b}31m"), r"x\u{9b}31m");
        assert_eq!(shown("evil\u{202e}txt.exe"), r"evil\u{202e}txt.exe");
        assert_eq!(shown("\u{2066}a\u{2069}\u{200f}\u{61c}"), r"\u{2066}a\u{2069}\u{200f}\u{61c}");
        assert_eq!(shown("line\u{2028}sep"), r"line\u{2028}sep");
    }

    #[test]
    fn a_backslash_cannot_fake_an_escape() {
        assert_eq!(shown(r"\u{1b}"), r"\\u{1b}");
        assert_ne!(shown(r"\u{1b}"), shown("\x1b"));
    }

    #[test]
    fn ordinary_text_is_shown_as_it_is() {
        for s in ["", "db1.example.com", "peer \"gw\" (10.0.0.1:51820)", "Zürich ħ 東京 😀", "a b  c"] {
            assert_eq!(shown(s), s);
        }
    }
}
