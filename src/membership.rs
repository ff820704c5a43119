//! The rules of group membership, and the chain of signed changes that carries them. Pure
//! functions; no storage, no I/O. The chat server applies them inside the transaction that
//! reads the group and writes the change; every client applies them again to the chain it
//! fetches, so a server cannot add, drop or reorder a member without the members noticing.
//!
//! * A group is named `OWNER/NAME`, and only `OWNER` can create it: a name taken by someone
//!   else's group is never refused (it cannot be asked for), so nobody learns which groups
//!   exist unless they are in them.
//! * The creator is the admin; only the admin adds and removes members.
//! * Anyone may leave. When the admin leaves, the longest-standing member takes over; the last
//!   member out deletes the group.
//! * Every change is a link of the group's chain: it names the group, its place `seq` (1 for
//!   the creation), the hash of the link before it, who makes it and what it does, and is
//!   signed with the maker's Ed25519 key. A change is valid only if its maker was allowed to
//!   make it by the chain before it.
//! * Every change starts a new key epoch, numbered like the change: the creation, an addition
//!   and a removal come with the new key for exactly the members after the change (so a new
//!   member cannot read what was sent before, and a removed one nothing after); a leave starts
//!   an epoch with no keys yet, which the next member to send provides, again for exactly the
//!   members.
//! * A member with new keys (`fastchat rekey`, after an operator reset the password) adds a
//!   key change, signed with the new keys and naming the Ed25519 key it had before: through
//!   the hash chain it vouches for the changes it signed before, which a verifier then checks
//!   with that key ([`signers`]). It starts an epoch keyed by its maker, like an addition.
//! * A non-member is told the same thing whether or not the group exists.

use std::collections::HashMap;

use crate::error::{Error, ErrorCode, Result};
use crate::names;
use crate::net::{Action, Change, GroupInfo, SignedChange, WrappedKey};

fn refuse(code: ErrorCode, message: impl Into<String>) -> Error {
    Error::refused(code, message)
}

/// The group as `user` may see it: refused alike when it does not exist and when `user` is
/// not a member, so non-members learn nothing about which groups exist.
pub fn member_view(group: &str, state: Option<GroupInfo>, user: &str) -> Result<GroupInfo> {
    match state {
        Some(g) if g.members.iter().any(|m| m == user) => Ok(g),
        _ => Err(not_a_member(group)),
    }
}

fn not_a_member(group: &str) -> Error {
    refuse(
        ErrorCode::UnknownGroup,
        format!("no group {group} with you as a member"),
    )
}

/// The bytes a change's maker signs.
pub fn signed_bytes(change: &Change) -> Vec<u8> {
    let mut out = b"fastchat/change/v1".to_vec();
    // Serializing a plain struct cannot fail.
    out.extend_from_slice(&rmp_serde::to_vec(change).expect("a change serializes"));
    out
}

/// The hash that the next change names as its `prev`: SHA-256 of the signed bytes and the
/// signature.
pub fn hash(signed: &SignedChange) -> Result<Vec<u8>> {
    let mut bytes = signed_bytes(&signed.change);
    bytes.extend_from_slice(&signed.signature);
    Ok(crate::crypto::sha256(&bytes)?.to_vec())
}

/// A group's membership after the change `seq` of its chain, whose hash is `head`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roster {
    /// The group.
    pub group: String,
    /// The last change applied (the current key epoch).
    pub seq: u64,
    /// That change's hash.
    pub head: Vec<u8>,
    /// The admin.
    pub admin: String,
    /// Members, longest-standing first.
    pub members: Vec<String>,
}

impl Roster {
    /// Whether `user` is a member.
    pub fn has(&self, user: &str) -> bool {
        self.members.iter().any(|m| m == user)
    }
}

/// What a change leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    /// The group, as it is now.
    Roster(Roster),
    /// The last member left: the group is gone.
    Deleted,
}

/// Applies `signed` (whose signature the caller has checked) to the group as it was before
/// (`None`: it does not exist yet), or says why the change is not allowed.
pub fn apply(before: Option<&Roster>, signed: &SignedChange) -> Result<After> {
    let c = &signed.change;
    let head = hash(signed)?;
    if c.action == Action::Create {
        if names::group_owner(&c.group) != Some(c.by.as_str()) {
            return Err(refuse(
                ErrorCode::NotAllowed,
                format!("a group you create is named {}/NAME, not {}", c.by, c.group),
            ));
        }
        if before.is_some() {
            return Err(refuse(
                ErrorCode::NameTaken,
                format!("you already have a group named {}", c.group),
            ));
        }
    }
    let Some(r) = before else {
        if c.action != Action::Create {
            return Err(not_a_member(&c.group));
        }
        if c.seq != 1 || !c.prev.is_empty() {
            return Err(refuse(
                ErrorCode::BadRequest,
                "a group's first change is number 1, with nothing before it",
            ));
        }
        return Ok(After::Roster(Roster {
            group: c.group.clone(),
            seq: 1,
            head,
            admin: c.by.clone(),
            members: vec![c.by.clone()],
        }));
    };
    if c.group != r.group {
        return Err(refuse(ErrorCode::BadRequest, "a change of another group"));
    }
    if !r.has(&c.by) {
        return Err(not_a_member(&c.group));
    }
    if c.seq != r.seq + 1 || c.prev != r.head {
        return Err(refuse(
            ErrorCode::Conflict,
            format!(
                "{} has changed since (now at change {}); fetch it and try again",
                c.group, r.seq
            ),
        ));
    }
    let admin_only = |what: &str| -> Result<()> {
        if r.admin != c.by {
            return Err(refuse(
                ErrorCode::NotAllowed,
                format!("only the admin of {} ({}) can {what}", c.group, r.admin),
            ));
        }
        Ok(())
    };
    let mut next = Roster {
        seq: c.seq,
        head,
        ..r.clone()
    };
    match &c.action {
        Action::Create => unreachable!("refused above"),
        Action::Add(user) => {
            admin_only("add members")?;
            names::validate("user", user)?;
            if r.has(user) {
                return Err(refuse(
                    ErrorCode::BadRequest,
                    format!("{user} is already a member of {}", c.group),
                ));
            }
            next.members.push(user.clone());
        }
        Action::Remove(user) => {
            admin_only("remove members")?;
            if *user == c.by {
                return Err(refuse(
                    ErrorCode::BadRequest,
                    format!("to leave {}, use group leave", c.group),
                ));
            }
            if !r.has(user) {
                return Err(refuse(
                    ErrorCode::BadRequest,
                    format!("{user} is not a member of {}", c.group),
                ));
            }
            next.members.retain(|m| m != user);
        }
        Action::Leave => {
            next.members.retain(|m| *m != c.by);
            match next.members.first() {
                None => return Ok(After::Deleted),
                Some(oldest) if r.admin == c.by => next.admin = oldest.clone(),
                Some(_) => {}
            }
        }
        Action::KeyChange(old) => {
            if old.len() != 32 {
                return Err(refuse(
                    ErrorCode::BadRequest,
                    "a key change names the 32-byte Ed25519 public key it replaces",
                ));
            }
        }
    }
    Ok(After::Roster(next))
}

/// The key each of `changes` (consecutive links of one chain, oldest first) is to be checked
/// with: its maker's `current` key, or, for a change its maker signed before a key change of
/// theirs later in `changes`, the key that key change names (and so on back, one key change
/// after another). A key change itself is checked with the key its maker had after it.
pub fn signers(
    changes: &[SignedChange],
    mut current: impl FnMut(&str) -> Result<Vec<u8>>,
) -> Result<Vec<Vec<u8>>> {
    let mut in_force: HashMap<&str, Vec<u8>> = HashMap::new();
    let mut keys = vec![Vec::new(); changes.len()];
    for (i, signed) in changes.iter().enumerate().rev() {
        let by = signed.change.by.as_str();
        let key = match in_force.get(by) {
            Some(k) => k.clone(),
            None => current(by)?,
        };
        let before = match &signed.change.action {
            Action::KeyChange(old) => old.clone(),
            _ => key.clone(),
        };
        keys[i] = key;
        in_force.insert(by, before);
    }
    Ok(keys)
}

/// Who gets the key of the epoch a change starts: every member after it, except after a
/// leave, whose epoch is keyed later (by the next member to send).
pub fn keyed_for(after: &After, action: &Action) -> Vec<String> {
    match (after, action) {
        (After::Roster(_), Action::Leave) | (After::Deleted, _) => Vec::new(),
        (After::Roster(r), _) => r.members.clone(),
    }
}

/// For tests: the change of `alice/team` after `roster`, with a made-up signature (the rules
/// do not look at signatures; callers check them first).
#[cfg(test)]
pub fn unsigned_next(roster: Option<&Roster>, by: &str, action: Action) -> SignedChange {
    let (seq, prev) = roster.map_or((1, Vec::new()), |r| (r.seq + 1, r.head.clone()));
    SignedChange {
        change: Change {
            group: "alice/team".into(),
            seq,
            prev,
            by: by.into(),
            action,
        },
        signature: vec![seq as u8; 64],
    }
}

/// What a change says, for people: `alice added carol`.
pub fn describe(change: &Change) -> String {
    let by = &change.by;
    match &change.action {
        Action::Create => format!("{by} created the group"),
        Action::Add(user) => format!("{by} added {user}"),
        Action::Remove(user) => format!("{by} removed {user}"),
        Action::Leave => format!("{by} left"),
        Action::KeyChange(_) => format!("{by} has new keys"),
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

    /// A chain made by the test: each change "signed" with a made-up signature (the rules do
    /// not look at signatures; callers check them first).
    struct Chain {
        roster: Option<Roster>,
    }

    impl Chain {
        fn change(&self, by: &str, action: Action) -> SignedChange {
            unsigned_next(self.roster.as_ref(), by, action)
        }

        fn try_apply(&mut self, by: &str, action: Action) -> Result<After> {
            let signed = self.change(by, action);
            let after = apply(self.roster.as_ref(), &signed)?;
            self.roster = match &after {
                After::Roster(r) => Some(r.clone()),
                After::Deleted => None,
            };
            Ok(after)
        }

        fn ok(&mut self, by: &str, action: Action) -> Roster {
            match self.try_apply(by, action).unwrap() {
                After::Roster(r) => r,
                After::Deleted => panic!("deleted"),
            }
        }
    }

    fn add(u: &str) -> Action {
        Action::Add(u.into())
    }

    #[test]
    fn a_key_change_keeps_the_members_and_starts_an_epoch_keyed_for_all() {
        let mut chain = Chain { roster: None };
        chain.ok("alice", Action::Create);
        chain.ok("alice", add("bob"));
        let r = chain.ok("bob", Action::KeyChange(vec![1; 32]));
        assert_eq!((r.seq, r.admin.as_str()), (3, "alice"));
        assert_eq!(r.members, ["alice", "bob"]);
        let action = Action::KeyChange(vec![2; 32]);
        let after = chain.try_apply("alice", action.clone()).unwrap();
        assert_eq!(keyed_for(&after, &action), ["alice", "bob"]);
        assert_eq!(
            code(chain.try_apply("alice", Action::KeyChange(vec![3; 31]))),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(chain.try_apply("carol", Action::KeyChange(vec![3; 32]))),
            ErrorCode::UnknownGroup,
            "a non-member has no key change to make"
        );
    }

    #[test]
    fn each_change_is_checked_with_the_key_its_maker_had_then() {
        let mut chain = Chain { roster: None };
        let mut changes = Vec::new();
        // alice signs with key 1, changes to 2, then to 3; bob never changes his.
        for (by, action) in [
            ("alice", Action::Create),
            ("alice", add("bob")),
            ("bob", Action::KeyChange(vec![0xb0; 32])),
            ("alice", Action::KeyChange(vec![1; 32])),
            ("alice", add("carol")),
            ("alice", Action::KeyChange(vec![2; 32])),
            ("bob", Action::Leave),
        ] {
            changes.push(chain.change(by, action.clone()));
            chain.ok(by, action);
        }
        let current = |by: &str| -> Result<Vec<u8>> {
            Ok(match by {
                "alice" => vec![3; 32],
                _ => vec![0xbb; 32],
            })
        };
        let keys = signers(&changes, current).unwrap();
        let want: Vec<Vec<u8>> = [1, 1, 0xbb, 2, 2, 3, 0xbb]
            .iter()
            .map(|k| vec![*k as u8; 32])
            .collect();
        assert_eq!(keys, want);
        // A tail without key changes: every change with its maker's current key.
        assert_eq!(signers(&changes[4..5], current).unwrap(), [vec![3; 32]]);
        // Bob's key change named 0xb0, but he made no change before it.
        assert!(!keys.contains(&vec![0xb0; 32]));
    }

    #[test]
    fn only_the_owner_creates_and_only_the_admin_adds_and_removes() {
        let mut chain = Chain { roster: None };
        assert_eq!(
            code(chain.try_apply("bob", Action::Create)),
            ErrorCode::NotAllowed
        );
        assert_eq!(
            code(chain.try_apply("alice", add("bob"))),
            ErrorCode::UnknownGroup
        );
        let r = chain.ok("alice", Action::Create);
        assert_eq!((r.seq, r.admin.as_str(), r.members.len()), (1, "alice", 1));
        assert_eq!(
            code(chain.try_apply("alice", Action::Create)),
            ErrorCode::NameTaken
        );
        chain.ok("alice", add("bob"));
        assert_eq!(
            code(chain.try_apply("bob", add("carol"))),
            ErrorCode::NotAllowed
        );
        assert_eq!(
            code(chain.try_apply("carol", add("carol"))),
            ErrorCode::UnknownGroup
        );
        assert_eq!(
            code(chain.try_apply("alice", add("bob"))),
            ErrorCode::BadRequest
        );
        let r = chain.ok("alice", add("carol"));
        assert_eq!(r.members, ["alice", "bob", "carol"]);
        assert_eq!(r.seq, 3, "every change starts an epoch");
        assert_eq!(
            code(chain.try_apply("bob", Action::Remove("carol".into()))),
            ErrorCode::NotAllowed
        );
        assert_eq!(
            code(chain.try_apply("alice", Action::Remove("alice".into()))),
            ErrorCode::BadRequest,
            "the admin leaves instead"
        );
        assert_eq!(
            code(chain.try_apply("alice", Action::Remove("dave".into()))),
            ErrorCode::BadRequest
        );
        let r = chain.ok("alice", Action::Remove("carol".into()));
        assert_eq!(r.members, ["alice", "bob"]);
    }

    #[test]
    fn a_change_must_follow_the_last_one() {
        let mut chain = Chain { roster: None };
        chain.ok("alice", Action::Create);
        let mut late = chain.change("alice", add("bob"));
        chain.ok("alice", add("carol"));
        // Made against the chain before carol was added: refused, whatever it says.
        late.change.seq += 1;
        assert_eq!(
            code(apply(chain.roster.as_ref(), &late)),
            ErrorCode::Conflict
        );
        let mut skipping = chain.change("alice", add("dave"));
        skipping.change.seq += 1;
        assert_eq!(
            code(apply(chain.roster.as_ref(), &skipping)),
            ErrorCode::Conflict
        );
        let mut other = chain.change("alice", add("dave"));
        other.change.group = "alice/other".into();
        assert_eq!(
            code(apply(chain.roster.as_ref(), &other)),
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn leaving_hands_the_group_on_or_ends_it() {
        let mut chain = Chain { roster: None };
        chain.ok("alice", Action::Create);
        chain.ok("alice", add("bob"));
        chain.ok("alice", add("carol"));
        let r = chain.ok("alice", Action::Leave);
        assert_eq!(r.admin, "bob", "the longest-standing member takes over");
        let r = chain.ok("carol", Action::Leave);
        assert_eq!((r.admin.as_str(), r.members.len()), ("bob", 1));
        assert_eq!(
            chain.try_apply("bob", Action::Leave).unwrap(),
            After::Deleted
        );
    }

    #[test]
    fn the_new_key_goes_to_exactly_the_members_after_the_change() {
        let mut chain = Chain { roster: None };
        let created = After::Roster(chain.ok("alice", Action::Create));
        assert_eq!(keyed_for(&created, &Action::Create), ["alice"]);
        let added = After::Roster(chain.ok("alice", add("bob")));
        assert_eq!(keyed_for(&added, &add("bob")), ["alice", "bob"]);
        let left = After::Roster(chain.ok("bob", Action::Leave));
        assert!(
            keyed_for(&left, &Action::Leave).is_empty(),
            "keyed by the next sender"
        );
        assert_eq!(
            describe(&chain.change("alice", add("carol")).change),
            "alice added carol"
        );
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
    }
}
