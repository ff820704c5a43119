//! Group requests. Each runs in one transaction that reads the group, applies the rules of
//! [`crate::membership`], and writes the change; a refusal undoes nothing because nothing was
//! written yet.

use super::Session;
use crate::db::{Outgoing, Tx};
use crate::error::Result;
use crate::membership::{self, Leaving};
use crate::net::{GroupInfo, NewMessage, ServerReply, WrappedKey};

/// The group as `user` may see it (see [`membership::member_view`]).
fn member_view(tx: &mut dyn Tx, group: &str, user: &str) -> Result<GroupInfo> {
    let state = tx.group(group)?;
    membership::member_view(group, state, user)
}

impl Session<'_> {
    /// `GroupCreate`: the caller becomes admin and only member; epoch 1 is keyed with `key`.
    pub(super) fn group_create(&self, id: u64, group: String, key: Vec<u8>) {
        if !self.names_ok(id, &[("group", &group)]) {
            return;
        }
        let me = self.user.clone();
        self.write(id, move |tx| {
            let created = tx.create_group(&group, &me)?;
            membership::check_create(&group, !created)?;
            let wrapped = [WrappedKey {
                member: me.clone(),
                wrapped: key,
            }];
            tx.put_keys(&group, 1, &wrapped, &me)?;
            Ok(ServerReply::Done)
        });
    }

    /// `GroupAdd`: the admin adds `user` with the current epoch's key.
    pub(super) fn group_add(&self, id: u64, group: String, user: String, epoch: u64, key: Vec<u8>) {
        if !self.names_ok(id, &[("group", &group), ("user", &user)]) {
            return;
        }
        let me = self.user.clone();
        self.write(id, move |tx| {
            let g = member_view(tx, &group, &me)?;
            let exists = tx.user_exists(&user)?;
            membership::check_add(&g, &me, &user, exists, epoch)?;
            tx.add_member(&group, &user)?;
            let wrapped = [WrappedKey {
                member: user,
                wrapped: key,
            }];
            tx.put_keys(&group, epoch, &wrapped, &me)?;
            Ok(ServerReply::Done)
        });
    }

    /// `GroupRemove`: the admin removes `user` and starts `epoch` with `keys` for the rest.
    pub(super) fn group_remove(
        &self,
        id: u64,
        group: String,
        user: String,
        epoch: u64,
        keys: Vec<WrappedKey>,
    ) {
        if !self.names_ok(id, &[("group", &group), ("user", &user)]) {
            return;
        }
        let me = self.user.clone();
        self.write(id, move |tx| {
            let g = member_view(tx, &group, &me)?;
            membership::check_remove(&g, &me, &user, epoch, &keys)?;
            tx.remove_member(&group, &user)?;
            tx.set_group(&group, &g.admin, epoch)?;
            tx.put_keys(&group, epoch, &keys, &me)?;
            Ok(ServerReply::Done)
        });
    }

    /// `GroupLeave`: any member leaves; the group moves to a new, unkeyed epoch (or is deleted
    /// with its last member).
    pub(super) fn group_leave(&self, id: u64, group: String) {
        if !self.names_ok(id, &[("group", &group)]) {
            return;
        }
        let me = self.user.clone();
        self.write(id, move |tx| {
            let g = member_view(tx, &group, &me)?;
            match membership::leave(&g, &me) {
                Leaving::Deleted => tx.delete_group(&group)?,
                Leaving::Stays { admin, epoch } => {
                    tx.remove_member(&group, &me)?;
                    tx.set_group(&group, &admin, epoch)?;
                }
            }
            Ok(ServerReply::Done)
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
        self.store(id, true, move |tx| {
            let msg = Outgoing::of(&me, &message);
            let g = member_view(tx, &group, &me)?;
            // A re-send of a message stored under an epoch that has moved on since is still
            // that message.
            if let Some(copy) = tx.stored_group_copy(&msg, &group)? {
                return Ok(copy);
            }
            membership::check_send(&g, epoch)?;
            tx.store_group_message(&msg, &group)
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
