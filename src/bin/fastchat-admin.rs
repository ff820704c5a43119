//! `fastchat-admin`: the operator's tool.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fastchat::transport::pki::{self, Member, Role};

/// Operator's tool for a fastchat cluster.
///
/// `init` creates the cluster's certificate authority and a certificate for the balancer and
/// each chat server; every link of the cluster is TLS with these, so only processes holding a
/// certificate of this CA can register as servers, link to each other, or be handed clients.
/// Keep ca.key off the servers once every certificate is made.
///
/// Exit codes: 0 done, 1 refused (the folder already holds a CA, a name is taken), 2 bad
/// arguments, 4 local trouble (cannot write the folder).
#[derive(Parser)]
#[command(
    version,
    after_help = "Examples:
  fastchat-admin init /tmp/fc/tls                  # CA, balancer, server-1..server-3
  fastchat-admin init /tmp/fc/tls --servers 5
  fastchat-admin cert /tmp/fc/tls --server server-6
  fastchat-admin fingerprint /tmp/fc/tls/ca.pem    # what clients pin on first contact"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a cluster CA in DIR (0700, files 0600) with certificates for the balancer and
    /// N chat servers (server-1 ... server-N).
    Init {
        /// The folder to create.
        dir: PathBuf,
        /// How many chat server certificates to make.
        #[arg(long, value_name = "N", default_value_t = 3)]
        servers: usize,
    },
    /// Issue one more certificate with the CA in DIR.
    Cert {
        /// The cluster folder (with ca.pem and ca.key).
        dir: PathBuf,
        /// A chat server's certificate, with this name.
        #[arg(
            long,
            value_name = "NAME",
            conflicts_with = "balancer",
            required_unless_present = "balancer"
        )]
        server: Option<String>,
        /// A balancer's certificate, with this name.
        #[arg(long, value_name = "NAME")]
        balancer: Option<String>,
    },
    /// Print the SHA-256 fingerprint of a certificate (what a client pins).
    Fingerprint {
        /// A PEM certificate, such as DIR/ca.pem.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    fastchat::startup::private_files();
    let result = match args.command {
        Command::Init { dir, servers } => init(&dir, servers),
        Command::Cert {
            dir,
            server,
            balancer,
        } => {
            let member = match (server, balancer) {
                (Some(name), _) => Member {
                    role: Role::Server,
                    name,
                },
                (None, Some(name)) => Member {
                    role: Role::Balancer,
                    name,
                },
                (None, None) => unreachable!("clap requires one"),
            };
            pki::issue(&dir, &member).map(|pem| {
                println!("made {} certificate {}", member.role, pem.display());
            })
        }
        Command::Fingerprint { file } => pki::load_cert(&file)
            .and_then(|c| pki::fingerprint(&c))
            .map(|f| println!("{f}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fastchat-admin: error: {e}");
            ExitCode::from(match e {
                fastchat::Error::Invalid(_) | fastchat::Error::InvalidName(_) => 1,
                e => e.exit_code() as u8,
            })
        }
    }
}

fn init(dir: &std::path::Path, servers: usize) -> fastchat::Result<()> {
    if servers > 1000 {
        return Err(fastchat::Error::Invalid(
            "--servers: at most 1000 at once".into(),
        ));
    }
    let mut members = vec![Member {
        role: Role::Balancer,
        name: "balancer".into(),
    }];
    members.extend((1..=servers).map(|i| Member {
        role: Role::Server,
        name: format!("server-{i}"),
    }));
    pki::init(dir, &members)?;
    let ca = pki::load_cert(&pki::ca_path(dir))?;
    println!("cluster CA {} in {}", pki::fingerprint(&ca)?, dir.display());
    println!("  balancer: --tls-dir {}", dir.display());
    for i in 1..=servers {
        println!(
            "  server-{i}: --tls-dir {} --name server-{i}",
            dir.display()
        );
    }
    println!(
        "  clients: --ca {} (or trust on first contact)",
        pki::ca_path(dir).display()
    );
    Ok(())
}
