//! The naming rule shared by users and groups.
//!
//! A name is 1 to 32 characters from ASCII letters, digits, `_`, `.` and `-`. That keeps names
//! safe in file paths (the client's folder per user), in log lines and on a terminal.

use crate::error::{Error, Result};

/// Longest allowed name, in characters (all ASCII, so also in bytes).
pub const MAX_NAME: usize = 32;

/// Checks a user or group name; the error says what is wrong, showing the name only when it is
/// printable and short.
pub fn validate(kind: &str, name: &str) -> Result<()> {
    let shown = shown(name);
    if name.is_empty() {
        return Err(Error::InvalidName(format!("{kind} name must not be empty")));
    }
    if name.len() > MAX_NAME {
        return Err(Error::InvalidName(format!(
            "{kind} name {shown} is too long ({} characters, at most {MAX_NAME})",
            name.chars().count()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(Error::InvalidName(format!(
            "{kind} name {shown} contains {}: use letters, digits, '_', '.' and '-'",
            describe(c)
        )));
    }
    if name == "." || name == ".." {
        return Err(Error::InvalidName(format!(
            "{kind} name {shown} is reserved"
        )));
    }
    Ok(())
}

/// A name as it may be shown in an error: quoted, escaped, and cut when long.
fn shown(name: &str) -> String {
    let cut: String = name.chars().take(40).collect();
    let mut s = format!("{cut:?}");
    if cut.len() < name.len() {
        s.push('…');
    }
    s
}

fn describe(c: char) -> String {
    if c == ' ' {
        "a space".to_string()
    } else if c.is_control() {
        format!("a control character (U+{:04X})", c as u32)
    } else {
        format!("{c:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_alphabet() {
        for ok in ["a", "alice", "Bob_2", "x.y-z", &"a".repeat(32)] {
            validate("user", ok).unwrap();
        }
    }

    #[test]
    fn refuses_everything_else_with_a_reason() {
        let long = "a".repeat(33);
        let huge = "b".repeat(10_000);
        for (bad, why) in [
            ("", "empty"),
            (long.as_str(), "too long"),
            (huge.as_str(), "too long"),
            ("al ice", "a space"),
            ("a/b", "'/'"),
            ("é", "'é'"),
            ("a\u{7}", "control"),
            ("x'; DROP TABLE users;--", "contains"),
            ("..", "reserved"),
        ] {
            let err = validate("user", bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(err.len() < 200, "error stays one short line: {err}");
        }
    }
}
