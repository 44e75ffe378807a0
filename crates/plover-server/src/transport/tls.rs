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
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> DevCertError + '_ {
    move |source| DevCertError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Returns the paths of the dev certificate and key in `dir`, generating them if absent.
pub fn ensure_dev_cert(dir: &Path) -> Result<(PathBuf, PathBuf), DevCertError> {
    let cert_path = dir.join(DEV_CERT);
    let key_path = dir.join(DEV_KEY);
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let names = vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
    let generated = rcgen::generate_simple_self_signed(names)?;
    // Key first with tight permissions, certificate last: a half-finished run leaves no
    // certificate, so the next start generates both again.
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut key_file = options.open(&key_path).map_err(io_error(&key_path))?;
    std::io::Write::write_all(
        &mut key_file,
        generated.signing_key.serialize_pem().as_bytes(),
    )
    .map_err(io_error(&key_path))?;
    std::fs::write(&cert_path, generated.cert.pem()).map_err(io_error(&cert_path))?;
    tracing::info!(path = %cert_path.display(), "generated a self-signed development certificate");
    Ok((cert_path, key_path))
}
