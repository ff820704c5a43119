//! Groups, as [`E2e`] keeps them: the verified chain of changes, epoch keys wrapped for
//! members, sender keys handed out before a first message, and sending.

use crate::client::Client;
use crate::crypto::{self, verify_signature, PairKey};
use crate::error::{Error, ErrorCode, Result};
use crate::membership::{self, After, Roster};
use crate::net::{Action, Change, Envelope, GroupInfo, SignedChange, WrappedKey, MAX_CHANGES};

use super::wire::{
    group_message_key, seal_group_with, sign_change, split_body, tag_order, wrap_aad, GroupSeq,
    Plain, CHANGE_VERSION,
};
use super::{E2e, Opened};

/// The most new changes of one group fetched at once (a few hundred bytes each): all are
/// fetched before any is checked, and a hostile server must not make that list endless.
const MAX_CHAIN: usize = 65_536;

/// What leaving a group left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Left {
    /// The group goes on, with the admin it had.
    Member,
    /// We were the admin: the longest-standing member (named) is now.
    HandedTo(String),
    /// We were the last member: the group is gone.
    Deleted,
}

impl E2e {
    /// An announced membership change: shown once it is found in the group's verified chain.
    pub(super) fn open_change(
        &mut self,
        client: &Client,
        group: &str,
        msg: &Envelope,
    ) -> Result<Opened> {
        let (_, rest) = split_body(msg, CHANGE_VERSION)?;
        let announced: SignedChange = crate::net::decode(rest).map_err(|_| {
            Error::Integrity(format!("message {} holds a malformed group change", msg.id))
        })?;
        let c = &announced.change;
        if c.group != group || c.by != msg.from {
            return Err(Error::Integrity(format!(
                "message {} announces a change of {} by {} as one of {group} by {}",
                msg.id, c.group, c.by, msg.from
            )));
        }
        if self.chains.get(group)?.change(c.seq).is_none() {
            self.sync_group(client, group)?;
        }
        if self.chains.get(group)?.change(c.seq) != Some(&announced) {
            return Err(Error::Integrity(format!(
                "message {} announces a change of {group} that its verified chain does not have",
                msg.id
            )));
        }
        let mut notice = membership::describe(c);
        let chain = self.chains.get(group)?;
        if let (Some(before), Some(after)) = (chain.at(c.seq.saturating_sub(1)), chain.at(c.seq)) {
            if before.admin != after.admin {
                let who = if after.admin == self.me {
                    "you are".to_string()
                } else {
                    format!("{} is", after.admin)
                };
                notice.push_str(&format!("; {who} now the admin"));
            }
        }
        let conversation = format!("c:{group}");
        let verdict = self.accepted()?.check(&conversation, c.seq, msg.id)?;
        Ok(Opened {
            plain: Plain::Membership(notice),
            verdict,
            conversation,
            seq: c.seq,
            msg_id: msg.id,
            held: None,
        })
    }

    /// Signs a change as us.
    fn sign_change(&self, change: Change) -> Result<SignedChange> {
        sign_change(&self.identity, change)
    }

    /// The Ed25519 key of a change's maker: ours, or their pinned one.
    fn signer_key(&mut self, user: &str) -> Result<Vec<u8>> {
        if user == self.me {
            return Ok(self.identity.public()?.ed25519);
        }
        Ok(self.peer_keys(user)?.ed25519.clone())
    }

    /// Brings our verified copy of `group`'s chain up to date with what the server has: each
    /// new change must carry its maker's signature and follow the rules from the change
    /// before it, or the whole answer is refused with a warning. Every new change is fetched
    /// before any is checked: a maker's key change vouches for the changes they signed
    /// before it with their earlier key ([`membership::signers`]).
    pub fn sync_group(&mut self, client: &Client, group: &str) -> Result<()> {
        let mut chain = self.chains.get(group)?.clone();
        let after = chain.head().map_or(0, |r| r.seq);
        let mut new: Vec<SignedChange> = Vec::new();
        loop {
            let batch = client.group_log(group, after + new.len() as u64)?;
            let more = batch.len() >= MAX_CHANGES;
            new.extend(batch);
            if !more {
                break;
            }
            if new.len() > MAX_CHAIN {
                return Err(Error::Integrity(format!(
                    "WARNING: the server sends {group} with more than {MAX_CHAIN} changes; \
                     refusing it"
                )));
            }
        }
        // A long-running client may hold a maker's keys from before a key change (or a
        // `trust` in another process): with something new to check, ask the directory again.
        for signed in &new {
            let by = &signed.change.by;
            if *by != self.me {
                self.keys.remove(by);
                self.peers.remove(by);
            }
        }
        let signers = membership::signers(&new, |by| self.signer_key(by))?;
        for (signed, key) in new.iter().zip(signers) {
            let c = &signed.change;
            let forged = |why: String| {
                Error::Integrity(format!(
                    "WARNING: change {} of {group} ({}) {why}. The server may be forging \
                     the group's membership; refusing it",
                    c.seq,
                    membership::describe(c)
                ))
            };
            if c.group != group {
                return Err(forged(format!("belongs to {}", c.group)));
            }
            if !verify_signature(&key, &membership::signed_bytes(c), &signed.signature)? {
                return Err(forged(format!(
                    "does not carry a valid signature of {}",
                    c.by
                )));
            }
            chain.extend(signed.clone()).map_err(|e| match e {
                Error::Refused {
                    code: ErrorCode::UnknownGroup,
                    ..
                } => forged(format!("was made by {}, who is not a member", c.by)),
                e => forged(format!("breaks the group's rules ({e})")),
            })?;
        }
        self.chains.append(group, &new)
    }

    /// The verified members of `group` in key epoch `epoch` (fetching newer changes first if
    /// our chain stops before it).
    pub(super) fn roster_at(&mut self, client: &Client, group: &str, epoch: u64) -> Result<Roster> {
        if self.chains.get(group)?.at(epoch).is_none() {
            self.sync_group(client, group)?;
        }
        self.chains.get(group)?.at(epoch).cloned().ok_or_else(|| {
            Error::Integrity(format!(
                "key epoch {epoch} of {group} is not in its verified chain of changes"
            ))
        })
    }

    /// The group as its verified chain says now (after fetching what is new).
    pub fn group_roster(&mut self, client: &Client, group: &str) -> Result<Roster> {
        self.sync_group(client, group)?;
        self.chains
            .get(group)?
            .head()
            .cloned()
            .ok_or_else(|| Error::Integrity(format!("{group} has no verified chain of changes")))
    }

    /// Wraps a group key for `member`.
    fn wrap(&mut self, group: &str, epoch: u64, member: &str, key: &PairKey) -> Result<WrappedKey> {
        let aad = wrap_aad(group, epoch, member, &self.me);
        let wrapped = self.pair_key(member)?.seal(&aad, &key.0)?;
        Ok(WrappedKey {
            member: member.to_string(),
            wrapped,
        })
    }

    /// Wraps `key` for each of `members`.
    fn wrap_all(
        &mut self,
        group: &str,
        epoch: u64,
        members: &[String],
        key: &PairKey,
    ) -> Result<Vec<WrappedKey>> {
        members
            .iter()
            .map(|m| self.wrap(group, epoch, m, key))
            .collect()
    }

    /// The key of `epoch` of `group`: cached, or fetched from the server and unwrapped. It
    /// must have been wrapped by whoever may key that epoch: the maker of the change that
    /// started it, or, after a leave, a member of the epoch.
    pub fn group_key(&mut self, client: &Client, group: &str, epoch: u64) -> Result<PairKey> {
        let slot = (group.to_string(), epoch);
        if let Some(k) = self.group_keys.get(&slot) {
            return Ok(k.clone());
        }
        let sealed = client.group_key(group, epoch)?;
        let by = sealed.wrapped_by;
        let roster = self.roster_at(client, group, epoch)?;
        let starter = self.chains.get(group)?.change(epoch).cloned();
        let allowed = match starter.map(|c| c.change) {
            Some(Change {
                action: Action::Leave,
                ..
            }) => roster.has(&by),
            Some(c) => c.by == by,
            None => false,
        };
        if !allowed {
            return Err(Error::Integrity(format!(
                "WARNING: the key of {group} epoch {epoch} was wrapped by {by}, who may not key \
                 that epoch; refusing it"
            )));
        }
        let aad = wrap_aad(group, epoch, &self.me, &by);
        let raw = self.pair_key(&by)?.open(&aad, &sealed.key)?;
        let key = PairKey(raw.try_into().map_err(|_| {
            Error::Integrity(format!(
                "the key of {group} epoch {epoch} has the wrong size"
            ))
        })?);
        self.group_keys.insert(slot, key.clone());
        Ok(key)
    }

    /// Checks a removal sent to us by `from`: their own signed change, removing us, that
    /// follows from the group's chain as we verified it (when we have it up to there). Says
    /// what happened; forgets the group's chain, which is no longer ours to follow.
    pub(super) fn removal(&mut self, from: &str, signed: &SignedChange) -> Result<String> {
        let c = &signed.change;
        let forged = |why: &str| {
            Error::Integrity(format!(
                "a removal from {} sent by {from} {why}; refusing it",
                c.group
            ))
        };
        if c.by != from || c.action != Action::Remove(self.me.clone()) {
            return Err(forged("is not theirs, or does not remove us"));
        }
        let key = self.signer_key(from)?;
        if !verify_signature(&key, &membership::signed_bytes(c), &signed.signature)? {
            return Err(forged("does not carry their valid signature"));
        }
        let chain = self.chains.get(&c.group)?;
        let checked = match (chain.change(c.seq), chain.head()) {
            (Some(known), _) => known == signed,
            (None, Some(head)) if head.seq + 1 == c.seq => {
                membership::apply(Some(head), signed).is_ok()
            }
            // We never saw the group up to there: the signature is all we can check.
            _ => {
                return Ok(format!(
                    "{from} removed you from {} (their signature checked; this client had not                      followed the group up to then)",
                    c.group
                ))
            }
        };
        if !checked {
            return Err(forged("does not follow from the group's chain"));
        }
        self.chains.forget(&c.group)?;
        self.forget_sender_keys(&c.group)?;
        self.group_keys.retain(|(g, _), _| *g != c.group);
        Ok(format!("{from} removed you from {}", c.group))
    }

    /// Makes, signs and submits a change of `group` (with the new epoch's key for exactly the
    /// members after it), and adds it to our verified chain. Tries again if the group changed
    /// meanwhile; a change that went through although its reply was lost is found in the
    /// chain. Returns the group after the change (`None`: it is gone).
    fn change_group(&mut self, client: &Client, group: &str, action: Action) -> Result<After> {
        let mut tries = 0;
        loop {
            tries += 1;
            if action != Action::Create {
                self.sync_group(client, group)?;
            }
            let before = self.chains.get(group)?.head().cloned();
            let (seq, prev) = before
                .as_ref()
                .map_or((1, Vec::new()), |r| (r.seq + 1, r.head.clone()));
            let signed = self.sign_change(Change {
                group: group.to_string(),
                seq,
                prev,
                by: self.me.clone(),
                action: action.clone(),
            })?;
            let after = membership::apply(before.as_ref(), &signed)?;
            let key = PairKey::random()?;
            let keys = self.wrap_all(group, seq, &membership::keyed_for(&after, &action), &key)?;
            let client_id = crypto::random_u64()?;
            match client.group_change(&signed, keys, client_id) {
                Ok(_) => {}
                Err(Error::Refused {
                    code: ErrorCode::Conflict,
                    ..
                }) if action != Action::Create && tries < 4 => {
                    self.sync_group(client, group)?;
                    if self.chains.get(group)?.change(seq) != Some(&signed) {
                        continue;
                    }
                }
                Err(e) => return Err(e),
            }
            match &after {
                After::Roster(_) if action == Action::Leave => {
                    self.chains.forget(group)?;
                    self.forget_sender_keys(group)?;
                }
                After::Roster(_) => {
                    if self.chains.get(group)?.change(seq).is_none() {
                        self.chains.append(group, std::slice::from_ref(&signed))?;
                    }
                    if action != Action::Leave {
                        self.group_keys.insert((group.to_string(), seq), key);
                        self.epochs.insert(group.to_string(), seq);
                    }
                }
                After::Deleted => {
                    self.chains.forget(group)?;
                    self.forget_sender_keys(group)?;
                }
            }
            if action == Action::Leave {
                self.epochs.remove(group);
            }
            return Ok(after);
        }
    }

    /// Creates `group` (named `OUR-NAME/...`) with us as admin, keyed with a fresh key.
    pub fn group_create(&mut self, client: &Client, group: &str) -> Result<()> {
        self.change_group(client, group, Action::Create).map(|_| ())
    }

    /// Adds `user` (admin only); the group moves to a new epoch keyed for everyone.
    pub fn group_add(&mut self, client: &Client, group: &str, user: &str) -> Result<()> {
        self.change_group(client, group, Action::Add(user.to_string()))
            .map(|_| ())
    }

    /// Removes `user` (admin only) and starts a new epoch whose key `user` never gets.
    /// Returns the new epoch.
    pub fn group_remove(&mut self, client: &Client, group: &str, user: &str) -> Result<u64> {
        let seq = match self.change_group(client, group, Action::Remove(user.to_string()))? {
            After::Roster(r) => r.seq,
            After::Deleted => return Err(Error::Protocol(format!("{group} is gone"))),
        };
        // The removed member no longer gets the group's messages: tell them directly, with
        // the signed change (best effort: the removal stands either way).
        if let Some(signed) = self.chains.get(group)?.change(seq).cloned() {
            let told = crypto::random_u64().and_then(|client_id| {
                let body = self.seal_direct(user, client_id, &Plain::Removal(signed))?;
                client.send(user, client_id, &body, None)
            });
            match told {
                Ok(_) => {}
                // An account an operator deleted: nobody to tell.
                Err(Error::Refused {
                    code: ErrorCode::UnknownUser,
                    ..
                }) => {}
                Err(e) => log::warn!("could not tell {user} they were removed from {group}: {e}"),
            }
        }
        Ok(seq)
    }

    /// Adds our key change to `group` (after `fastchat rekey`), naming `old`, the Ed25519 key
    /// we signed our earlier changes with; the new epoch is keyed with our new keys.
    pub fn group_key_change(&mut self, client: &Client, group: &str, old: Vec<u8>) -> Result<()> {
        self.change_group(client, group, Action::KeyChange(old))
            .map(|_| ())
    }

    /// Adds our key change to `group` again (where `fastchat rekey` could not), naming the key
    /// it replaced.
    pub fn group_key_change_again(&mut self, client: &Client, group: &str) -> Result<()> {
        let old = self.store.replaced_key()?.ok_or_else(|| {
            Error::Invalid(
                "no key change to add: this user's keys were never made again (fastchat rekey)"
                    .into(),
            )
        })?;
        self.group_key_change(client, group, old)
    }

    /// Leaves `group`. The next member to send starts a new epoch.
    pub fn group_leave(&mut self, client: &Client, group: &str) -> Result<Left> {
        let admin = self.chains.get(group)?.head().map(|r| r.admin.clone());
        Ok(match self.change_group(client, group, Action::Leave)? {
            After::Deleted => Left::Deleted,
            After::Roster(r) if admin.as_deref() == Some(self.me.as_str()) => {
                Left::HandedTo(r.admin)
            }
            After::Roster(_) => Left::Member,
        })
    }

    /// Whether the directory knows none of `users` (their accounts were deleted).
    fn have_no_account(&mut self, users: &[&String]) -> bool {
        users.iter().all(|u| {
            matches!(
                self.directory.keys(u),
                Err(Error::Refused {
                    code: ErrorCode::UnknownUser,
                    ..
                })
            )
        })
    }

    /// The current epoch and its key, making the key first if the epoch has none yet (after a
    /// member left): for the members of the verified chain, which must be the server's too.
    fn current_key(&mut self, client: &Client, info: &GroupInfo) -> Result<(u64, PairKey)> {
        let (group, epoch) = (info.name.as_str(), info.epoch);
        let roster = self.group_roster(client, group)?;
        if roster.seq != epoch {
            return Err(Error::Integrity(format!(
                "WARNING: the server says {group} is at change {epoch}, but its verified chain is \
                 at change {}; refusing to send",
                roster.seq
            )));
        }
        let mut listed = info.members.clone();
        let mut verified = roster.members.clone();
        listed.sort();
        verified.sort();
        if listed != verified {
            let ghosts: Vec<&String> = listed.iter().filter(|m| !roster.has(m)).collect();
            let missing: Vec<&String> = verified.iter().filter(|m| !listed.contains(m)).collect();
            if ghosts.is_empty() && self.have_no_account(&missing) {
                return Err(departed_members(group, &missing, &roster.admin, &self.me));
            }
            return Err(Error::Integrity(format!(
                "WARNING: the server lists members of {group} that no signed change made \
                 ({ghosts:?}) or leaves out members ({missing:?}). The server may be forging \
                 the group's membership; refusing to key or send"
            )));
        }
        self.epochs.insert(group.to_string(), epoch);
        if info.keyed {
            return Ok((epoch, self.group_key(client, group, epoch)?));
        }
        let key = PairKey::random()?;
        let keys = self.wrap_all(group, epoch, &roster.members, &key)?;
        match client.group_rekey(group, epoch, keys) {
            Ok(()) => {
                self.group_keys
                    .insert((group.to_string(), epoch), key.clone());
                Ok((epoch, key))
            }
            // Another member keyed it first: use theirs.
            Err(Error::Refused {
                code: ErrorCode::Conflict,
                ..
            }) => Ok((epoch, self.group_key(client, group, epoch)?)),
            Err(e) => Err(e),
        }
    }

    /// The epoch to send in and its key: the cached ones, or the group's current state.
    fn send_key(&mut self, client: &Client, group: &str, fresh: bool) -> Result<(u64, PairKey)> {
        if !fresh {
            if let Some(&epoch) = self.epochs.get(group) {
                if let Some(key) = self.group_keys.get(&(group.to_string(), epoch)) {
                    return Ok((epoch, key.clone()));
                }
            }
        }
        let info = client.group_info(group)?;
        self.current_key(client, &info)
    }

    /// Encrypts and sends `plain` to `group` (with a tag for each member); returns the stored
    /// message id. If the
    /// group moved to a new epoch meanwhile, fetches it and sends again (same client id).
    pub fn group_send(&mut self, client: &Client, group: &str, plain: &Plain) -> Result<i64> {
        self.group_send_with(client, group, plain, None)
    }

    /// Like [`E2e::group_send`], offering a finished upload.
    pub fn group_send_with(
        &mut self,
        client: &Client,
        group: &str,
        plain: &Plain,
        file: Option<i64>,
    ) -> Result<i64> {
        let client_id = crypto::random_u64()?;
        let seq = self.next_seq();
        let mut fresh = false;
        loop {
            let (epoch, key) = self.send_key(client, group, fresh)?;
            // Our chain of the epoch goes to its members first, then the message takes the
            // chain's next key (saved before the message leaves).
            let members = self.roster_at(client, group, epoch)?.members;
            self.hand_out(client, group, epoch, &members)?;
            let others = tag_order(&members, &self.me);
            let (n, chain_key, macs) = {
                let locked = self.sender_keys.lock(&self.store)?;
                let mut chains = locked.load(group)?;
                let macs = chains.macs(epoch, &others).ok_or_else(|| {
                    Error::Local(format!("a member of {group} has no key of ours yet"))
                })?;
                let (n, chain_key) = chains.next_key(epoch)?;
                locked.save(group, &chains)?;
                (n, chain_key, macs)
            };
            let at = GroupSeq { epoch, seq, n };
            let message_key = group_message_key(&key, &chain_key)?;
            let body = seal_group_with(&message_key, &macs, group, &self.me, client_id, at, plain)?;
            match client.group_send(group, client_id, epoch, &body, file) {
                Ok(msg_id) => return Ok(msg_id),
                Err(Error::Refused {
                    code: ErrorCode::Conflict,
                    ..
                }) if !fresh => fresh = true,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Why nothing can be sent to `group` while the signed chain names members whose accounts an
/// operator deleted (`gone`): the server no longer lists them, and only the admin can sign
/// their removal.
fn departed_members(group: &str, gone: &[&String], admin: &str, me: &str) -> Error {
    let names = gone
        .iter()
        .map(|u| u.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let (whose, were) = match gone {
        [_] => ("the account of", "was"),
        _ => ("the accounts of", "were"),
    };
    let then = if admin == me {
        format!("remove them first: fastchat group remove {group} NAME")
    } else {
        format!("its admin, {admin}, must remove them first")
    };
    Error::Invalid(format!(
        "{whose} {names} in {group} {were} deleted by an operator; {then} (nothing was sent)"
    ))
}
