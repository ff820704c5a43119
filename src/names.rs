//! The naming rule shared by users and groups.
//!
//! A name is 1 to 32 characters from ASCII letters, digits, `_`, `.` and `-`. That keeps names
//! safe in file paths (the client's folder per user), in log lines and on a terminal. A group
//! is named `OWNER/NAME` (see [`validate_group`]).

use crate::error::{Error, Result};

/// Longest allowed name, in characters (all ASCII, so also in bytes).
pub const MAX_NAME: usize = 32;

/// Checks a user or group name; the error says what is wrong, showing the name only when it is
/// printable and short.
pub fn validate(kind: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::InvalidName(format!("{kind} name must not be empty")));
    }
    if name.len() > MAX_NAME {
        return Err(Error::InvalidName(format!(
            "{kind} name {} is too long ({} characters, at most {MAX_NAME})",
            shown(name),
            name.chars().count()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(Error::InvalidName(format!(
            "{kind} name {} contains {}: use letters, digits, '_', '.' and '-'",
            shown(name),
            describe(c)
        )));
    }
    if name == "." || name == ".." {
        return Err(Error::InvalidName(format!(
            "{kind} name {} is reserved",
            shown(name)
        )));
    }
    Ok(())
}

/// Checks a group name: `OWNER/NAME`, the owner a user name and the rest a name, as in
/// `alice/team`. Groups live in their creator's name space, so creating one never tells
/// anyone which other groups exist.
pub fn validate_group(name: &str) -> Result<()> {
    let Some((owner, short)) = name.split_once('/') else {
        return Err(Error::InvalidName(format!(
            "group name {} must be OWNER/NAME, as in alice/team",
            shown(name)
        )));
    };
    validate("group owner", owner)?;
    validate("group", short)
}

/// Checks a group as a command names it: `OWNER/NAME`, or just `NAME` (one of the user's
/// groups, or, to create one, the user's own).
pub fn validate_group_ref(name: &str) -> Result<()> {
    if name.contains('/') {
        validate_group(name)
    } else {
        validate("group", name)
    }
}

/// The owner part of a group name, if it has one.
pub fn group_owner(group: &str) -> Option<&str> {
    group.split_once('/').map(|(owner, _)| owner)
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
    fn a_group_is_owner_slash_name() {
        validate_group("alice/team").unwrap();
        validate_group_ref("team").unwrap();
        validate_group_ref("alice/team").unwrap();
        assert_eq!(group_owner("alice/team"), Some("alice"));
        assert_eq!(group_owner("team"), None);
        for bad in [
            "team",
            "/team",
            "alice/",
            "alice/te am",
            "a/b/c",
            "al ice/team",
        ] {
            assert!(validate_group(bad).is_err(), "{bad:?}");
        }
        assert!(validate_group_ref("te am").is_err());
    }

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
