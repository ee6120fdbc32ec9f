//! Where an image comes from: the pool config's `image` string, parsed into an [`ImageSource`].
//!
//! Three forms, told apart by their prefix:
//! * `oci:/abs/path[:tag]`: an OCI image layout directory;
//! * `docker-archive:/abs/path.tar[:repo:tag]`: a `docker save` tarball;
//! * anything else: a registry reference (`registry/repo:tag`, `repo@sha256:...`, `alpine`).
//!
//! For the two local forms the path ends at the first `:` after the prefix (the way skopeo
//! reads them), so the path itself cannot contain a `:`, and what follows may (`oci:/l:a:b`
//! names the tag `a:b`). Paths must be absolute: a server's working directory is no anchor.

use std::fmt;
use std::path::PathBuf;

use crate::image::digest::Digest;
use crate::image::error::ImageError;

const OCI_LAYOUT_PREFIX: &str = "oci:";
const DOCKER_ARCHIVE_PREFIX: &str = "docker-archive:";

/// Where an image comes from, parsed from the pool config's `image` string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// "registry/repo:tag" or "registry/repo@sha256:..." (also "repo:tag" meaning
    /// docker.io/library/...).
    Registry { reference: String },
    /// "oci:/path/to/layout" or "oci:/path/to/layout:tag" (OCI image layout directory; the tag
    /// is the `org.opencontainers.image.ref.name` annotation in index.json; without a tag the
    /// index must hold exactly one manifest).
    OciLayout { path: PathBuf, tag: Option<String> },
    /// "docker-archive:/path/file.tar" (the `docker save` format: manifest.json + config +
    /// layer tars), optionally ":repo:tag" after the path to pick one image from a multi-image
    /// archive.
    DockerArchive { path: PathBuf, tag: Option<String> },
}

impl ImageSource {
    pub fn parse(text: &str) -> Result<ImageSource, ImageError> {
        let invalid = |reason: String| ImageError::InvalidReference { text: text.to_owned(), reason };
        if text.trim().is_empty() {
            return Err(invalid("the image is empty".to_owned()));
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid("it contains whitespace or control characters".to_owned()));
        }
        if let Some(rest) = text.strip_prefix(OCI_LAYOUT_PREFIX) {
            let (path, tag) = split_local(rest, "oci:/path/to/layout[:tag]").map_err(invalid)?;
            return Ok(ImageSource::OciLayout { path, tag });
        }
        if let Some(rest) = text.strip_prefix(DOCKER_ARCHIVE_PREFIX) {
            let (path, tag) = split_local(rest, "docker-archive:/path/to/file.tar[:repo:tag]").map_err(invalid)?;
            return Ok(ImageSource::DockerArchive { path, tag });
        }
        if text.contains("://") {
            return Err(invalid("a registry reference has no URL scheme (write registry.example:5000/repo:tag)".to_owned()));
        }
        let reference: oci_client::Reference = text.parse().map_err(|err: oci_client::ParseError| {
            invalid(format!("{err} (expected registry/repository:tag, repository@sha256:<hex>, oci:/path or docker-archive:/path)"))
        })?;
        if let Some(digest) = reference.digest() {
            Digest::parse(digest).map_err(invalid)?;
        }
        Ok(ImageSource::Registry { reference: text.to_owned() })
    }
}

/// Splits `/path[:tag]` at the first `:`.
fn split_local(rest: &str, form: &str) -> Result<(PathBuf, Option<String>), String> {
    let (path, tag) = match rest.split_once(':') {
        Some((path, tag)) => (path, Some(tag)),
        None => (rest, None),
    };
    if path.is_empty() {
        return Err(format!("the path is missing (expected {form})"));
    }
    if !path.starts_with('/') {
        return Err(format!("the path `{path}` must be absolute (expected {form})"));
    }
    if tag == Some("") {
        return Err(format!("the tag after `:` is empty (expected {form})"));
    }
    Ok((PathBuf::from(path), tag.map(str::to_owned)))
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (prefix, path, tag) = match self {
            ImageSource::Registry { reference } => return f.write_str(reference),
            ImageSource::OciLayout { path, tag } => (OCI_LAYOUT_PREFIX, path, tag),
            ImageSource::DockerArchive { path, tag } => (DOCKER_ARCHIVE_PREFIX, path, tag),
        };
        write!(f, "{prefix}{}", path.display())?;
        if let Some(tag) = tag {
            write!(f, ":{tag}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> String {
        ImageSource::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_registry_references() {
        for text in [
            "alpine",
            "alpine:3.20",
            "docker.io/library/python:3.12-slim",
            "127.0.0.1:5000/team/app:v1",
            "localhost:5000/app",
            &format!("ghcr.io/org/app@sha256:{}", "a".repeat(64)),
            &format!("ghcr.io/org/app:v1@sha256:{}", "b".repeat(64)),
        ] {
            let source = ImageSource::parse(text).unwrap();
            assert_eq!(source, ImageSource::Registry { reference: text.to_owned() });
            assert_eq!(source.to_string(), text);
        }
    }

    #[test]
    fn parses_local_sources_with_and_without_tags() {
        assert_eq!(
            ImageSource::parse("oci:/srv/images/app").unwrap(),
            ImageSource::OciLayout { path: "/srv/images/app".into(), tag: None }
        );
        let with_tag = ImageSource::parse("oci:/srv/images/app:v1").unwrap();
        assert_eq!(with_tag, ImageSource::OciLayout { path: "/srv/images/app".into(), tag: Some("v1".into()) });
        assert_eq!(with_tag.to_string(), "oci:/srv/images/app:v1");
        assert_eq!(
            ImageSource::parse("docker-archive:/tmp/app.tar").unwrap(),
            ImageSource::DockerArchive { path: "/tmp/app.tar".into(), tag: None }
        );
        let archive = ImageSource::parse("docker-archive:/tmp/app.tar:myorg/app:1.0").unwrap();
        assert_eq!(archive, ImageSource::DockerArchive { path: "/tmp/app.tar".into(), tag: Some("myorg/app:1.0".into()) });
        assert_eq!(archive.to_string(), "docker-archive:/tmp/app.tar:myorg/app:1.0");
    }

    #[test]
    fn refuses_bad_strings_with_clear_errors() {
        assert!(parse_err("").contains("empty"));
        assert!(parse_err("alpine latest").contains("whitespace"));
        assert!(parse_err("oci:").contains("path is missing"));
        assert!(parse_err("oci:relative/dir").contains("must be absolute"));
        assert!(parse_err("oci:/srv/app:").contains("tag after `:` is empty"));
        assert!(parse_err("docker-archive:app.tar").contains("must be absolute"));
        assert!(parse_err("https://ghcr.io/org/app:v1").contains("no URL scheme"));
        assert!(parse_err("Docker.io/Library/Alpine").contains("invalid image reference `Docker.io/Library/Alpine`"));
        assert!(parse_err("alpine@sha256:abc").contains("invalid image reference"));
        assert!(parse_err("alpine:bad:tag").contains("invalid"));
    }
}
