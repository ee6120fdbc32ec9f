//! What can go wrong while preparing an image, in terms an operator can act on: every message
//! names the image (as written in the config) and what was wrong with it.

use std::io;
use std::path::{Path, PathBuf};

/// Why an image could not be prepared. Print with `{:#}` (anyhow) to see the OS error of
/// [`ImageError::Io`].
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference `{text}`: {reason}")]
    InvalidReference { text: String, reason: String },
    #[error("image {image}: {what} not found")]
    NotFound { image: String, what: String },
    #[error("image {image}: registry {registry} refused access ({detail}); check the credentials and that the repository exists")]
    AuthRefused { image: String, registry: String, detail: String },
    #[error("image {image}: cannot reach registry {registry}: {detail}")]
    RegistryUnreachable { image: String, registry: String, detail: String },
    #[error("image {image}: registry {registry} failed: {detail}")]
    Registry { image: String, registry: String, detail: String },
    #[error("image {image}: digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch { image: String, what: String, expected: String, actual: String },
    #[error("image {image}: unsupported media type `{media_type}` for {what}")]
    UnsupportedMediaType { image: String, what: String, media_type: String },
    #[error("image {image}: {path} is not an OCI image layout: {reason}")]
    NotAnOciLayout { image: String, path: PathBuf, reason: String },
    #[error("image {image}: {path} is not a docker-archive (`docker save`) tarball: {reason}")]
    NotADockerArchive { image: String, path: PathBuf, reason: String },
    #[error("image {image}: invalid image: {reason}")]
    InvalidImage { image: String, reason: String },
    #[error("image {image}: {layer} is corrupt: {detail}")]
    CorruptLayer { image: String, layer: String, detail: String },
    #[error("image {image}: {layer}: refusing entry `{entry}`: {reason}")]
    UnsafeLayerEntry { image: String, layer: String, entry: String, reason: String },
    #[error("image {image}: no space left on the device while writing {path}")]
    DiskFull { image: String, path: PathBuf },
    #[error("image {image}: cannot {action} {path}")]
    Io {
        image: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ImageError {
    /// An I/O error on `path`, turned into [`ImageError::DiskFull`] when the disk (or quota)
    /// is full.
    pub(crate) fn io(image: &str, action: &'static str, path: &Path, source: io::Error) -> ImageError {
        if is_disk_full(&source) {
            return ImageError::DiskFull { image: image.to_owned(), path: path.to_owned() };
        }
        ImageError::Io { image: image.to_owned(), action, path: path.to_owned(), source }
    }
}

fn is_disk_full(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// The message of an error with all its sources, for errors of other crates that keep the
/// useful part (connection refused, certificate unknown) in their sources.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_disk_has_its_own_message() {
        let err = ImageError::io("alpine", "write", Path::new("/x"), io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(err.to_string(), "image alpine: no space left on the device while writing /x");
        let err = ImageError::io("alpine", "write", Path::new("/x"), io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(err.to_string(), "image alpine: cannot write /x");
    }
}
