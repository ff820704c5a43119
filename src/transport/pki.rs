//! The cluster's certificate authority: creating it, issuing a certificate to each member
//! (the balancer, each chat server), and reading them back.
//!
//! ```text
//! DIR/                 mode 0700, every file 0600
//!   ca.pem  ca.key     the cluster CA (Ed25519, self-signed; keep ca.key off the servers)
//!   NAME.pem NAME.key  one member: subject O=fastchat, OU=ROLE (balancer or server), CN=NAME
//! ```
//!
//! A member's role and name are in its certificate's subject, so a peer learns both from the
//! TLS handshake, signed by the CA: a chat server is whoever holds a `server` certificate, and
//! is known by its name.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::BigNum;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectKeyIdentifier,
};
use openssl::x509::{X509Builder, X509Name, X509NameBuilder, X509};

use crate::crypto;
use crate::error::{Error, Result};
use crate::names;

/// What a member of the cluster is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The balancer (the front door).
    Balancer,
    /// A chat server.
    Server,
}

impl Role {
    fn ou(self) -> &'static str {
        match self {
            Role::Balancer => "balancer",
            Role::Server => "server",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.ou())
    }
}

/// Who a certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Balancer or server.
    pub role: Role,
    /// Its name in the cluster (`balancer`, `server-1`, ...).
    pub name: String,
}

/// A member's certificate and private key, and the CA that signed it.
pub struct Identity {
    /// Who this is.
    pub member: Member,
    /// The certificate.
    pub cert: X509,
    /// Its private key.
    pub key: PKey<Private>,
    /// The cluster CA.
    pub ca: X509,
}

/// How long the CA is valid, in days.
const CA_DAYS: u32 = 3650;

/// How long a member certificate is valid, in days.
const MEMBER_DAYS: u32 = 825;

/// The CA's certificate file in a cluster folder.
pub fn ca_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

fn name(ou: &str, cn: &str) -> Result<X509Name> {
    let mut n = X509NameBuilder::new()?;
    n.append_entry_by_nid(Nid::ORGANIZATIONNAME, "fastchat")?;
    n.append_entry_by_nid(Nid::ORGANIZATIONALUNITNAME, ou)?;
    n.append_entry_by_nid(Nid::COMMONNAME, cn)?;
    Ok(n.build())
}

fn serial() -> Result<Asn1Integer> {
    let mut bytes = crypto::random_bytes(16)?;
    bytes[0] &= 0x7f; // positive
    Ok(BigNum::from_slice(&bytes)?.to_asn1_integer()?)
}

/// Writes `data` to a new file readable only by its owner; refuses to replace one.
fn write_new(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::Local(format!("cannot create {}: {e}", path.display())))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

/// Creates `dir` (0700) if needed; refuses a folder others can read.
fn private_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)
        .map_err(|e| Error::Local(format!("cannot create {}: {e}", dir.display())))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// Creates a cluster CA in `dir`, then a certificate for each member. Refuses if `dir` already
/// holds a CA (a second CA would silently split the cluster).
pub fn init(dir: &Path, members: &[Member]) -> Result<()> {
    if ca_path(dir).exists() || dir.join("ca.key").exists() {
        return Err(Error::Invalid(format!(
            "{} already holds a cluster CA; use it (fastchat-admin cert) or pick another folder",
            dir.display()
        )));
    }
    for m in members {
        names::validate("member", &m.name)?;
    }
    private_dir(dir)?;
    let key = PKey::generate_ed25519()?;
    let subject = name("ca", "fastchat cluster CA")?;
    let mut b = X509Builder::new()?;
    b.set_version(2)?;
    let (number, from, until) = (
        serial()?,
        Asn1Time::days_from_now(0)?,
        Asn1Time::days_from_now(CA_DAYS)?,
    );
    b.set_serial_number(&number)?;
    b.set_subject_name(&subject)?;
    b.set_issuer_name(&subject)?;
    b.set_pubkey(&key)?;
    b.set_not_before(&from)?;
    b.set_not_after(&until)?;
    b.append_extension(BasicConstraints::new().critical().ca().pathlen(0).build()?)?;
    b.append_extension(
        KeyUsage::new()
            .critical()
            .key_cert_sign()
            .crl_sign()
            .build()?,
    )?;
    let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None))?;
    b.append_extension(ski)?;
    b.sign(&key, MessageDigest::null())?;
    let ca = b.build();
    write_new(&dir.join("ca.key"), &key.private_key_to_pem_pkcs8()?)?;
    write_new(&ca_path(dir), &ca.to_pem()?)?;
    for m in members {
        issue(dir, m)?;
    }
    Ok(())
}

/// Issues a certificate for `member` with the CA in `dir`: `dir/NAME.pem` and `dir/NAME.key`.
/// Refuses to replace an existing one.
pub fn issue(dir: &Path, member: &Member) -> Result<PathBuf> {
    names::validate("member", &member.name)?;
    if member.name == "ca" {
        return Err(Error::InvalidName("member name ca is reserved".into()));
    }
    let ca = load_cert(&ca_path(dir))?;
    let ca_key = PKey::private_key_from_pem(&read(&dir.join("ca.key"))?)
        .map_err(|_| Error::Invalid(format!("{} is not a key", dir.join("ca.key").display())))?;
    let key = PKey::generate_ed25519()?;
    let mut b = X509Builder::new()?;
    b.set_version(2)?;
    let (number, subject) = (serial()?, name(member.role.ou(), &member.name)?);
    let (from, until) = (
        Asn1Time::days_from_now(0)?,
        Asn1Time::days_from_now(MEMBER_DAYS)?,
    );
    b.set_serial_number(&number)?;
    b.set_subject_name(&subject)?;
    b.set_issuer_name(ca.subject_name())?;
    b.set_pubkey(&key)?;
    b.set_not_before(&from)?;
    b.set_not_after(&until)?;
    b.append_extension(BasicConstraints::new().critical().build()?)?;
    b.append_extension(KeyUsage::new().critical().digital_signature().build()?)?;
    b.append_extension(
        ExtendedKeyUsage::new()
            .server_auth()
            .client_auth()
            .build()?,
    )?;
    let aki = AuthorityKeyIdentifier::new()
        .keyid(true)
        .build(&b.x509v3_context(Some(&ca), None))?;
    b.append_extension(aki)?;
    b.sign(&ca_key, MessageDigest::null())?;
    let cert = b.build();
    let pem = dir.join(format!("{}.pem", member.name));
    write_new(
        &dir.join(format!("{}.key", member.name)),
        &key.private_key_to_pem_pkcs8()?,
    )?;
    write_new(&pem, &cert.to_pem()?)?;
    Ok(pem)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| Error::Local(format!("cannot read {}: {e}", path.display())))
}

/// Reads a PEM certificate.
pub fn load_cert(path: &Path) -> Result<X509> {
    X509::from_pem(&read(path)?)
        .map_err(|_| Error::Invalid(format!("{} is not a PEM certificate", path.display())))
}

/// Reads member `name`'s certificate and key and the CA from a cluster folder, and checks that
/// the CA signed the certificate and that the key is its key.
pub fn load_identity(dir: &Path, name: &str) -> Result<Identity> {
    names::validate("member", name)?;
    let ca = load_cert(&ca_path(dir))?;
    let cert = load_cert(&dir.join(format!("{name}.pem")))?;
    let key_path = dir.join(format!("{name}.key"));
    let key = PKey::private_key_from_pem(&read(&key_path)?)
        .map_err(|_| Error::Invalid(format!("{} is not a private key", key_path.display())))?;
    if !cert.public_key()?.public_eq(&key) {
        return Err(Error::Invalid(format!(
            "{} is not the key of {name}.pem",
            key_path.display()
        )));
    }
    let ca_key = ca.public_key()?;
    if !cert.verify(&ca_key)? {
        return Err(Error::Invalid(format!(
            "{name}.pem in {} was not signed by its ca.pem",
            dir.display()
        )));
    }
    let member = member_of(&cert).filter(|m| m.name == name).ok_or_else(|| {
        Error::Invalid(format!(
            "{name}.pem is not the fastchat member certificate of {name}"
        ))
    })?;
    Ok(Identity {
        member,
        cert,
        key,
        ca,
    })
}

/// The role and name a member certificate states; `None` for any other certificate.
pub fn member_of(cert: &X509) -> Option<Member> {
    let entry = |nid: Nid| -> Option<String> {
        let e = cert.subject_name().entries_by_nid(nid).next()?;
        String::from_utf8(e.data().as_slice().to_vec()).ok()
    };
    let role = match entry(Nid::ORGANIZATIONALUNITNAME)?.as_str() {
        "balancer" => Role::Balancer,
        "server" => Role::Server,
        _ => return None,
    };
    let name = entry(Nid::COMMONNAME)?;
    names::validate("member", &name).ok()?;
    Some(Member { role, name })
}

/// A certificate's SHA-256 fingerprint, as `openssl x509 -fingerprint -sha256` prints it.
pub fn fingerprint(cert: &X509) -> Result<String> {
    let digest = cert.digest(MessageDigest::sha256())?;
    let hex: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
    Ok(format!("SHA256:{}", hex.join(":")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(name: &str) -> Member {
        Member {
            role: Role::Server,
            name: name.into(),
        }
    }

    #[test]
    fn a_cluster_folder_holds_a_ca_and_members_that_it_signed() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("tls");
        let balancer = Member {
            role: Role::Balancer,
            name: "balancer".into(),
        };
        init(&dir, &[balancer.clone(), server("server-1")])?;
        assert_eq!(
            fs::metadata(&dir)?.permissions().mode() & 0o777,
            0o700,
            "the folder is private"
        );
        for f in [
            "ca.pem",
            "ca.key",
            "balancer.pem",
            "balancer.key",
            "server-1.key",
        ] {
            assert_eq!(
                fs::metadata(dir.join(f))?.permissions().mode() & 0o777,
                0o600,
                "{f}"
            );
        }
        let id = load_identity(&dir, "server-1")?;
        assert_eq!(id.member, server("server-1"));
        assert_eq!(load_identity(&dir, "balancer")?.member, balancer);
        issue(&dir, &server("server-2"))?;
        assert!(issue(&dir, &server("server-2")).is_err(), "never replaced");
        assert!(init(&dir, &[]).is_err(), "one CA per folder");
        assert!(fingerprint(&id.ca)?.starts_with("SHA256:"));
        // A certificate of another CA does not pass as this cluster's.
        let other = tmp.path().join("other");
        init(&other, &[server("server-1")])?;
        fs::copy(other.join("server-1.pem"), dir.join("mallory.pem"))?;
        fs::copy(other.join("server-1.key"), dir.join("mallory.key"))?;
        let err = load_identity(&dir, "mallory").err().expect("refused");
        assert!(err.to_string().contains("not signed"), "{err}");
        Ok(())
    }
}
