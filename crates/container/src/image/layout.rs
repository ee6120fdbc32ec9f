//! OCI image layout directories (`oci:/path[:tag]`): the `oci-layout` marker, `index.json`, and
//! `blobs/<algo>/<hex>`. Manifests and configs are checked against their digests when read;
//! layers when unpacked, straight from the layout (nothing is copied into the store).

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::image::digest::{Digest, Hasher};
use crate::image::error::ImageError;
use crate::image::manifest::{
    descriptor_digest, parse_config, parse_manifest_document, select_platform, Descriptor, ImageManifest, ManifestDocument,
    MAX_DOCUMENT_BYTES, REF_NAME_ANNOTATION,
};
use crate::image::store::ResolvedImage;
use crate::image::unpack::LayerInput;

/// containerd and Docker (25+) exports put the full image name here, next to the tag.
const CONTAINERD_NAME_ANNOTATION: &str = "io.containerd.image.name";

/// Reads the layout at `layout` and finds the image named `tag` (or the only one).
pub(crate) fn resolve(image: &str, layout: &Path, tag: Option<&str>) -> Result<ResolvedImage, ImageError> {
    let not_layout = |reason: String| ImageError::NotAnOciLayout { image: image.to_owned(), path: layout.to_owned(), reason };
    check_marker(layout).map_err(not_layout)?;
    let index_path = layout.join("index.json");
    let index_bytes = read_limited(&index_path).map_err(|err| not_layout(format!("cannot read index.json: {err}")))?;
    let ManifestDocument::Index(entries) = parse_manifest_document(image, "index.json", &index_bytes)? else {
        return Err(not_layout("index.json is a manifest, not an image index".to_owned()));
    };
    let entry = select_entry(image, &entries, tag)?;
    let (digest, manifest) = follow_to_image_manifest(image, layout, &entry)?;

    let compressions = manifest.layer_compressions(image)?;
    let config_bytes = read_blob(image, layout, &manifest.config, "the image config")?;
    let parsed = parse_config(image, &config_bytes)?;
    parsed.check_layer_count(image, manifest.layers.len())?;
    let count = manifest.layers.len();
    let layers = manifest
        .layers
        .iter()
        .zip(compressions)
        .enumerate()
        .map(|(index, (layer, compression))| {
            let layer_digest = descriptor_digest(image, layer)?;
            Ok(LayerInput {
                label: format!("layer {}/{count} ({})", index + 1, layer_digest.short()),
                path: blob_path(layout, &layer_digest),
                offset: 0,
                length: descriptor_size(image, layer)?,
                compression,
                digest: Some(layer_digest),
                diff_id: parsed.diff_ids.get(index).cloned(),
                remove_if_corrupt: false,
            })
        })
        .collect::<Result<Vec<_>, ImageError>>()?;
    Ok(ResolvedImage { digest, config: parsed.config, layers })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutMarker {
    image_layout_version: String,
}

fn check_marker(layout: &Path) -> Result<(), String> {
    if !layout.is_dir() {
        return Err("no such directory".to_owned());
    }
    let bytes = read_limited(&layout.join("oci-layout")).map_err(|err| format!("cannot read the `oci-layout` file: {err}"))?;
    let marker: LayoutMarker = serde_json::from_slice(&bytes).map_err(|err| format!("the `oci-layout` file is not valid: {err}"))?;
    if !marker.image_layout_version.starts_with("1.") {
        return Err(format!("image layout version {} is not supported (only 1.x)", marker.image_layout_version));
    }
    Ok(())
}

/// The index.json entry named `tag`, or the only entry.
fn select_entry(image: &str, entries: &[Descriptor], tag: Option<&str>) -> Result<Descriptor, ImageError> {
    let tags: Vec<&str> = entries.iter().filter_map(|entry| entry.annotations.get(REF_NAME_ANNOTATION)).map(String::as_str).collect();
    let listed = || if tags.is_empty() { "none".to_owned() } else { tags.join(", ") };
    let Some(tag) = tag else {
        return match entries {
            [only] => Ok(only.clone()),
            [] => Err(ImageError::NotFound { image: image.to_owned(), what: "any manifest in index.json".to_owned() }),
            _ => Err(ImageError::InvalidImage {
                image: image.to_owned(),
                reason: format!("index.json holds {} manifests; name one with oci:PATH:TAG (tags: {})", entries.len(), listed()),
            }),
        };
    };
    let named: Vec<Descriptor> = entries
        .iter()
        .filter(|entry| {
            entry.annotations.get(REF_NAME_ANNOTATION).map(String::as_str) == Some(tag)
                || entry.annotations.get(CONTAINERD_NAME_ANNOTATION).map(String::as_str) == Some(tag)
        })
        .cloned()
        .collect();
    match named.as_slice() {
        [] => Err(ImageError::NotFound { image: image.to_owned(), what: format!("tag `{tag}` in index.json (tags: {})", listed()) }),
        [only] => Ok(only.clone()),
        // One tag on several platform manifests: pick ours.
        several => select_platform(image, several).cloned(),
    }
}

/// Follows nested image indexes (a tag usually names a multi-platform index) down to the
/// linux/amd64 image manifest.
fn follow_to_image_manifest(image: &str, layout: &Path, entry: &Descriptor) -> Result<(Digest, ImageManifest), ImageError> {
    let mut descriptor = entry.clone();
    for _ in 0..4 {
        let bytes = read_blob(image, layout, &descriptor, "a manifest")?;
        let digest = descriptor_digest(image, &descriptor)?;
        match parse_manifest_document(image, &format!("manifest {digest}"), &bytes)? {
            ManifestDocument::Image(manifest) => return Ok((digest, manifest)),
            ManifestDocument::Index(entries) => descriptor = select_platform(image, &entries)?.clone(),
        }
    }
    Err(ImageError::InvalidImage { image: image.to_owned(), reason: "image indexes nested too deeply".to_owned() })
}

fn blob_path(layout: &Path, digest: &Digest) -> PathBuf {
    layout.join("blobs").join(digest.algorithm.name()).join(&digest.hex)
}

fn descriptor_size(image: &str, descriptor: &Descriptor) -> Result<u64, ImageError> {
    u64::try_from(descriptor.size).map_err(|_| ImageError::InvalidImage {
        image: image.to_owned(),
        reason: format!("descriptor {} has a negative size", descriptor.digest),
    })
}

/// Reads a small blob of the layout and checks its digest and size.
fn read_blob(image: &str, layout: &Path, descriptor: &Descriptor, what: &str) -> Result<Vec<u8>, ImageError> {
    let digest = descriptor_digest(image, descriptor)?;
    let path = blob_path(layout, &digest);
    let bytes = read_limited(&path).map_err(|err| {
        if err.kind() == io::ErrorKind::NotFound {
            ImageError::NotFound { image: image.to_owned(), what: format!("{what} ({digest}) at {}", path.display()) }
        } else {
            ImageError::io(image, "read", &path, err)
        }
    })?;
    let mut hasher = Hasher::new(digest.algorithm);
    hasher.update(&bytes);
    let actual = hasher.finish();
    if actual != digest {
        return Err(ImageError::DigestMismatch {
            image: image.to_owned(),
            what: format!("{what} at {}", path.display()),
            expected: digest.to_string(),
            actual: actual.to_string(),
        });
    }
    if descriptor.size > 0 && descriptor.size as u64 != bytes.len() as u64 {
        return Err(ImageError::InvalidImage {
            image: image.to_owned(),
            reason: format!("{what} ({digest}) is {} bytes, its descriptor says {}", bytes.len(), descriptor.size),
        });
    }
    Ok(bytes)
}

/// Reads a JSON document, refusing unreasonably large ones.
pub(crate) fn read_limited(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?.take(MAX_DOCUMENT_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_DOCUMENT_BYTES {
        return Err(io::Error::other(format!("larger than {MAX_DOCUMENT_BYTES} bytes")));
    }
    Ok(bytes)
}
