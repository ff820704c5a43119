//! The rules of group membership: who may add, remove and leave, what each change does to the
//! admin and the key epoch, and what a member must know before sending. Pure functions over a
//! group's state ([`GroupInfo`]); no storage, no I/O. The chat server applies them inside the
//! transaction that reads the state and writes the change.
//!
//! * The creator is the admin; only the admin adds and removes members.
//! * Anyone may leave. When the admin leaves, the longest-standing member takes over; the last
//!   member out deletes the group.
//! * Every group key belongs to an epoch. Removing a member starts the next epoch with keys
//!   for everyone else (never for the removed member); leaving starts the next epoch with no
//!   keys yet, which the next member to send provides for exactly the members.
//! * A non-member is told the same thing whether or not the group exists.

use crate::error::{Error, ErrorCode, Result};
use crate::net::{GroupInfo, WrappedKey};

fn refuse(code: ErrorCode, message: impl Into<String>) -> Error {
    Error::refused(code, message)
}

/// The group as `user` may see it: refused alike when it does not exist and when `user` is
/// not a member, so non-members learn nothing about which groups exist.
pub fn member_view(group: &str, state: Option<GroupInfo>, user: &str) -> Result<GroupInfo> {
    match state {
        Some(g) if g.members.iter().any(|m| m == user) => Ok(g),
        _ => Err(refuse(
            ErrorCode::UnknownGroup,
            format!("no group {group} with you as a member"),
        )),
    }
}

/// Refuses anyone but the admin, saying who may `what`.
fn admin_only(g: &GroupInfo, by: &str, what: &str) -> Result<()> {
    if g.admin != by {
        return Err(refuse(
            ErrorCode::NotAllowed,
            format!("only the admin of {} ({}) can {what}", g.name, g.admin),
        ));
    }
    Ok(())
}

/// A new group may take this name only if no group has it.
pub fn check_create(group: &str, exists: bool) -> Result<()> {
    if exists {
        return Err(refuse(
            ErrorCode::NameTaken,
            format!("a group named {group} already exists"),
        ));
    }
    Ok(())
}

/// `by` adds `user` with a key of `epoch`: the admin only, an existing user who is not yet a
/// member, and a key of the current epoch.
pub fn check_add(g: &GroupInfo, by: &str, user: &str, user_exists: bool, epoch: u64) -> Result<()> {
    admin_only(g, by, "add members")?;
    if !user_exists {
        return Err(refuse(
            ErrorCode::UnknownUser,
            format!("no such user: {user}"),
        ));
    }
    if g.members.iter().any(|m| m == user) {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!("{user} is already a member of {}", g.name),
        ));
    }
    if epoch != g.epoch {
        return Err(refuse(
            ErrorCode::Conflict,
            format!("{} has moved to key epoch {}; try again", g.name, g.epoch),
        ));
    }
    Ok(())
}

/// `by` removes `user`, starting `epoch` with `keys`: the admin only, not themselves, a
/// member, the next epoch, and keys for exactly the remaining members.
pub fn check_remove(
    g: &GroupInfo,
    by: &str,
    user: &str,
    epoch: u64,
    keys: &[WrappedKey],
) -> Result<()> {
    admin_only(g, by, "remove members")?;
    if user == by {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!("to leave {}, use group leave", g.name),
        ));
    }
    if !g.members.iter().any(|m| m == user) {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!("{user} is not a member of {}", g.name),
        ));
    }
    if epoch != g.epoch + 1 {
        return Err(refuse(
            ErrorCode::Conflict,
            format!("{} is at key epoch {}; try again", g.name, g.epoch),
        ));
    }
    let remaining: Vec<String> = g.members.iter().filter(|m| *m != user).cloned().collect();
    check_keys_cover(keys, &remaining)
}

/// What happens when a member leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leaving {
    /// The group goes on with this admin (the longest-standing member if the admin left), at
    /// this new epoch, which has no keys yet.
    Stays {
        /// The admin from now on.
        admin: String,
        /// The new epoch.
        epoch: u64,
    },
    /// The last member left: the group and its messages go.
    Deleted,
}

/// `user` (a member) leaves `g`.
pub fn leave(g: &GroupInfo, user: &str) -> Leaving {
    match g.members.iter().find(|m| *m != user) {
        None => Leaving::Deleted,
        Some(oldest) => Leaving::Stays {
            admin: if g.admin == user {
                oldest.clone()
            } else {
                g.admin.clone()
            },
            epoch: g.epoch + 1,
        },
    }
}

/// A member keys the current epoch, which must have no keys yet, for exactly the members.
pub fn check_rekey(g: &GroupInfo, epoch: u64, keys: &[WrappedKey]) -> Result<()> {
    if epoch != g.epoch || g.keyed {
        return Err(refuse(
            ErrorCode::Conflict,
            format!("{} already has keys for its current epoch", g.name),
        ));
    }
    check_keys_cover(keys, &g.members)
}

/// A member sends under `epoch`, which must be the current one and keyed.
pub fn check_send(g: &GroupInfo, epoch: u64) -> Result<()> {
    if epoch != g.epoch || !g.keyed {
        return Err(refuse(
            ErrorCode::Conflict,
            format!("{} has a new key epoch; fetch it and send again", g.name),
        ));
    }
    Ok(())
}

/// Checks that `keys` name exactly `members`, once each.
pub fn check_keys_cover(keys: &[WrappedKey], members: &[String]) -> Result<()> {
    let mut named: Vec<&str> = keys.iter().map(|k| k.member.as_str()).collect();
    named.sort_unstable();
    let mut expected: Vec<&str> = members.iter().map(String::as_str).collect();
    expected.sort_unstable();
    if named != expected {
        return Err(refuse(
            ErrorCode::Conflict,
            "the new keys do not match the members; fetch the group and try again",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn team(members: &[&str], epoch: u64, keyed: bool) -> GroupInfo {
        GroupInfo {
            name: "team".into(),
            admin: members[0].into(),
            members: members.iter().map(|m| m.to_string()).collect(),
            epoch,
            keyed,
        }
    }

    fn keys(names: &[&str]) -> Vec<WrappedKey> {
        names
            .iter()
            .map(|m| WrappedKey {
                member: m.to_string(),
                wrapped: b"k".to_vec(),
            })
            .collect()
    }

    fn code<T: std::fmt::Debug>(r: Result<T>) -> ErrorCode {
        match r {
            Err(Error::Refused { code, .. }) => code,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn non_members_learn_nothing() {
        let absent = code(member_view("team", None, "mallory"));
        let present = code(member_view(
            "team",
            Some(team(&["alice", "bob"], 1, true)),
            "mallory",
        ));
        assert_eq!(absent, ErrorCode::UnknownGroup);
        assert_eq!(absent, present);
        let alice = member_view("team", Some(team(&["alice", "bob"], 1, true)), "alice");
        assert_eq!(alice.unwrap().admin, "alice");
    }

    #[test]
    fn only_the_admin_adds_with_the_current_key() {
        let g = team(&["alice", "bob"], 3, true);
        assert_eq!(
            code(check_add(&g, "bob", "carol", true, 3)),
            ErrorCode::NotAllowed
        );
        assert_eq!(
            code(check_add(&g, "alice", "carol", false, 3)),
            ErrorCode::UnknownUser
        );
        assert_eq!(
            code(check_add(&g, "alice", "bob", true, 3)),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(check_add(&g, "alice", "carol", true, 2)),
            ErrorCode::Conflict
        );
        check_add(&g, "alice", "carol", true, 3).unwrap();
    }

    #[test]
    fn a_removal_starts_the_next_epoch_without_the_removed_member() {
        let g = team(&["alice", "bob", "carol"], 1, true);
        assert_eq!(
            code(check_remove(
                &g,
                "bob",
                "carol",
                2,
                &keys(&["alice", "bob"])
            )),
            ErrorCode::NotAllowed
        );
        assert_eq!(
            code(check_remove(
                &g,
                "alice",
                "alice",
                2,
                &keys(&["bob", "carol"])
            )),
            ErrorCode::BadRequest,
            "the admin leaves instead"
        );
        assert_eq!(
            code(check_remove(&g, "alice", "dave", 2, &keys(&["alice"]))),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(check_remove(
                &g,
                "alice",
                "carol",
                1,
                &keys(&["alice", "bob"])
            )),
            ErrorCode::Conflict,
            "not the next epoch"
        );
        assert_eq!(
            code(check_remove(
                &g,
                "alice",
                "carol",
                2,
                &keys(&["alice", "bob", "carol"])
            )),
            ErrorCode::Conflict,
            "the new key must not go to the removed member"
        );
        check_remove(&g, "alice", "carol", 2, &keys(&["bob", "alice"])).unwrap();
    }

    #[test]
    fn leaving_hands_the_group_on_or_ends_it() {
        let g = team(&["alice", "bob", "carol"], 4, true);
        assert_eq!(
            leave(&g, "alice"),
            Leaving::Stays {
                admin: "bob".into(),
                epoch: 5
            },
            "the longest-standing member takes over"
        );
        assert_eq!(
            leave(&g, "carol"),
            Leaving::Stays {
                admin: "alice".into(),
                epoch: 5
            }
        );
        assert_eq!(leave(&team(&["alice"], 1, true), "alice"), Leaving::Deleted);
    }

    #[test]
    fn an_unkeyed_epoch_is_keyed_once_for_exactly_the_members() {
        let g = team(&["alice", "bob"], 2, false);
        assert_eq!(
            code(check_rekey(&g, 2, &keys(&["alice"]))),
            ErrorCode::Conflict
        );
        assert_eq!(
            code(check_rekey(&g, 1, &keys(&["alice", "bob"]))),
            ErrorCode::Conflict
        );
        check_rekey(&g, 2, &keys(&["bob", "alice"])).unwrap();
        let keyed = team(&["alice", "bob"], 2, true);
        assert_eq!(
            code(check_rekey(&keyed, 2, &keys(&["alice", "bob"]))),
            ErrorCode::Conflict
        );
    }

    #[test]
    fn sending_needs_the_current_keyed_epoch() {
        assert_eq!(
            code(check_send(&team(&["alice"], 2, true), 1)),
            ErrorCode::Conflict
        );
        assert_eq!(
            code(check_send(&team(&["alice"], 2, false), 2)),
            ErrorCode::Conflict
        );
        check_send(&team(&["alice"], 2, true), 2).unwrap();
        assert_eq!(code(check_create("team", true)), ErrorCode::NameTaken);
        check_create("team", false).unwrap();
    }
}
