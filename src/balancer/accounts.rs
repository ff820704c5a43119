//! Accounts: signup (name, password, public keys) and the password check of a login.
//! Passwords are never stored or logged: a salted scrypt hash is, compared in constant time.

use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::crypto::{self, ScryptCost};
use crate::db::Store;
use crate::error::{Error, ErrorCode, Result};
use crate::names;
use crate::net::{
    new_password_problem, PublicKeys, SignedPrekey, MAX_ONE_TIME_PREKEYS, MAX_PASSWORD,
};

/// The prekeys a signup publishes: the signed one, and one-time prekeys (id, public key).
pub type FirstPrekeys = (SignedPrekey, Vec<(u32, Vec<u8>)>);

/// Creates an account (its password hashed at `cost`), refusing bad names, passwords too
/// short or too long ([`new_password_problem`]), malformed keys, and names already taken.
pub fn signup(
    store: &Store,
    cost: ScryptCost,
    name: &str,
    password: &str,
    keys: PublicKeys,
    prekeys: Option<FirstPrekeys>,
) -> Result<()> {
    names::validate("user", name)?;
    if let Some(problem) = new_password_problem(password) {
        return Err(Error::refused(ErrorCode::BadRequest, problem));
    }
    check_keys(&keys)?;
    let hash = crypto::hash_password(password, cost)?;
    let owned = name.to_string();
    let created = store.call(move |tx| {
        let created = tx.create_user(&owned, &hash, &keys)?;
        if let (true, Some((signed, one_time))) = (created, &prekeys) {
            tx.put_prekeys(&owned, Some(signed), one_time, MAX_ONE_TIME_PREKEYS)?;
        }
        Ok(created)
    })?;
    if !created {
        return Err(Error::refused(
            ErrorCode::NameTaken,
            format!("the name {name} is taken (names ignore case)"),
        ));
    }
    Ok(())
}

/// Refuses public keys that are not a 32-byte X25519 key and a 32-byte Ed25519 key.
pub fn check_keys(keys: &PublicKeys) -> Result<()> {
    if keys.x25519.len() != 32 || keys.ed25519.len() != 32 {
        return Err(Error::refused(
            ErrorCode::BadRequest,
            "public keys must be 32-byte X25519 and Ed25519 keys",
        ));
    }
    Ok(())
}

/// Checks a password; a wrong name and a wrong password get the same answer after the same
/// work (`dummy_hash` stands in for the hash of a name that does not exist), so neither the
/// answer nor its timing tells which names exist.
pub fn check_password(store: &Store, dummy_hash: &str, name: &str, password: &str) -> Result<()> {
    let invalid = || {
        Error::refused(
            ErrorCode::InvalidCredentials,
            "invalid username or password",
        )
    };
    let stored = if names::validate("user", name).is_ok() && password.len() <= MAX_PASSWORD {
        store.read(|tx| tx.password_hash(name))?
    } else {
        None
    };
    match stored {
        Some(hash) if crypto::verify_password(password, &hash)? => Ok(()),
        Some(_) => Err(invalid()),
        None => {
            let _ = crypto::verify_password(password, dummy_hash);
            Err(invalid())
        }
    }
}

/// How many passwords are hashed at once, at most: each scrypt takes 32 MiB and tens of
/// milliseconds, so a burst of logins (or guesses) must queue rather than take the machine.
pub struct HashSlots {
    free: Mutex<usize>,
    freed: Condvar,
}

/// A slot taken from [`HashSlots`]; given back when dropped.
pub struct HashSlot<'a>(&'a HashSlots);

impl HashSlots {
    /// `n` slots.
    pub fn new(n: usize) -> HashSlots {
        HashSlots {
            free: Mutex::new(n),
            freed: Condvar::new(),
        }
    }

    /// A slot, waiting up to `patience` for one; `None` if none came free.
    pub fn take(&self, patience: Duration) -> Option<HashSlot<'_>> {
        let deadline = Instant::now() + patience;
        let mut free = self.free.lock();
        while *free == 0 {
            if self.freed.wait_until(&mut free, deadline).timed_out() && *free == 0 {
                return None;
            }
        }
        *free -= 1;
        Some(HashSlot(self))
    }
}

impl Drop for HashSlot<'_> {
    fn drop(&mut self) {
        *self.0.free.lock() += 1;
        self.0.freed.notify_one();
    }
}
