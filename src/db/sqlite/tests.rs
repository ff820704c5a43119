//! Tests of the SQLite backend through the storage interface ([`Tx`], [`Store`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;

use super::{open, schema, SqliteTx, WalFile, WriterConn};
use crate::db::writer::{Batch, Writer};
use crate::db::{now_ms, Options, Outgoing, Store, Tx};
use crate::error::{Error, Result};
use crate::net::{PublicKeys, WrappedKey};

fn keys() -> PublicKeys {
    PublicKeys {
        x25519: vec![1; 32],
        ed25519: vec![2; 32],
    }
}

fn fresh() -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("chat.db");
    open(&path)?;
    Ok((dir, path))
}

fn users(tx: &mut dyn Tx, names: &[&str]) -> Result<()> {
    for u in names {
        assert!(tx.create_user(u, "h", &keys())?);
    }
    Ok(())
}

#[test]
fn migrations_are_idempotent_and_versioned() -> Result<()> {
    let (_dir, path) = fresh()?;
    let conn = open(&path)?;
    let v: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    assert_eq!(v, schema::version());
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
    assert_eq!(mode, "wal");
    Ok(())
}

#[test]
fn the_database_and_its_wal_are_private() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, path) = fresh()?;
    let store = Store::open(&path)?;
    store.call(|tx| users(tx, &["alice"]))?;
    for suffix in ["", "-wal", "-shm"] {
        let file = format!("{}{suffix}", path.display());
        let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }
    // A file made readable by others is made private again when opened.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    drop(store);
    open(&path)?;
    assert_eq!(
        std::fs::metadata(&path)?.permissions().mode() & 0o777,
        0o600
    );
    Ok(())
}

#[test]
fn the_log_length_follows_the_file_even_when_it_is_replaced() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("chat.db-wal");
    let mut wal = WalFile::new(path.clone());
    assert_eq!(wal.len(), 0, "no log yet");
    std::fs::write(&path, [0u8; 100])?;
    assert_eq!(wal.len(), 100);
    // Grown and cut through other descriptors, as SQLite does.
    let other = std::fs::OpenOptions::new().write(true).open(&path)?;
    other.set_len(5000)?;
    assert_eq!(wal.len(), 5000);
    other.set_len(10)?;
    assert_eq!(wal.len(), 10);
    // Removed and made again: the kept descriptor names a file that is gone.
    std::fs::remove_file(&path)?;
    std::fs::write(&path, [0u8; 300])?;
    assert_eq!(wal.len(), 300);
    std::fs::remove_file(&path)?;
    assert_eq!(wal.len(), 0, "the log is gone");
    Ok(())
}

#[test]
fn newer_schema_is_refused() -> Result<()> {
    let (_dir, path) = fresh()?;
    Connection::open(&path)?.pragma_update(None, "user_version", 999)?;
    assert!(open(&path).is_err());
    Ok(())
}

#[test]
fn users_are_unique() -> Result<()> {
    let (_dir, path) = fresh()?;
    let conn = open(&path)?;
    let tx = &mut SqliteTx::new(&conn);
    assert!(tx.create_user("alice", "h", &keys())?);
    assert!(!tx.create_user("alice", "h2", &keys())?);
    assert_eq!(tx.password_hash("alice")?.as_deref(), Some("h"));
    assert_eq!(tx.password_hash("bob")?, None);
    Ok(())
}

#[test]
fn sessions_expire() -> Result<()> {
    let (_dir, path) = fresh()?;
    let conn = open(&path)?;
    let tx = &mut SqliteTx::new(&conn);
    users(tx, &["alice"])?;
    tx.create_session(b"live", "alice", now_ms() + 60_000, &[5; 32])?;
    tx.create_session(b"dead", "alice", now_ms() - 1, &[6; 32])?;
    let live = tx.session(b"live")?.expect("live");
    assert_eq!(
        (live.user.as_str(), live.session_key),
        ("alice", vec![5; 32])
    );
    assert_eq!(tx.session(b"dead")?, None);
    assert_eq!(tx.session(b"none")?, None);
    Ok(())
}

#[test]
fn connections_of_ended_sessions_are_found_on_their_server() -> Result<()> {
    let (_dir, path) = fresh()?;
    let conn = open(&path)?;
    let tx = &mut SqliteTx::new(&conn);
    users(tx, &["alice", "bob"])?;
    tx.create_session(b"a", "alice", now_ms() + 60_000, &[1; 32])?;
    tx.create_session(b"b", "bob", now_ms() + 60_000, &[2; 32])?;
    tx.add_presence(7, 1, "alice", b"a")?;
    tx.add_presence(7, 2, "bob", b"b")?;
    tx.add_presence(9, 3, "bob", b"b")?;
    assert!(tx.ended_sessions(7)?.is_empty());
    tx.end_session(b"b")?;
    assert_eq!(
        tx.ended_sessions(7)?,
        [2],
        "bob's connection here, not alice's"
    );
    assert_eq!(tx.ended_sessions(9)?, [3], "and on every server");
    Ok(())
}

#[test]
fn a_server_keeps_its_id_by_name() -> Result<()> {
    let (_dir, path) = fresh()?;
    let conn = open(&path)?;
    let tx = &mut SqliteTx::new(&conn);
    let one = tx.register_server("server-1", "127.0.0.1:1")?;
    let two = tx.register_server("server-2", "127.0.0.1:2")?;
    assert_ne!(one, two);
    assert_eq!(
        tx.register_server("server-1", "127.0.0.1:9")?,
        one,
        "same name, same id"
    );
    assert_eq!(
        tx.server_addr(one)?,
        Some(("127.0.0.1:9".to_string(), "server-1".to_string()))
    );
    assert_eq!(tx.server_name(two)?.as_deref(), Some("server-2"));
    // Forgotten (silent too long), a server loses its connections but not its id.
    tx.add_presence(two, 5, "bob", b"t")?;
    assert_eq!(tx.present_connections(two)?, [5]);
    tx.forget_server(two)?;
    assert_eq!(tx.present_connections(two)?, Vec::<u64>::new());
    assert_eq!(tx.server_name(two)?.as_deref(), Some("server-2"));
    assert_eq!(tx.register_server("server-2", "127.0.0.1:2")?, two);
    Ok(())
}

#[test]
fn queue_is_ordered_idempotent_and_acked_by_recipient_only() -> Result<()> {
    let (_dir, path) = fresh()?;
    let conn = open(&path)?;
    let tx = &mut SqliteTx::new(&conn);
    users(tx, &["alice", "bob"])?;
    let a = tx.store_message(&Outgoing::new("alice", 1, b"one"), "bob")?;
    let b = tx.store_message(&Outgoing::new("alice", 2, b"two"), "bob")?;
    let again = tx.store_message(&Outgoing::new("alice", 1, b"one"), "bob")?;
    assert_eq!(
        a.envelope.id, again.envelope.id,
        "re-send is not stored twice"
    );
    assert!(a.envelope.id < b.envelope.id);
    let q = tx.queued("bob", 0, 10)?;
    assert_eq!(
        q.iter().map(|m| m.body.as_slice()).collect::<Vec<_>>(),
        [b"one", b"two"]
    );
    assert_eq!(tx.ack("alice", &[a.envelope.id])?, 0, "not alice's to ack");
    assert_eq!(tx.ack("bob", &[a.envelope.id])?, 1);
    assert_eq!(tx.queued("bob", 0, 10)?.len(), 1);
    // Ids are never reused, even after the newest row is deleted.
    tx.ack("bob", &[b.envelope.id])?;
    let c = tx.store_message(&Outgoing::new("alice", 3, b"three"), "bob")?;
    assert!(c.envelope.id > b.envelope.id);
    assert_eq!(tx.newest_message_id()?, c.envelope.id);
    Ok(())
}

#[test]
fn an_unknown_recipient_is_refused() -> Result<()> {
    let (_dir, path) = fresh()?;
    let conn = open(&path)?;
    let tx = &mut SqliteTx::new(&conn);
    users(tx, &["alice"])?;
    match tx.store_message(&Outgoing::new("alice", 1, b"x"), "nobody") {
        Err(Error::Refused { code, .. }) => assert_eq!(code, crate::error::ErrorCode::UnknownUser),
        other => panic!("expected a refusal, got {other:?}"),
    }
    Ok(())
}

#[test]
fn store_reports_presence() -> Result<()> {
    let (_dir, path) = fresh()?;
    let conn = open(&path)?;
    let tx = &mut SqliteTx::new(&conn);
    users(tx, &["alice", "bob"])?;
    tx.add_presence(7, 1, "bob", b"t")?;
    tx.add_presence(7, 2, "bob", b"t")?;
    tx.add_presence(9, 3, "bob", b"t")?;
    let bob = || "bob".to_string();
    let at = tx
        .store_message(&Outgoing::new("alice", 1, b"x"), "bob")?
        .online_at;
    assert_eq!(at, [(7, bob()), (9, bob())], "one entry per server, sorted");
    tx.remove_presence(9, 3)?;
    assert_eq!(
        tx.store_message(&Outgoing::new("alice", 2, b"x"), "bob")?
            .online_at,
        [(7, bob())]
    );
    assert_eq!(tx.online_users(10, &[7, 9])?, ["bob"]);
    assert!(
        tx.online_users(10, &[9])?.is_empty(),
        "a connection on a server that is not live does not count"
    );
    let (bob, ghost) = ("bob".to_string(), "ghost".to_string());
    assert_eq!(tx.online_among(&[bob.clone(), ghost], &[7])?, [bob]);
    assert_eq!(tx.presence_servers()?, [7]);
    tx.clear_presence(7)?;
    assert!(tx.online_users(10, &[7, 9])?.is_empty());
    Ok(())
}

#[test]
fn writer_commits_in_order_and_isolates_failures() -> Result<()> {
    let (_dir, path) = fresh()?;
    let store = Store::open(&path)?;
    store.call(|tx| users(tx, &["alice", "bob"]))?;
    let (tx, rx) = crossbeam_channel::unbounded();
    for i in 0..100u64 {
        let tx = tx.clone();
        let to = if i == 50 { "nobody" } else { "bob" };
        store.submit(
            move |t| t.store_message(&Outgoing::new("alice", i, b"m"), to),
            move |res| {
                let _ = tx.send((i, res.map(|s| s.envelope.id)));
            },
        );
    }
    drop(tx);
    let results: Vec<_> = rx.iter().collect();
    assert_eq!(results.len(), 100);
    let order: Vec<u64> = results.iter().map(|(i, _)| *i).collect();
    assert_eq!(order, (0..100).collect::<Vec<_>>(), "completions in order");
    assert!(results[50].1.is_err(), "the bad job fails alone");
    assert_eq!(store.read(|t| t.queued("bob", 0, 1000))?.len(), 99);
    Ok(())
}

#[test]
fn the_writer_starts_the_log_over_when_a_checkpoint_asks() -> Result<()> {
    let (_dir, path) = fresh()?;
    // The writer without its checkpoint thread: this test plays that thread's rounds.
    let (mut writer, _) = super::writer_conn(&path, &Options::default())?;
    let checkpoints = super::connect(&path)?;
    let other_writer = open(&path)?;
    let mut log_file = WalFile::new(path.with_extension("db-wal"));
    let body = [7u8; 3000];
    let batch = |writer: &mut WriterConn, id: u64| -> Result<()> {
        writer.begin()?;
        writer.run(true, &mut |tx| {
            tx.store_message(&Outgoing::new("alice", id, &body), "bob")
                .is_ok()
        })?;
        writer.commit()
    };
    SqliteTx::new(&other_writer).create_user("alice", "h", &keys())?;
    SqliteTx::new(&other_writer).create_user("bob", "h", &keys())?;
    // About 1.2 MiB of log, past a restart point of 512 KiB.
    for id in 0..150 {
        batch(&mut writer, id)?;
    }
    // A reader uses the log (as a server's connections nearly always do) while a round
    // copies it all and asks for a restart, and another process commits (it cannot start
    // the log over while the reader is in it). So when this writer begins, the log is not
    // all copied, and SQLite alone would go on appending to it.
    let reader = open(&path)?;
    reader.execute_batch("BEGIN; SELECT count(*) FROM messages;")?;
    super::checkpoint_round(
        &checkpoints,
        4096,
        &writer.backlog,
        &mut log_file,
        512 << 10,
    );
    assert!(
        writer.backlog.restart.load(Ordering::SeqCst),
        "a restart is asked for"
    );
    SqliteTx::new(&other_writer).store_message(&Outgoing::new("bob", 1, b"x"), "alice")?;
    reader.execute_batch("COMMIT")?;
    batch(&mut writer, 1000)?;
    let after = super::checkpoint(&checkpoints, "PASSIVE")?.1;
    assert!(
        after < 20,
        "the log started over and holds only the last batch: {after} frames"
    );
    assert_eq!(
        message_count(&other_writer)?,
        152,
        "nothing was lost on the way"
    );
    Ok(())
}

#[test]
fn a_writer_counts_the_database_shared_while_another_process_commits_between_its_batches(
) -> Result<()> {
    let (_dir, path) = fresh()?;
    let (mut writer, _) = super::writer_conn(&path, &Options::default())?;
    let (mut other, _) = super::writer_conn(&path, &Options::default())?;
    let mut id = 0;
    let mut batch = |writer: &mut WriterConn| -> Result<bool> {
        id += 1;
        writer.begin()?;
        let shared = writer.shared();
        writer.run(true, &mut |tx| {
            tx.store_message(&Outgoing::new("alice", id, b"x"), "bob")
                .is_ok()
        })?;
        writer.commit()?;
        Ok(shared)
    };
    users(&mut SqliteTx::new(&open(&path)?), &["alice", "bob"])?;
    // Its first batch only learns where the count stands; then it commits alone.
    batch(&mut writer)?;
    assert!(!batch(&mut writer)?, "alone, after its first batch");
    assert!(!batch(&mut writer)?, "its own commits do not count");
    // Another writer on the file commits between two of its batches.
    batch(&mut other)?;
    assert!(
        batch(&mut writer)?,
        "another process committed since its last batch"
    );
    assert!(batch(&mut writer)?, "shared for a while after");
    std::thread::sleep(super::SHARED_FOR + Duration::from_millis(20));
    assert!(
        !batch(&mut writer)?,
        "alone again once the other has been quiet"
    );
    assert_eq!(message_count(&open(&path)?)?, 7);
    Ok(())
}

fn message_count(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row("SELECT count(*) FROM messages", [], |r| r.get(0))?)
}

/// The real writer connection, except that `begin` fails while `fail_begin` is set, and every
/// job that runs is counted.
struct FailingBegin {
    inner: WriterConn,
    fail_begin: Arc<std::sync::atomic::AtomicBool>,
    ran: Arc<AtomicUsize>,
}

impl Batch for FailingBegin {
    fn begin(&mut self) -> Result<()> {
        if self.fail_begin.load(Ordering::SeqCst) {
            return Err(Error::Commit("database is locked".into()));
        }
        self.inner.begin()
    }
    fn commit(&mut self) -> Result<()> {
        self.inner.commit()
    }
    fn rollback(&mut self) {
        self.inner.rollback()
    }
    fn run(&mut self, guarded: bool, work: &mut dyn FnMut(&mut dyn Tx) -> bool) -> Result<()> {
        self.ran.fetch_add(1, Ordering::SeqCst);
        self.inner.run(guarded, work)
    }
}

#[test]
fn a_batch_that_cannot_begin_runs_none_of_its_jobs() -> Result<()> {
    let (_dir, path) = fresh()?;
    let (inner, _) = super::writer_conn(&path, &Options::default())?;
    let fail_begin = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let ran = Arc::new(AtomicUsize::new(0));
    let writer = Writer::start(
        FailingBegin {
            inner,
            fail_begin: Arc::clone(&fail_begin),
            ran: Arc::clone(&ran),
        },
        None,
    )?;
    let failed = writer.call(|tx| tx.create_user("alice", "h", &keys()));
    assert!(
        matches!(&failed, Err(Error::Commit(m)) if m.contains("cannot begin")),
        "{failed:?}"
    );
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0,
        "no job ran outside a transaction"
    );
    let conn = open(&path)?;
    assert!(
        !SqliteTx::new(&conn).user_exists("alice")?,
        "nothing was written"
    );
    // Once the transaction can begin again, work goes through.
    fail_begin.store(false, Ordering::SeqCst);
    assert!(writer.call(|tx| tx.create_user("alice", "h", &keys()))?);
    assert!(SqliteTx::new(&conn).user_exists("alice")?);
    Ok(())
}

#[test]
fn a_write_lock_held_elsewhere_fails_work_after_the_busy_timeout() -> Result<()> {
    let (_dir, path) = fresh()?;
    let options = Options {
        busy_timeout: Duration::from_millis(200),
        ..Options::default()
    };
    let store = Store::open_with(&path.clone().into(), &options)?;
    store.call(|tx| users(tx, &["alice"]))?;
    let other = Connection::open(&path)?;
    other.execute_batch("BEGIN IMMEDIATE")?;
    let started = std::time::Instant::now();
    let failed = store.call(|tx| users(tx, &["bob"]));
    assert!(
        matches!(&failed, Err(Error::Refused { code: crate::error::ErrorCode::Unavailable, message })
            if message.starts_with("the database is busy")),
        "{failed:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "bounded wait");
    other.execute_batch("COMMIT")?;
    assert!(!store.read(|tx| tx.user_exists("bob"))?);
    store.call(|tx| users(tx, &["bob"]))?;
    assert!(store.read(|tx| tx.user_exists("bob"))?);
    Ok(())
}

/// A group of `admin` and `members`, keyed at epoch 1.
fn group_of(tx: &mut dyn Tx, admin: &str, members: &[&str]) -> Result<()> {
    assert!(tx.create_group("team", admin)?);
    let mut all = vec![admin];
    for m in members {
        tx.add_member("team", m)?;
        all.push(m);
    }
    tx.put_keys("team", 1, &wrapped(&all), admin)
}

fn wrapped(names: &[&str]) -> Vec<WrappedKey> {
    names
        .iter()
        .map(|m| WrappedKey {
            member: m.to_string(),
            wrapped: b"k1".to_vec(),
        })
        .collect()
}

fn ids_for(tx: &mut dyn Tx, user: &str) -> Result<Vec<i64>> {
    Ok(tx.queued(user, 0, 100)?.iter().map(|m| m.id).collect())
}

#[test]
fn a_group_is_read_with_its_members_in_order_and_its_keys() -> Result<()> {
    let (_dir, path) = fresh()?;
    let conn = open(&path)?;
    let tx = &mut SqliteTx::new(&conn);
    users(tx, &["alice", "bob", "carol"])?;
    assert!(tx.create_group("team", "alice")?);
    assert!(!tx.create_group("team", "bob")?, "the name is taken");
    let g = tx.group("team")?.expect("exists");
    assert_eq!((g.admin.as_str(), g.epoch, g.keyed), ("alice", 1, false));
    tx.add_member("team", "carol")?;
    tx.add_member("team", "bob")?;
    tx.put_keys("team", 1, &wrapped(&["alice", "carol", "bob"]), "alice")?;
    let g = tx.group("team")?.expect("exists");
    assert_eq!(
        g.members,
        ["alice", "carol", "bob"],
        "longest-standing first"
    );
    assert!(g.keyed);
    assert_eq!(
        tx.group_key("team", 1, "bob")?,
        Some((b"k1".to_vec(), "alice".to_string()))
    );
    assert_eq!(tx.group_key("team", 2, "bob")?, None);
    tx.set_group("team", "carol", 2)?;
    let g = tx.group("team")?.expect("exists");
    assert_eq!((g.admin.as_str(), g.epoch, g.keyed), ("carol", 2, false));
    assert_eq!(tx.user_groups("bob")?, ["team"]);
    tx.delete_group("team")?;
    assert_eq!(tx.group("team")?, None);
    assert!(tx.user_groups("bob")?.is_empty());
    Ok(())
}

#[test]
fn a_group_message_is_stored_once_and_removed_when_every_member_passed_it() -> Result<()> {
    let (_dir, path) = fresh()?;
    let conn = open(&path)?;
    let tx = &mut SqliteTx::new(&conn);
    users(tx, &["alice", "bob", "carol"])?;
    group_of(tx, "alice", &["bob", "carol"])?;
    tx.add_presence(7, 1, "bob", b"t")?;
    tx.add_presence(7, 2, "alice", b"t")?;
    let m = tx.store_group_message(&Outgoing::new("alice", 1, b"hi"), "team")?;
    assert_eq!(m.online_at, [(7, "bob".to_string())], "not the sender");
    let count = |sql: &str| -> Result<i64> { Ok(conn.query_row(sql, [], |r| r.get(0))?) };
    assert_eq!(count("SELECT count(*) FROM messages")?, 1);
    let tx = &mut SqliteTx::new(&conn);
    assert_eq!(
        ids_for(tx, "alice")?,
        Vec::<i64>::new(),
        "not to its sender"
    );
    assert_eq!(ids_for(tx, "bob")?, [m.envelope.id]);
    assert_eq!(tx.ack("alice", &[m.envelope.id])?, 0, "not alice's to ack");
    assert_eq!(tx.ack("bob", &[m.envelope.id])?, 1);
    assert_eq!(ids_for(tx, "bob")?, Vec::<i64>::new());
    assert_eq!(
        count("SELECT count(*) FROM messages")?,
        1,
        "carol still needs it"
    );
    let tx = &mut SqliteTx::new(&conn);
    assert_eq!(tx.ack("carol", &[m.envelope.id])?, 1);
    assert_eq!(count("SELECT count(*) FROM messages")?, 0);
    // The copy of a re-send is found among delivered messages.
    let resend = Outgoing {
        resend_after: Some(m.envelope.id - 1),
        ..Outgoing::new("alice", 1, b"hi")
    };
    let tx = &mut SqliteTx::new(&conn);
    let copy = tx.stored_group_copy(&resend, "team")?.expect("delivered");
    assert_eq!(copy.envelope.id, m.envelope.id);
    assert!(tx
        .stored_group_copy(&Outgoing::new("alice", 2, b"new"), "team")?
        .is_none());
    Ok(())
}

#[test]
fn removing_a_member_drops_what_only_they_still_needed() -> Result<()> {
    let (_dir, path) = fresh()?;
    let conn = open(&path)?;
    let tx = &mut SqliteTx::new(&conn);
    users(tx, &["alice", "bob", "carol"])?;
    group_of(tx, "alice", &["bob", "carol"])?;
    let m = tx.store_group_message(&Outgoing::new("alice", 1, b"hi"), "team")?;
    tx.ack("bob", &[m.envelope.id])?;
    assert_eq!(ids_for(tx, "carol")?, [m.envelope.id]);
    tx.remove_member("team", "carol")?;
    let left: i64 = conn.query_row("SELECT count(*) FROM messages", [], |r| r.get(0))?;
    assert_eq!(left, 0, "nobody left needs it");
    Ok(())
}

/// The ids of `n` group messages from alice to `team`.
fn alice_sends_to_team(tx: &mut SqliteTx<'_>, n: u64) -> Result<Vec<i64>> {
    (1..=n)
        .map(|i| {
            Ok(tx
                .store_group_message(&Outgoing::new("alice", i, b"m"), "team")?
                .envelope
                .id)
        })
        .collect()
}

#[test]
fn out_of_order_group_acks_never_skip_a_message() -> Result<()> {
    let (_dir, path) = fresh()?;
    let conn = open(&path)?;
    let tx = &mut SqliteTx::new(&conn);
    users(tx, &["alice", "bob", "carol"])?;
    group_of(tx, "alice", &["bob", "carol"])?;
    let ids = alice_sends_to_team(tx, 4)?;
    // Bob acknowledges the 3rd and 4th before the 1st and 2nd arrive.
    assert_eq!(tx.ack("bob", &[ids[2], ids[3]])?, 2);
    assert_eq!(
        ids_for(tx, "bob")?,
        [ids[0], ids[1]],
        "the gap is still queued"
    );
    assert_eq!(tx.ack("bob", &[ids[0]])?, 1);
    assert_eq!(ids_for(tx, "bob")?, [ids[1]]);
    assert_eq!(tx.ack("bob", &[ids[1]])?, 1);
    assert_eq!(ids_for(tx, "bob")?, Vec::<i64>::new());
    let position: i64 =
        conn.query_row("SELECT position FROM members WHERE user = 'bob'", [], |r| {
            r.get(0)
        })?;
    assert_eq!(position, ids[3], "the position closed over the gap");
    let pending: i64 = conn.query_row("SELECT count(*) FROM group_acks", [], |r| r.get(0))?;
    assert_eq!(pending, 0);
    // A repeated acknowledgement is harmless.
    assert_eq!(SqliteTx::new(&conn).ack("bob", &[ids[2]])?, 0);
    Ok(())
}

#[test]
fn one_batch_of_group_acks_in_any_order_walks_as_far_as_it_reaches() -> Result<()> {
    let (_dir, path) = fresh()?;
    let conn = open(&path)?;
    let tx = &mut SqliteTx::new(&conn);
    users(tx, &["alice", "bob", "carol", "dave"])?;
    group_of(tx, "alice", &["bob", "carol"])?;
    let ids = alice_sends_to_team(tx, 5)?;
    let own = tx
        .store_group_message(&Outgoing::new("bob", 1, b"mine"), "team")?
        .envelope
        .id;
    let position = |user: &str| -> Result<i64> {
        Ok(conn.query_row(
            "SELECT position FROM members WHERE user = ?1",
            [user],
            |r| r.get(0),
        )?)
    };
    let waiting = |user: &str| -> Result<Vec<i64>> {
        Ok(conn
            .prepare("SELECT msg_id FROM group_acks WHERE user = ?1 ORDER BY msg_id")?
            .query_map([user], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?)
    };
    // Not a member, not a recipient: nothing counts, nothing moves.
    let direct = tx.store_message(&Outgoing::new("bob", 2, b"to carol"), "carol")?;
    assert_eq!(tx.ack("dave", &[ids[0], direct.envelope.id])?, 0);
    assert_eq!(tx.ack("carol", &[direct.envelope.id])?, 1, "hers");
    // Out of order, a repeat, bob's own message and an id that is nobody's: three count.
    let batch = [ids[3], ids[0], ids[0], ids[1], own, own + 1000];
    assert_eq!(tx.ack("bob", &batch)?, 3);
    assert_eq!(position("bob")?, ids[1], "up to the gap at the third");
    assert_eq!(waiting("bob")?, [ids[3]], "the fourth waits for the gap");
    assert_eq!(ids_for(tx, "bob")?, [ids[2], ids[4]]);
    // The message in the gap and the one that waited disappear (say, purged by an
    // operator): the walk passes both, and forgets the acknowledgement of the gone one.
    conn.execute(
        "DELETE FROM messages WHERE id IN (?1, ?2)",
        [ids[2], ids[3]],
    )?;
    assert_eq!(tx.ack("bob", &[ids[4]])?, 1);
    assert_eq!(
        position("bob")?,
        ids[4],
        "over the gone message and what waited"
    );
    assert!(waiting("bob")?.is_empty());
    // Nothing is removed while someone still needs it; once everyone is past, it all goes.
    let stored: i64 = conn.query_row("SELECT count(*) FROM messages", [], |r| r.get(0))?;
    assert_eq!(stored, 4, "three of alice's and bob's own");
    let mut reversed = vec![own, ids[4], ids[1], ids[0]];
    assert_eq!(tx.ack("carol", &reversed)?, 4);
    assert_eq!(position("carol")?, own);
    let stored: i64 = conn.query_row("SELECT count(*) FROM messages", [], |r| r.get(0))?;
    assert_eq!(stored, 1, "bob's own, which alice has not acknowledged");
    assert_eq!(tx.ack("alice", &[own])?, 1);
    let stored: i64 = conn.query_row("SELECT count(*) FROM messages", [], |r| r.get(0))?;
    assert_eq!(stored, 0, "everyone passed everything");
    reversed.reverse();
    assert_eq!(tx.ack("carol", &reversed)?, 0, "a repeat counts nothing");
    Ok(())
}

#[test]
fn sqlite_is_built_with_the_project_options() -> Result<()> {
    let conn = Connection::open_in_memory()?;
    let options: Vec<String> = conn
        .prepare("PRAGMA compile_options")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for wanted in ["DEFAULT_MEMSTATUS=0", "THREADSAFE=2", "TEMP_STORE=3"] {
        assert!(
            options.iter().any(|o| o == wanted),
            "{wanted} missing from {options:?} (see .cargo/config.toml)"
        );
    }
    Ok(())
}

#[test]
fn a_message_delivered_and_removed_is_not_stored_again_by_a_resend() -> Result<()> {
    let (_dir, path) = fresh()?;
    let conn = open(&path)?;
    let tx = &mut SqliteTx::new(&conn);
    users(tx, &["alice", "bob"])?;
    let before = tx.newest_message_id()?;
    let first = tx.store_message(&Outgoing::new("alice", 7, b"hi"), "bob")?;
    assert_eq!(tx.ack("bob", &[first.envelope.id])?, 1);
    // The sender never saw `Stored` (its server died) and sends again.
    let resend = |client_id, body| Outgoing {
        resend_after: Some(before),
        ..Outgoing::new("alice", client_id, body)
    };
    let again = tx.store_message(&resend(7, b"hi"), "bob")?;
    assert_eq!(again.envelope.id, first.envelope.id, "the same message");
    assert!(again.online_at.is_empty(), "not routed again");
    assert!(tx.queued("bob", 0, 10)?.is_empty(), "not queued again");
    // A re-send whose original was never stored is stored now.
    let new = tx.store_message(&resend(8, b"ho"), "bob")?;
    assert!(new.envelope.id > first.envelope.id);
    // Delivery records are cut off by id, a chunk at a time.
    assert_eq!(tx.forget_deliveries(first.envelope.id, 0)?, 0);
    assert_eq!(tx.forget_deliveries(first.envelope.id - 1, 10)?, 0);
    assert_eq!(tx.forget_deliveries(first.envelope.id, 10)?, 1);
    let kept: i64 = conn.query_row("SELECT count(*) FROM delivered", [], |r| r.get(0))?;
    assert_eq!(kept, 0);
    Ok(())
}

#[test]
fn uploads_are_per_connection_and_complete_only_with_every_chunk() -> Result<()> {
    let (_dir, path) = fresh()?;
    let conn = open(&path)?;
    let tx = &mut SqliteTx::new(&conn);
    users(tx, &["alice", "bob"])?;
    let upload = tx.begin_upload("alice", 1, 10, 5, 2, 1)?;
    assert!(
        tx.begin_upload("alice", 1, 10, 5, 2, 1).is_err(),
        "one unfinished upload per connection here"
    );
    tx.store_chunk("alice", upload, 0, b"c0")?;
    assert!(
        tx.store_chunk("bob", upload, 1, b"c1").is_err(),
        "not bob's"
    );
    assert!(
        tx.store_chunk("alice", upload, 2, b"c2").is_err(),
        "past the end"
    );
    let offer = Outgoing {
        file: Some(upload),
        ..Outgoing::new("alice", 1, b"offer")
    };
    assert!(
        tx.store_message(&offer, "bob").is_err(),
        "an upload missing a chunk cannot be offered"
    );
    tx.store_chunk("alice", upload, 1, b"c1")?;
    let m = tx.store_message(&offer, "bob")?;
    assert_eq!(tx.file_chunk("bob", m.envelope.id, 1)?, b"c1");
    assert!(
        tx.file_chunk("alice", m.envelope.id, 1).is_err(),
        "not for alice"
    );
    assert_eq!(tx.drop_uploads(1, Some(10))?, 0, "a finished upload stays");
    tx.ack("bob", &[m.envelope.id])?;
    let files: i64 = conn.query_row("SELECT count(*) FROM files", [], |r| r.get(0))?;
    assert_eq!(files, 0, "the file went with its message");
    Ok(())
}

#[test]
fn many_openers_of_a_new_file_all_succeed() -> Result<()> {
    // A balancer and servers start together on a file that does not exist yet.
    for _ in 0..20 {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("chat.db");
        let barrier = Arc::new(std::sync::Barrier::new(6));
        let openers: Vec<_> = (0..6)
            .map(|_| {
                let (path, barrier) = (path.clone(), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait();
                    open(&path).and_then(|c| SqliteTx::new(&c).newest_message_id())
                })
            })
            .collect();
        for t in openers {
            assert_eq!(t.join().expect("no panic")?, 0);
        }
    }
    Ok(())
}

#[test]
fn a_look_over_the_queue_finds_the_heavy_queues_and_senders() -> Result<()> {
    let (_dir, path) = fresh()?;
    let conn = open(&path)?;
    let tx = &mut SqliteTx::new(&conn);
    users(tx, &["alice", "bob", "carol"])?;
    for i in 0..3 {
        tx.store_message(&Outgoing::new("alice", i, b"xx"), "bob")?;
    }
    tx.store_message(&Outgoing::new("carol", 1, b"x"), "bob")?;
    tx.store_message(&Outgoing::new("bob", 1, &[0u8; 100]), "carol")?;
    let keys = |v: Vec<(String, crate::db::Usage)>| -> Vec<String> {
        let mut k: Vec<String> = v.into_iter().map(|(k, _)| k).collect();
        k.sort();
        k
    };
    assert_eq!(keys(tx.heavy_queues(3, 1000)?), ["bob"]);
    assert_eq!(
        keys(tx.heavy_queues(3, 100)?),
        ["bob", "carol"],
        "by bytes too"
    );
    assert_eq!(keys(tx.heavy_senders(2, 1000)?), ["alice bob"]);
    assert_eq!(tx.heavy_queues(5, 1000)?, []);
    Ok(())
}

#[test]
fn queues_count_what_they_hold_through_stores_acks_and_deletions() -> Result<()> {
    let (_dir, path) = fresh()?;
    let conn = open(&path)?;
    let tx = &mut SqliteTx::new(&conn);
    users(tx, &["alice", "bob", "carol"])?;
    let a1 = tx.store_message(&Outgoing::new("alice", 1, b"12345"), "bob")?;
    tx.store_message(&Outgoing::new("alice", 2, b"123"), "bob")?;
    tx.store_message(&Outgoing::new("carol", 1, b"1"), "bob")?;
    let used = |m, b| crate::db::Usage {
        messages: m,
        bytes: b,
    };
    assert_eq!(tx.queue_usage("bob")?, used(3, 9));
    assert_eq!(tx.pair_usage("alice", "bob")?, used(2, 8));
    assert_eq!(tx.pair_usage("carol", "bob")?, used(1, 1));
    assert_eq!(tx.queue_usage("alice")?, used(0, 0), "nothing for alice");
    // A re-send is the same message: counted once.
    tx.store_message(&Outgoing::new("alice", 1, b"12345"), "bob")?;
    assert_eq!(tx.queue_usage("bob")?, used(3, 9));
    tx.ack("bob", &[a1.envelope.id])?;
    assert_eq!(tx.queue_usage("bob")?, used(2, 4));
    assert_eq!(tx.pair_usage("alice", "bob")?, used(1, 3));
    // Group messages count for the group, and go with it.
    group_of(tx, "alice", &["bob"])?;
    tx.store_group_message(&Outgoing::new("alice", 9, b"hello"), "team")?;
    assert_eq!(tx.queue_usage("g:team")?, used(1, 5));
    tx.delete_group("team")?;
    assert_eq!(tx.queue_usage("g:team")?, used(0, 0));
    Ok(())
}

#[test]
fn messages_past_their_lifetime_are_deleted_oldest_first() -> Result<()> {
    let (_dir, path) = fresh()?;
    let conn = open(&path)?;
    let tx = &mut SqliteTx::new(&conn);
    users(tx, &["alice", "bob"])?;
    let mut ids = Vec::new();
    for i in 0..10u64 {
        ids.push(
            tx.store_message(&Outgoing::new("alice", i, b"x"), "bob")?
                .envelope
                .id,
        );
    }
    // The first six were stored long ago.
    conn.execute(
        "UPDATE messages SET sent_at = sent_at - 86400000 * 40 WHERE id <= ?1",
        [ids[5]],
    )?;
    let tx = &mut SqliteTx::new(&conn);
    let cutoff = now_ms() - 86_400_000 * 30;
    assert_eq!(tx.expire_messages(cutoff, 4)?, 4, "a batch at a time");
    assert_eq!(tx.expire_messages(cutoff, 100)?, 2);
    assert_eq!(tx.expire_messages(cutoff, 100)?, 0);
    assert_eq!(ids_for(tx, "bob")?, ids[6..]);
    assert_eq!(tx.queue_usage("bob")?.messages, 4);
    assert_eq!(tx.pair_usage("alice", "bob")?.messages, 4);
    assert_eq!(tx.expire_messages(now_ms() + 1, 100)?, 4);
    assert_eq!(tx.queue_usage("bob")?.messages, 0);
    Ok(())
}

#[test]
fn merged_sends_and_acks_answer_as_one_by_one() -> Result<()> {
    let (_dir, path) = fresh()?;
    let store = Store::open(&path)?;
    crate::db::merged_tests::merged_sends_and_acks_answer_as_one_by_one(&store)
}

#[test]
fn stores_read_before_a_freeze_are_refused() -> Result<()> {
    let (_dir, path) = fresh()?;
    let store = Store::open(&path)?;
    crate::db::merged_tests::stores_read_before_a_freeze_are_refused(&store)
}

#[test]
fn merged_group_messages_answer_as_one_by_one() -> Result<()> {
    let (_dir, path) = fresh()?;
    let store = Store::open(&path)?;
    let checked = crate::db::merged_tests::merged_group_messages_answer_as_one_by_one(&store)?;
    assert_eq!(
        checked, 6,
        "the two plain messages stored by the merged call, the rest checked"
    );
    Ok(())
}
