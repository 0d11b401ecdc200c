//! Text for a terminal: user-given names (file and folder names, class
//! names, paths inside messages) with their control characters written out,
//! so that a hostile name cannot move the cursor, set the window title or
//! ring the bell when it is printed.

use std::borrow::Cow;

/// Whether `c` is a control character a terminal may act on: C0 (U+0000 to
/// U+001F), DEL (U+007F) or C1 (U+0080 to U+009F).
fn is_control(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}')
}

/// `s` with every C0 and C1 control character and DEL written as `\xHH`
/// text (ESC as `\x1b`, a newline as `\x0a`); borrowed when there is none.
/// Everything else, backslashes included, is kept as it is.
pub fn terminal_safe(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_control(c) {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Multi-line text (a table, a report) with [`terminal_safe`] applied to
/// each line: the line breaks stay, every other control character is
/// written out.
pub fn terminal_safe_lines(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c != '\n' && is_control(c)) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(s.split('\n').map(terminal_safe).collect::<Vec<_>>().join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_written_out_and_the_rest_kept() {
        assert!(matches!(terminal_safe("plain ä/b\\c"), Cow::Borrowed(_)));
        assert_eq!(terminal_safe("a\u{1b}]0;x\u{7}b"), "a\\x1b]0;x\\x07b");
        assert_eq!(terminal_safe("l1\nl2\t\u{7f}\u{9b}"), "l1\\x0al2\\x09\\x7f\\x9b");
        assert_eq!(terminal_safe_lines("a\u{1b}\nb\n"), "a\\x1b\nb\n");
        assert!(matches!(terminal_safe_lines("a\nb\n"), Cow::Borrowed(_)));
    }
}
