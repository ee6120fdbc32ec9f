//! docker-archive tarballs (`docker save` output): `manifest.json` (`Config`, `RepoTags`,
//! `Layers`), the image config, and the layer tars, read in place from the archive.
//!
//! The archive is indexed once per `prepare` by walking its tar headers with seeks (no layer
//! data is read), then members are read by offset. Both the legacy layout (`<id>/layer.tar`,
//! `<hex>.json`, layers deduplicated with symlinks) and the Docker 25+ one (`blobs/sha256/…`)
//! work. Layers may be plain tars or gzip (sniffed).
//!
//! Identity: an archive has no OCI manifest, so its "manifest digest" is the sha256 of the
//! canonical JSON `{"format":"sandpool docker-archive v1","config":"sha256:…","diff_ids":[…]}`
//! (serde_json, that field order, no spaces). The config digest is computed from the config
//! bytes, and each layer is checked against its diff ID while it is unpacked, so the identity
//! covers every byte of the image. The same image saved twice gives the same identity; it
//! differs from the image's registry manifest digest.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::image::digest::Digest;
use crate::image::error::ImageError;
use crate::image::manifest::{parse_config, Compression, MAX_DOCUMENT_BYTES};
use crate::image::store::ResolvedImage;
use crate::image::unpack::LayerInput;

const IDENTITY_FORMAT: &str = "sandpool docker-archive v1";
/// Symlinks followed inside the archive before giving up.
const MAX_LINK_HOPS: usize = 8;

pub(crate) fn resolve(image: &str, path: &Path, tag: Option<&str>) -> Result<ResolvedImage, ImageError> {
    let not_archive = |reason: String| ImageError::NotADockerArchive { image: image.to_owned(), path: path.to_owned(), reason };
    let mut file = File::open(path).map_err(|err| match err.kind() {
        io::ErrorKind::NotFound => ImageError::NotFound { image: image.to_owned(), what: format!("the file {}", path.display()) },
        _ => ImageError::io(image, "open", path, err),
    })?;
    let mut head = [0u8; 4];
    let head_len = file.read(&mut head).map_err(|err| ImageError::io(image, "read", path, err))?;
    if head[..head_len].starts_with(&[0x1f, 0x8b]) || head[..head_len].starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Err(not_archive("it is compressed; decompress it first (`docker save` writes a plain tar)".to_owned()));
    }
    file.seek(SeekFrom::Start(0)).map_err(|err| ImageError::io(image, "read", path, err))?;
    let members = index_members(file).map_err(|err| not_archive(format!("cannot read it as a tar: {err}")))?;

    let manifest_bytes = members.read(path, "manifest.json").map_err(|err| not_archive(format!("cannot read manifest.json: {err}")))?;
    let entries: Vec<ArchiveManifestEntry> =
        serde_json::from_slice(&manifest_bytes).map_err(|err| not_archive(format!("manifest.json is not valid: {err}")))?;
    let entry = select_entry(image, &entries, tag)?;

    let config_bytes =
        members.read(path, &entry.config).map_err(|err| not_archive(format!("cannot read the image config {}: {err}", entry.config)))?;
    let config_digest = Digest::sha256_of(&config_bytes);
    if let Some(named) = digest_in_member_name(&entry.config) {
        if named != config_digest {
            return Err(ImageError::DigestMismatch {
                image: image.to_owned(),
                what: format!("the image config {}", entry.config),
                expected: named.to_string(),
                actual: config_digest.to_string(),
            });
        }
    }
    let parsed = parse_config(image, &config_bytes)?;
    if parsed.diff_ids.len() != entry.layers.len() {
        return Err(ImageError::InvalidImage {
            image: image.to_owned(),
            reason: format!("manifest.json lists {} layers but the config {} diff_ids", entry.layers.len(), parsed.diff_ids.len()),
        });
    }

    let count = entry.layers.len();
    let mut layers = Vec::with_capacity(count);
    for (index, (member, diff_id)) in entry.layers.iter().zip(&parsed.diff_ids).enumerate() {
        let (offset, length) =
            members.locate(member).ok_or_else(|| not_archive(format!("layer {member} listed in manifest.json is not in the archive")))?;
        layers.push(LayerInput {
            label: format!("layer {}/{count} ({})", index + 1, diff_id.short()),
            path: path.to_owned(),
            offset,
            length,
            compression: Compression::Detect,
            digest: digest_in_member_name(member),
            diff_id: Some(diff_id.clone()),
            remove_if_corrupt: false,
        });
    }
    let digest = identity(&config_digest, &parsed.diff_ids);
    Ok(ResolvedImage { digest, config: parsed.config, layers })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

#[derive(Serialize)]
struct Identity<'a> {
    format: &'a str,
    config: String,
    diff_ids: Vec<String>,
}

/// The digest standing in for a manifest digest; see the module doc.
fn identity(config: &Digest, diff_ids: &[Digest]) -> Digest {
    let identity =
        Identity { format: IDENTITY_FORMAT, config: config.to_string(), diff_ids: diff_ids.iter().map(Digest::to_string).collect() };
    Digest::sha256_of(&serde_json::to_vec(&identity).expect("a struct of strings serializes"))
}

fn select_entry<'a>(image: &str, entries: &'a [ArchiveManifestEntry], tag: Option<&str>) -> Result<&'a ArchiveManifestEntry, ImageError> {
    let all_tags = || {
        let tags: Vec<&str> = entries.iter().flat_map(|e| e.repo_tags.iter().flatten()).map(String::as_str).collect();
        if tags.is_empty() {
            "none".to_owned()
        } else {
            tags.join(", ")
        }
    };
    let Some(tag) = tag else {
        return match entries {
            [only] => Ok(only),
            [] => Err(ImageError::NotFound { image: image.to_owned(), what: "any image in manifest.json".to_owned() }),
            _ => Err(ImageError::InvalidImage {
                image: image.to_owned(),
                reason: format!(
                    "the archive holds {} images; name one with docker-archive:PATH:REPO:TAG (tags: {})",
                    entries.len(),
                    all_tags()
                ),
            }),
        };
    };
    let wanted = normalize_tag(tag);
    entries.iter().find(|entry| entry.repo_tags.iter().flatten().any(|candidate| normalize_tag(candidate) == wanted)).ok_or_else(|| {
        ImageError::NotFound { image: image.to_owned(), what: format!("tag `{tag}` in the archive's manifest.json (tags: {})", all_tags()) }
    })
}

/// `alpine`, `alpine:latest`, `docker.io/library/alpine:latest` all name the same image.
fn normalize_tag(tag: &str) -> String {
    let short = tag.strip_prefix("docker.io/library/").or_else(|| tag.strip_prefix("docker.io/")).unwrap_or(tag);
    let last_segment = short.rsplit('/').next().unwrap_or(short);
    if last_segment.contains(':') {
        short.to_owned()
    } else {
        format!("{short}:latest")
    }
}

/// `blobs/sha256/<hex>` or `<hex>.json` name their content's digest; other names do not.
fn digest_in_member_name(member: &str) -> Option<Digest> {
    let normalized = normalize_member(member)?;
    let parts: Vec<&str> = normalized.split('/').collect();
    match parts.as_slice() {
        ["blobs", algorithm, hex] => Digest::parse(&format!("{algorithm}:{hex}")).ok(),
        [file] => Digest::parse(&format!("sha256:{}", file.strip_suffix(".json")?)).ok(),
        _ => None,
    }
}

#[derive(Debug)]
enum Member {
    File { offset: u64, size: u64 },
    Symlink { target: String },
    HardLink { target: String },
}

/// The members of the archive by normalized path, and where their data is.
struct Members(HashMap<String, Member>);

fn index_members(file: File) -> io::Result<Members> {
    let mut archive = tar::Archive::new(file);
    let mut members = HashMap::new();
    for entry in archive.entries_with_seek()? {
        let entry = entry?;
        let Some(name) = entry.path()?.to_str().and_then(normalize_member) else { continue };
        let link_target =
            || -> io::Result<String> { Ok(entry.link_name()?.map(|target| target.to_string_lossy().into_owned()).unwrap_or_default()) };
        let member = match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => Member::File { offset: entry.raw_file_position(), size: entry.size() },
            tar::EntryType::Symlink => Member::Symlink { target: link_target()? },
            tar::EntryType::Link => Member::HardLink { target: link_target()? },
            _ => continue,
        };
        members.insert(name, member);
    }
    Ok(Members(members))
}

impl Members {
    /// Offset and size of a member's data, following links inside the archive.
    fn locate(&self, name: &str) -> Option<(u64, u64)> {
        let mut current = normalize_member(name)?;
        for _ in 0..MAX_LINK_HOPS {
            current = match self.0.get(&current)? {
                Member::File { offset, size } => return Some((*offset, *size)),
                Member::HardLink { target } => normalize_member(target)?,
                Member::Symlink { target } => {
                    let base = current.rsplit_once('/').map_or("", |(dir, _)| dir);
                    let joined = if target.starts_with('/') { target.clone() } else { format!("{base}/{target}") };
                    normalize_member(&joined)?
                }
            };
        }
        None
    }

    fn read(&self, archive: &Path, name: &str) -> io::Result<Vec<u8>> {
        let (offset, size) = self.locate(name).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "not in the archive"))?;
        if size > MAX_DOCUMENT_BYTES {
            return Err(io::Error::other(format!("larger than {MAX_DOCUMENT_BYTES} bytes")));
        }
        let mut file = File::open(archive)?;
        file.seek(SeekFrom::Start(offset))?;
        let mut bytes = Vec::with_capacity(size as usize);
        file.take(size).read_to_end(&mut bytes)?;
        if bytes.len() as u64 != size {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the archive is truncated"));
        }
        Ok(bytes)
    }
}

/// A member path without `.` components, `..` resolved lexically; `None` if it climbs above
/// the archive root. (Only used to look members up: nothing is written from these names.)
fn normalize_member(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            part => parts.push(part),
        }
    }
    Some(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_compare_in_their_normal_form() {
        assert_eq!(normalize_tag("alpine"), "alpine:latest");
        assert_eq!(normalize_tag("docker.io/library/alpine:3"), "alpine:3");
        assert_eq!(normalize_tag("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(normalize_tag("myorg/app:1.0"), "myorg/app:1.0");
    }

    #[test]
    fn member_names_resolve_lexically_and_name_digests() {
        assert_eq!(normalize_member("./a/../b/layer.tar").as_deref(), Some("b/layer.tar"));
        assert_eq!(normalize_member("../x"), None);
        let hex = "c".repeat(64);
        assert_eq!(digest_in_member_name(&format!("{hex}.json")).unwrap().hex, hex);
        assert_eq!(digest_in_member_name(&format!("blobs/sha256/{hex}")).unwrap().hex, hex);
        assert!(digest_in_member_name("abc/layer.tar").is_none());
    }
}
