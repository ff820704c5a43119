//! Files and images, as the client sends and receives them.
//!
//! A file is encrypted under its own random key, in chunks of [`FILE_CHUNK`] bytes, uploaded
//! first and then offered by an ordinary (end-to-end encrypted) message whose body carries the
//! key, the name, the size and a SHA-256 of the whole file:
//!
//! ```text
//! sender    FileBegin { size, chunks }                       → Upload { upload }
//!           FileChunk { upload, i, seal(key, aad(i), data) }  → Done       for i in 0..chunks
//!           Send / GroupSend { body = FileOffer, file: upload } → Stored
//! receiver  Deliver { msg } → FileOffer
//!           FileGet { msg_id, i } → FileData → open, hash, append to a hidden temporary file
//!           SHA-256 checked, then linked to downloads/NAME (never overwriting), then Ack
//! aad(i) = "fastchat/file/v1" || i (8, BE) || chunks (8, BE)
//! ```
//!
//! Neither side holds more than a chunk or two in memory. An upload that is never offered is
//! deleted by the server when its connection ends; a download that fails leaves no file behind
//! and its message stays queued, so the next `recv` tries again.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use openssl::sha::Sha256;

use super::e2e::{E2e, FileOffer, Plain};
use super::Client;
use crate::crypto::{self, PairKey};
use crate::error::{Error, ErrorCode, Result};
use crate::net::{chunk_count, Envelope, FILE_CHUNK};

/// Where a file goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// To one user.
    User(&'a str),
    /// To every other member of a group.
    Group(&'a str),
}

/// How many times an upload starts over after its server was lost mid-way.
const UPLOAD_TRIES: usize = 3;

/// The associated data of chunk `index` of `chunks`.
fn chunk_aad(index: u64, chunks: u64) -> [u8; 32] {
    let mut a = [0u8; 32];
    a[..16].copy_from_slice(b"fastchat/file/v1");
    a[16..24].copy_from_slice(&index.to_be_bytes());
    a[24..].copy_from_slice(&chunks.to_be_bytes());
    a
}

/// Plaintext length of chunk `index` of a file of `size` bytes.
fn chunk_len(size: u64, index: u64) -> usize {
    (size - index * FILE_CHUNK as u64).min(FILE_CHUNK as u64) as usize
}

/// Sends the file at `path` (its name is the last component of the path); returns the stored
/// message id. A file over the server's limit is refused before anything is uploaded.
pub fn send_file(client: &Client, e2e: &mut E2e, target: Target<'_>, path: &Path) -> Result<i64> {
    check_target(client, target)?;
    let uploaded = upload_file(client, path, &mut |_| {})?;
    offer(client, e2e, target, uploaded)
}

/// Sends `size` bytes read from what `open` opens (called again if the upload starts over),
/// under the name `name`; returns the stored message id.
pub fn send_from<R: Read>(
    client: &Client,
    e2e: &mut E2e,
    target: Target<'_>,
    name: &str,
    size: u64,
    open: impl FnMut() -> Result<R>,
) -> Result<i64> {
    check_target(client, target)?;
    let uploaded = upload_from(client, name, size, open, &mut |_| {})?;
    offer(client, e2e, target, uploaded)
}

/// Refuses, before anything is uploaded, a file that could not be offered: one to ourselves.
pub fn check_target(client: &Client, target: Target<'_>) -> Result<()> {
    match target {
        Target::User(to) if to == client.user() => {
            Err(Error::Invalid(crate::net::TO_YOURSELF.into()))
        }
        _ => Ok(()),
    }
}

/// A file uploaded (encrypted under a key of its own) and not offered yet.
pub struct Uploaded {
    /// The upload's id on the server.
    pub upload: i64,
    /// What the recipients need to fetch and check it: name, size, SHA-256, key.
    pub offer: FileOffer,
}

/// Uploads the file at `path`, calling `progress` with the bytes sent so far after each
/// chunk. Needs no end-to-end state: the chat uploads in the background while messages are
/// opened and printed.
pub fn upload_file(
    client: &Client,
    path: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<Uploaded> {
    let meta = fs::metadata(path)
        .map_err(|e| Error::Invalid(format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(Error::Invalid(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let open = || {
        File::open(path).map_err(|e| Error::Invalid(format!("cannot read {}: {e}", path.display())))
    };
    upload_from(client, &name, meta.len(), open, progress)
}

/// Uploads `size` bytes read from what `open` opens (called again if the upload starts over
/// on another server), under the name `name`.
pub fn upload_from<R: Read>(
    client: &Client,
    name: &str,
    size: u64,
    mut open: impl FnMut() -> Result<R>,
    progress: &mut dyn FnMut(u64),
) -> Result<Uploaded> {
    let limit = client.max_file();
    if size > limit {
        return Err(Error::Invalid(format!(
            "{name} is {}, over the server's limit of {}: nothing was sent",
            human_size(size),
            human_size(limit)
        )));
    }
    let mut tries = 0;
    loop {
        tries += 1;
        match upload(client, name, size, open()?, progress) {
            Ok((upload, offer)) => return Ok(Uploaded { upload, offer }),
            // The server was lost and the upload with it: start over on the new one.
            Err(e) if tries < UPLOAD_TRIES && upload_lost(&e) => {
                log::info!("upload of {name} interrupted ({e}); starting over");
            }
            Err(e) => return Err(e),
        }
    }
}

/// Offers an uploaded file to `target`: the message holding its key; returns its id.
pub fn offer(client: &Client, e2e: &mut E2e, target: Target<'_>, file: Uploaded) -> Result<i64> {
    let plain = Plain::File(file.offer);
    match target {
        Target::User(to) => {
            let client_id = crypto::random_u64()?;
            let body = e2e.seal_direct(to, client_id, &plain)?;
            client.send(to, client_id, &body, Some(file.upload))
        }
        Target::Group(group) => e2e.group_send_with(client, group, &plain, Some(file.upload)),
    }
}

/// Whether an upload failed because its server (and so the upload) went away.
fn upload_lost(e: &Error) -> bool {
    e.is_disconnect()
        || matches!(
            e,
            Error::Refused {
                code: ErrorCode::BadRequest,
                ..
            }
        )
}

/// Encrypts and uploads; returns the upload id and the offer to send.
fn upload(
    client: &Client,
    name: &str,
    size: u64,
    mut reader: impl Read,
    progress: &mut dyn FnMut(u64),
) -> Result<(i64, FileOffer)> {
    let key = PairKey::random()?;
    let chunks = chunk_count(size);
    let upload = client.file_begin(size, chunks)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; FILE_CHUNK];
    for index in 0..chunks {
        let want = chunk_len(size, index);
        let got = read_full(&mut reader, &mut buf[..want])?;
        if got != want {
            return Err(Error::Invalid(format!(
                "{name} shrank while it was being sent"
            )));
        }
        hasher.update(&buf[..want]);
        let data = key.seal(&chunk_aad(index, chunks), &buf[..want])?;
        client.file_chunk(upload, index, data)?;
        progress((index * FILE_CHUNK as u64 + want as u64).min(size));
    }
    if read_full(&mut reader, &mut buf[..1])? != 0 {
        return Err(Error::Invalid(format!(
            "{name} grew while it was being sent"
        )));
    }
    let offer = FileOffer {
        name: name.to_string(),
        size,
        sha256: hasher.finish().to_vec(),
        key: key.0.to_vec(),
    };
    Ok((upload, offer))
}

/// Reads until `buf` is full or the reader ends; returns how much was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Io(e)),
        }
    }
    Ok(filled)
}

/// Downloads, decrypts and checks the file `msg` offers, and saves it in `downloads` under its
/// name made safe, never overwriting; returns where it was saved. On any failure nothing is
/// left in `downloads`.
pub fn receive(
    client: &Client,
    msg: &Envelope,
    offer: &FileOffer,
    downloads: &Path,
) -> Result<PathBuf> {
    prepare_downloads(downloads)?;
    let partial = Partial::create(downloads)?;
    let key = PairKey(
        offer
            .key
            .as_slice()
            .try_into()
            .map_err(|_| Error::Integrity("file key of the wrong size".into()))?,
    );
    let chunks = chunk_count(offer.size);
    let mut hasher = Sha256::new();
    let mut out = io::BufWriter::new(&partial.file);
    for index in 0..chunks {
        let data = client.file_get(msg.id, index)?;
        let plain = key.open(&chunk_aad(index, chunks), &data).map_err(|_| {
            Error::Integrity(format!(
                "chunk {index} of {} failed authentication",
                offer.name
            ))
        })?;
        if plain.len() != chunk_len(offer.size, index) {
            return Err(Error::Integrity(format!(
                "chunk {index} of {} has the wrong length",
                offer.name
            )));
        }
        hasher.update(&plain);
        out.write_all(&plain)?;
    }
    out.flush()?;
    drop(out);
    if !openssl::memcmp::eq(&hasher.finish(), &offer.sha256) {
        return Err(Error::Integrity(format!(
            "{} does not match its SHA-256",
            offer.name
        )));
    }
    partial.file.sync_all()?;
    partial.place(&safe_name(&offer.name))
}

/// Creates the downloads folder (0700) and removes what interrupted downloads left behind.
fn prepare_downloads(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)
        .map_err(|e| Error::Local(format!("cannot create {}: {e}", dir.display())))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    for entry in fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix(".incoming-")
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        // A partial file of a process that is gone (killed mid-download).
        if !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// A download in progress: a hidden file in the downloads folder, removed unless placed.
struct Partial {
    path: PathBuf,
    file: File,
    dir: PathBuf,
    placed: bool,
}

impl Partial {
    fn create(dir: &Path) -> Result<Partial> {
        let name = format!(
            ".incoming-{}-{}.part",
            std::process::id(),
            crypto::random_u64()?
        );
        let path = dir.join(name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok(Partial {
            path,
            file,
            dir: dir.to_path_buf(),
            placed: false,
        })
    }

    /// Gives the finished file its name: `name`, else `stem (1).ext`, `stem (2).ext`, ... A hard
    /// link never replaces an existing file, so nothing is overwritten even in a race.
    fn place(mut self, name: &str) -> Result<PathBuf> {
        for n in 0..10_000 {
            let candidate = self.dir.join(numbered(name, n));
            match fs::hard_link(&self.path, &candidate) {
                Ok(()) => {
                    self.placed = true;
                    let _ = fs::remove_file(&self.path);
                    return Ok(candidate);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::Io(e)),
            }
        }
        Err(Error::Invalid(format!(
            "too many files named like {name} in {}",
            self.dir.display()
        )))
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.placed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// `name` for `n` = 0, else `stem (n).ext`.
fn numbered(name: &str, n: u32) -> String {
    if n == 0 {
        return name.to_string();
    }
    match name.rfind('.') {
        Some(dot) if dot > 0 => format!("{} ({n}){}", &name[..dot], &name[dot..]),
        _ => format!("{name} ({n})"),
    }
}

/// Longest file name kept, in bytes.
const MAX_NAME: usize = 200;

/// A sender's file name made safe to save: its last path component, with control and format
/// characters escaped (`invoice\u{202e}fdp.exe`, never a name that shows as another), without
/// leading dots (no hidden files, no `.` or `..`) or surrounding spaces, at most
/// `MAX_NAME` bytes (keeping the extension); `file` if nothing is left.
pub fn safe_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or("");
    let visible = super::text::one_line(last);
    let trimmed = visible.trim().trim_start_matches('.').trim();
    if trimmed.is_empty() {
        return "file".to_string();
    }
    if trimmed.len() <= MAX_NAME {
        return trimmed.to_string();
    }
    let ext = match trimmed.rfind('.') {
        Some(dot) if trimmed.len() - dot <= 16 => &trimmed[dot..],
        _ => "",
    };
    let mut stem_end = MAX_NAME - ext.len();
    while !trimmed.is_char_boundary(stem_end) {
        stem_end -= 1;
    }
    format!("{}{ext}", &trimmed[..stem_end])
}

pub use crate::units::human_size;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_made_safe() {
        for (given, safe) in [
            ("photo.png", "photo.png"),
            ("../../x", "x"),
            ("/etc/passwd", "passwd"),
            (".bashrc", "bashrc"),
            ("", "file"),
            ("..", "file"),
            ("a/..", "file"),
            ("...", "file"),
            ("dir\\evil.exe", "evil.exe"),
            ("  .hidden  ", "hidden"),
            ("bell\u{7}\nname.txt", "bell\\u{7}\\nname.txt"),
            ("invoice\u{202E}fdp.exe", "invoice\\u{202e}fdp.exe"),
            ("zero\u{200B}width.txt", "zero\\u{200b}width.txt"),
            ("héllo wörld.txt", "héllo wörld.txt"),
        ] {
            assert_eq!(safe_name(given), safe, "{given:?}");
        }
        let long = format!("{}.jpeg", "é".repeat(300));
        let s = safe_name(&long);
        assert!(s.len() <= MAX_NAME, "{}", s.len());
        assert!(s.ends_with("é.jpeg"), "{s}");
    }

    #[test]
    fn copies_are_numbered_before_the_extension() {
        assert_eq!(numbered("photo.png", 0), "photo.png");
        assert_eq!(numbered("photo.png", 1), "photo (1).png");
        assert_eq!(numbered("archive.tar.gz", 2), "archive.tar (2).gz");
        assert_eq!(numbered("README", 3), "README (3)");
    }

    #[test]
    fn chunk_lengths_cover_the_file_exactly() {
        let size = 2 * FILE_CHUNK as u64 + 5;
        assert_eq!(chunk_count(size), 3);
        let total: usize = (0..3).map(|i| chunk_len(size, i)).sum();
        assert_eq!(total as u64, size);
        assert_eq!(chunk_count(0), 0);
        assert_eq!(chunk_count(FILE_CHUNK as u64), 1);
    }

    #[test]
    fn a_chunk_opens_only_at_its_own_place() -> Result<()> {
        let key = PairKey::random()?;
        let sealed = key.seal(&chunk_aad(1, 3), b"middle")?;
        assert_eq!(key.open(&chunk_aad(1, 3), &sealed)?, b"middle");
        assert!(key.open(&chunk_aad(0, 3), &sealed).is_err(), "moved");
        assert!(
            key.open(&chunk_aad(1, 2), &sealed).is_err(),
            "truncated file"
        );
        Ok(())
    }

    #[test]
    fn a_partial_file_is_removed_unless_placed() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let p = Partial::create(dir.path())?;
        let path = p.path.clone();
        assert!(path.exists());
        drop(p);
        assert!(!path.exists());
        let p = Partial::create(dir.path())?;
        let first = p.place("a.txt")?;
        let p = Partial::create(dir.path())?;
        let second = p.place("a.txt")?;
        assert_eq!(first, dir.path().join("a.txt"));
        assert_eq!(second, dir.path().join("a (1).txt"));
        assert_eq!(
            fs::read_dir(dir.path())?.count(),
            2,
            "no partial files left"
        );
        Ok(())
    }
}
