//! The server's TLS material: the configured PEM files, or a self-signed development
//! certificate generated into the certs directory on first start and reused afterwards.

use std::path::{Path, PathBuf};

/// The dev certificate's file name in the certs directory.
pub const DEV_CERT: &str = "cert.pem";
/// The dev key's file name in the certs directory.
pub const DEV_KEY: &str = "key.pem";

/// Errors making the development certificate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevCertError {
    /// A file or the directory could not be written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate could not be generated.
    #[error("cannot generate a dev certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// Another process has been generating the certificate for too long.
    #[error(
        "another process is generating the dev certificate in {} (remove {} if none is)",
        dir.display(),
        lock.display()
    )]
    Busy {
        /// The certs directory.
        dir: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
}

/// The lock file a process holds while it generates the dev certificate.
const GENERATING: &str = ".generating";
/// How long a process waits for another one's dev certificate.
const WAIT_FOR_OTHER: std::time::Duration = std::time::Duration::from_secs(10);

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> DevCertError + '_ {
    move |source| DevCertError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Returns the paths of the dev certificate and key in `dir`, generating them if absent.
///
/// Several servers started together on one certs directory (a cluster's nodes on one
/// machine) share one certificate: the first takes a lock file and generates it, the others
/// wait for it, so no server ever loads one process's key with another's certificate.
pub fn ensure_dev_cert(dir: &Path) -> Result<(PathBuf, PathBuf), DevCertError> {
    let cert_path = dir.join(DEV_CERT);
    let key_path = dir.join(DEV_KEY);
    let ready = || cert_path.exists() && key_path.exists();
    if ready() {
        return Ok((cert_path, key_path));
    }
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let lock = dir.join(GENERATING);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&lock)
    {
        Ok(_) => {
            // Another process may have generated both and let go of the lock between the
            // first look and this one.
            let generated = if ready() {
                Ok(())
            } else {
                generate(&cert_path, &key_path)
            };
            let _ = std::fs::remove_file(&lock);
            generated?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // A lock older than the wait was left by a process that died while generating:
            // it is taken over (once).
            let abandoned = std::fs::metadata(&lock)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > WAIT_FOR_OTHER);
            if abandoned && std::fs::remove_file(&lock).is_ok() {
                return ensure_dev_cert(dir);
            }
            let started = std::time::Instant::now();
            while !ready() || lock.exists() {
                if started.elapsed() > WAIT_FOR_OTHER {
                    return Err(DevCertError::Busy {
                        dir: dir.to_owned(),
                        lock,
                    });
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        Err(e) => return Err(io_error(&lock)(e)),
    }
    Ok((cert_path, key_path))
}

/// Generates the certificate and key into their places.
fn generate(cert_path: &Path, key_path: &Path) -> Result<(), DevCertError> {
    let names = vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
    let generated = rcgen::generate_simple_self_signed(names)?;
    // Key first with tight permissions, certificate last: a half-finished run leaves no
    // certificate, so the next start generates both again.
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut key_file = options.open(key_path).map_err(io_error(key_path))?;
    std::io::Write::write_all(
        &mut key_file,
        generated.signing_key.serialize_pem().as_bytes(),
    )
    .map_err(io_error(key_path))?;
    std::fs::write(cert_path, generated.cert.pem()).map_err(io_error(cert_path))?;
    tracing::info!(path = %cert_path.display(), "generated a self-signed development certificate");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_starting_together_share_one_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let barrier = std::sync::Barrier::new(4);
        let seen: Vec<(String, String)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        let (cert, key) = ensure_dev_cert(dir.path()).expect("certificate");
                        (
                            std::fs::read_to_string(cert).expect("cert"),
                            std::fs::read_to_string(key).expect("key"),
                        )
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        assert!(
            seen.windows(2).all(|w| w[0] == w[1]),
            "one generation for all"
        );
        assert!(!dir.path().join(GENERATING).exists());
        // And the pair is one: TLS takes it.
        let chain = plover_quic::tls::load_certs(&dir.path().join(DEV_CERT)).expect("chain");
        let key = plover_quic::tls::load_key(&dir.path().join(DEV_KEY)).expect("key");
        plover_quic::tls::server_config(chain, key).expect("a matching pair");
    }

    #[test]
    fn a_lock_left_by_a_dead_process_is_taken_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lock = dir.path().join(GENERATING);
        let file = std::fs::File::create(&lock).expect("lock");
        let old = std::time::SystemTime::now() - 2 * WAIT_FOR_OTHER;
        file.set_modified(old).expect("age the lock");
        drop(file);
        ensure_dev_cert(dir.path()).expect("generated despite the old lock");
        assert!(dir.path().join(DEV_CERT).exists());
        assert!(!lock.exists());
    }
}
