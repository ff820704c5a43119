//! Group requests. Each runs in one transaction that reads the group, applies the rules of
//! [`crate::membership`], and writes the change; a refusal undoes nothing because nothing was
//! written yet.

use super::Session;
use crate::crypto;
use crate::db::{GroupMessage, Outgoing, Tx};
use crate::error::{Error, ErrorCode, Result};
use crate::membership::{self, After, Roster};
use crate::net::{
    decode, encode, Action, GroupInfo, NewMessage, ServerReply, SignedChange, WrappedKey,
    MAX_CHANGES,
};

/// The group as `user` may see it (see [`membership::member_view`]).
fn member_view(tx: &mut dyn Tx, group: &str, user: &str) -> Result<GroupInfo> {
    let state = tx.group(group)?;
    membership::member_view(group, state, user)
}

/// A group's roster as the server holds it: its state and the hash of its last change.
fn roster(tx: &mut dyn Tx, group: &str) -> Result<Option<Roster>> {
    let Some(g) = tx.group(group)? else {
        return Ok(None);
    };
    let last = tx
        .last_change(group)?
        .ok_or_else(|| Error::Invalid(format!("group {group} has no chain of changes")))?;
    let last: SignedChange = decode(&last)?;
    Ok(Some(Roster {
        group: g.name,
        seq: g.epoch,
        head: membership::hash(&last)?,
        admin: g.admin,
        members: g.members,
    }))
}

/// Whether `user`, whom a `Remove` by `by` names, is a member of `group` whose account an
/// operator deleted: gone from the server's list of members (deleting an account takes its
/// memberships), still in the group's signed chain until its admin removes them. Replays the
/// chain (each change was checked when it was stored); on the connection's thread, like
/// [`check_key_change`], and only when the server's list does not have `user`.
fn departed(tx: &mut dyn Tx, group: &str, by: &str, user: &str) -> Result<bool> {
    let info = member_view(tx, group, by)?;
    if info.members.iter().any(|m| m == user) || tx.user_exists(user)? {
        return Ok(false);
    }
    let mut chain: Option<Roster> = None;
    let mut after = 0;
    loop {
        let page = tx.changes(group, after, MAX_CHANGES)?;
        let full = page.len() >= MAX_CHANGES;
        for bytes in page {
            let signed: SignedChange = decode(&bytes)?;
            after = signed.change.seq;
            chain = match membership::apply(chain.as_ref(), &signed)? {
                After::Roster(r) => Some(r),
                After::Deleted => None,
            };
        }
        if !full {
            break;
        }
    }
    Ok(chain.is_some_and(|r| r.has(user)))
}

/// The body of the group message that announces a change: format version, kind 4, and the
/// signed change (not encrypted: the servers know a group's members anyway).
pub fn change_body(change: &[u8]) -> Vec<u8> {
    let mut body = vec![2, 4];
    body.extend_from_slice(change);
    body
}

/// A key change must name the key that signed its maker's last change before it (if any): a
/// member cannot make the group's earlier links fail for those who check them afresh. Read
/// on the connection's thread, not the writer's (it reads the whole chain); race-free all
/// the same, because it checks the chain the change follows: if another change came first,
/// the writer would refuse this one anyway.
fn check_key_change(tx: &mut dyn Tx, change: &SignedChange, old: &[u8]) -> Result<()> {
    let c = &change.change;
    // Non-members learn nothing, not even how long the chain is.
    member_view(tx, &c.group, &c.by)?;
    let mut last_mine = None;
    let mut after = 0;
    loop {
        let page = tx.changes(&c.group, after, MAX_CHANGES)?;
        let full = page.len() >= MAX_CHANGES;
        for bytes in page {
            let signed: SignedChange = decode(&bytes)?;
            after = signed.change.seq;
            if signed.change.by == c.by {
                last_mine = Some(signed);
            }
        }
        if !full {
            break;
        }
    }
    if after + 1 != c.seq {
        return Err(Error::refused(
            ErrorCode::Conflict,
            format!(
                "{} has changed since (now at change {after}); fetch it and try again",
                c.group
            ),
        ));
    }
    let Some(last) = last_mine else {
        return Ok(());
    };
    let signed = membership::signed_bytes(&last.change);
    if crypto::verify_signature(old, &signed, &last.signature)? {
        return Ok(());
    }
    Err(Error::refused(
        ErrorCode::BadRequest,
        format!(
            "the key change names a key that did not sign your last change of {} (change {})",
            c.group, last.change.seq
        ),
    ))
}

impl Session<'_> {
    /// `GroupChange`: a change of membership, signed by the caller, applied by the rules of
    /// [`membership`] to the chain as it is, and stored as its next link with the new epoch's
    /// keys; then announced to the members.
    pub(super) fn group_change(
        &self,
        id: u64,
        change: SignedChange,
        keys: Vec<WrappedKey>,
        client_id: u64,
    ) {
        let group = change.change.group.clone();
        if !self.names_ok(id, &[("group", &group)]) {
            return;
        }
        if change.change.by != self.user {
            let why = format!(
                "a change you make is signed by you, not {}",
                change.change.by
            );
            return self.refuse(id, ErrorCode::NotAllowed, why);
        }
        if let Action::KeyChange(old) = &change.change.action {
            if old.len() == 32 {
                let checked = self
                    .shared
                    .store
                    .read(|tx| check_key_change(tx, &change, old));
                if let Err(e) = checked {
                    return self.queue(super::Outbound::event(super::error_event(id, e)));
                }
            }
        }
        let departed = match &change.change.action {
            Action::Remove(user) => {
                let by = &change.change.by;
                match self.shared.store.read(|tx| departed(tx, &group, by, user)) {
                    Ok(d) => d,
                    Err(e) => return self.queue(super::Outbound::event(super::error_event(id, e))),
                }
            }
            _ => false,
        };
        let me = self.user.clone();
        self.store_or_done(id, move |tx| {
            let signer = tx
                .user_keys(&me)?
                .ok_or_else(|| Error::Invalid(format!("no keys for {me}")))?;
            let signed = membership::signed_bytes(&change.change);
            if !crypto::verify_signature(&signer.ed25519, &signed, &change.signature)? {
                return Err(Error::refused(
                    ErrorCode::BadRequest,
                    "the change does not carry your valid signature",
                ));
            }
            let mut before = roster(tx, &group)?;
            if let (Action::Remove(user), Some(r)) = (&change.change.action, before.as_mut()) {
                // Still without an account (checked again here, on the writer's thread): the
                // removal puts the server's list and the chain in step again.
                if departed && !r.has(user) && !tx.user_exists(user)? {
                    r.members.push(user.clone());
                }
            }
            let after = membership::apply(before.as_ref(), &change)?;
            let action = &change.change.action;
            if let Action::Add(user) = action {
                if !tx.user_exists(user)? {
                    let why = format!("no such user: {user}");
                    return Err(Error::refused(ErrorCode::UnknownUser, why));
                }
            }
            membership::check_keys_cover(&keys, &membership::keyed_for(&after, action))?;
            let seq = change.change.seq;
            match (action, &after) {
                (Action::Leave, After::Deleted) => {
                    tx.delete_group(&group)?;
                    return Ok(None);
                }
                (Action::Create, _) => {
                    if !tx.create_group(&group, &me)? {
                        return Err(Error::refused(
                            ErrorCode::NameTaken,
                            format!("you already have a group named {group} (names ignore case)"),
                        ));
                    }
                }
                (Action::Add(user), _) => tx.add_member(&group, user)?,
                (Action::Remove(user), _) => tx.remove_member(&group, user)?,
                (Action::Leave, _) => tx.remove_member(&group, &me)?,
                // Checked before (`check_key_change`); the members stay.
                (Action::KeyChange(_), _) => {}
            }
            if let After::Roster(r) = &after {
                tx.set_group(&group, &r.admin, seq)?;
            }
            if !keys.is_empty() {
                tx.put_keys(&group, seq, &keys, &me)?;
            }
            let bytes = encode(&change)?;
            tx.add_change(&group, seq, &bytes)?;
            let announcement = NewMessage {
                client_id,
                body: change_body(&bytes),
                file: None,
                resend_after: None,
                patient: false,
            };
            Ok(Some(tx.store_group_message(
                &Outgoing::of(&me, &announcement),
                &group,
            )?))
        });
    }

    /// `GroupLog`: changes of a group's chain, to a member.
    pub(super) fn group_log(&self, id: u64, group: String, after: u64) {
        if !self.names_ok(id, &[("group", &group)]) {
            return;
        }
        let me = self.user.clone();
        self.read(id, move |tx| {
            member_view(tx, &group, &me)?;
            let changes = tx
                .changes(&group, after, MAX_CHANGES)?
                .iter()
                .map(|bytes| decode(bytes))
                .collect::<Result<Vec<SignedChange>>>()?;
            Ok(ServerReply::Changes { changes })
        });
    }

    /// `GroupRekey`: a member keys the current epoch, which has no keys yet.
    pub(super) fn group_rekey(&self, id: u64, group: String, epoch: u64, keys: Vec<WrappedKey>) {
        if !self.names_ok(id, &[("group", &group)]) {
            return;
        }
        let me = self.user.clone();
        self.write(id, move |tx| {
            let g = member_view(tx, &group, &me)?;
            membership::check_rekey(&g, epoch, &keys)?;
            tx.put_keys(&group, epoch, &keys, &me)?;
            Ok(ServerReply::Done)
        });
    }

    /// `GroupSend`: a member sends under the current epoch; stored once for every member.
    pub(super) fn group_send(&self, id: u64, group: String, epoch: u64, message: NewMessage) {
        if !(self.names_ok(id, &[("group", &group)]) && self.body_ok(id, &message.body)) {
            return;
        }
        let me = self.user.clone();
        let quotas = self.shared.config.quotas;
        let (watch, queue) = (&self.shared.quota_watch, format!("g:{group}"));
        let counted = watch.count(&quotas, &queue, None, message.body.len() as u64);
        let plain = !(counted || message.file.is_some() || message.resend_after.is_some());
        let patient = message.patient;
        let to = group.clone();
        // Every check, in a savepoint: for a message outside the common case, or one the
        // writer's merged statement left.
        let store = move |tx: &mut dyn Tx, msg: &Outgoing<'_>| {
            let g = member_view(tx, &to, msg.from)?;
            // A re-send of a message stored under an epoch that has moved on since is still
            // that message.
            if let Some(copy) = tx.stored_group_copy(msg, &to)? {
                return Ok(copy);
            }
            membership::check_send(&g, epoch)?;
            if counted {
                let queue = tx.queue_usage(&format!("g:{to}"))?;
                let len = msg.body.len() as u64;
                quotas.check_message(&format!("group {to}"), queue, None, len)?;
            }
            tx.store_group_message(msg, &to)
        };
        if plain {
            let msg = GroupMessage {
                from: me,
                group,
                epoch,
                client_id: message.client_id,
                body: message.body,
            };
            let done = self.stored_once(id, patient);
            let urgency = super::messages::urgency(patient);
            return self
                .shared
                .store
                .submit_group_message(msg, store, urgency, self.fence, done);
        }
        self.store(id, patient, move |tx| {
            store(tx, &Outgoing::of(&me, &message))
        });
    }

    /// `GroupList`: the caller's groups.
    pub(super) fn group_list(&self, id: u64) {
        let me = self.user.clone();
        self.read(id, move |tx| {
            let names = tx.user_groups(&me)?;
            let groups = names
                .iter()
                .map(|g| member_view(tx, g, &me))
                .collect::<Result<Vec<_>>>()?;
            Ok(ServerReply::Groups { groups })
        });
    }

    /// `GroupInfo`: one group, to a member.
    pub(super) fn group_info(&self, id: u64, group: String) {
        if !self.names_ok(id, &[("group", &group)]) {
            return;
        }
        let me = self.user.clone();
        self.read(id, move |tx| {
            Ok(ServerReply::Group {
                group: member_view(tx, &group, &me)?,
            })
        });
    }

    /// `GroupKey`: the caller's own wrapped key of an epoch.
    pub(super) fn group_key(&self, id: u64, group: String, epoch: u64) {
        if !self.names_ok(id, &[("group", &group)]) {
            return;
        }
        let me = self.user.clone();
        self.read(id, move |tx| {
            member_view(tx, &group, &me)?;
            let (key, wrapped_by) = tx.group_key(&group, epoch, &me)?.ok_or_else(|| {
                crate::Error::refused(
                    crate::net::ErrorCode::NotAllowed,
                    format!("no key of {group} epoch {epoch} for you"),
                )
            })?;
            Ok(ServerReply::GroupKey { wrapped_by, key })
        });
    }
}
