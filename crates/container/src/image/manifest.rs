//! The JSON documents of an image (image manifest, image index or manifest list, image
//! config) in both the OCI and the Docker v2 schema 2 flavours, read leniently (only the fields
//! a runtime needs) but checked strictly where it matters: schema version, media types, digests.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use crate::image::digest::Digest;
use crate::image::error::ImageError;

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The manifest media types a registry is asked for.
pub(crate) const ACCEPTED_MANIFEST_TYPES: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST];

/// The annotation holding a tag in an OCI layout's index.json.
pub(crate) const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// The platform picked from an image index: sessions run on linux/amd64 hosts.
const WANTED_OS: &str = "linux";
const WANTED_ARCHITECTURE: &str = "amd64";

/// Manifests and configs larger than this are refused rather than read into memory.
pub(crate) const MAX_DOCUMENT_BYTES: u64 = 16 * 1024 * 1024;

/// The parts of the image config a runtime needs (from the OCI image config's `config` object).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// "K=V"
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    /// As written in the config, e.g. "8080/tcp", sorted.
    pub exposed_ports: Vec<String>,
}

/// A content descriptor (OCI descriptor, or an entry of a Docker manifest).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub(crate) media_type: String,
    pub(crate) digest: String,
    #[serde(default)]
    pub(crate) size: i64,
    #[serde(default)]
    pub(crate) annotations: HashMap<String, String>,
    #[serde(default)]
    pub(crate) platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Platform {
    #[serde(default)]
    pub(crate) architecture: String,
    #[serde(default)]
    pub(crate) os: String,
}

/// A parsed manifest document: either one image or a list of them.
#[derive(Debug)]
pub(crate) enum ManifestDocument {
    Image(ImageManifest),
    Index(Vec<Descriptor>),
}

#[derive(Debug)]
pub(crate) struct ImageManifest {
    pub(crate) config: Descriptor,
    pub(crate) layers: Vec<Descriptor>,
}

/// How a layer blob is compressed, from its media type (or sniffed, for docker-archive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
    /// Unknown ahead: look at the first bytes (docker-archive layers are plain or gzip).
    Detect,
}

/// The compression of a layer media type, or `None` when the type is not a layer we can unpack.
pub(crate) fn layer_compression(media_type: &str) -> Option<Compression> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd" | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
            Some(Compression::Zstd)
        }
        _ => None,
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifestDocument {
    schema_version: Option<i64>,
    media_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
}

/// Parses an image manifest or an image index / manifest list.
pub(crate) fn parse_manifest_document(image: &str, what: &str, bytes: &[u8]) -> Result<ManifestDocument, ImageError> {
    let invalid = |reason: String| ImageError::InvalidImage { image: image.to_owned(), reason: format!("{what}: {reason}") };
    let raw: RawManifestDocument = serde_json::from_slice(bytes).map_err(|err| invalid(format!("not a valid manifest: {err}")))?;
    if raw.schema_version == Some(1) {
        return Err(ImageError::UnsupportedMediaType {
            image: image.to_owned(),
            what: what.to_owned(),
            media_type:
                "application/vnd.docker.distribution.manifest.v1+json (Docker schema 1; push the image again with a current Docker)"
                    .to_owned(),
        });
    }
    if raw.schema_version != Some(2) {
        return Err(invalid(format!("schemaVersion is {:?}, expected 2", raw.schema_version)));
    }
    let is_index = match raw.media_type.as_deref() {
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        Some(OCI_INDEX | DOCKER_MANIFEST_LIST) => true,
        Some(other) => {
            return Err(ImageError::UnsupportedMediaType { image: image.to_owned(), what: what.to_owned(), media_type: other.to_owned() })
        }
        None => raw.manifests.is_some(),
    };
    if is_index {
        let manifests = raw.manifests.ok_or_else(|| invalid("the index has no `manifests`".to_owned()))?;
        return Ok(ManifestDocument::Index(manifests));
    }
    let config = raw.config.ok_or_else(|| invalid("the manifest has no `config`".to_owned()))?;
    let layers = raw.layers.ok_or_else(|| invalid("the manifest has no `layers`".to_owned()))?;
    Ok(ManifestDocument::Image(ImageManifest { config, layers }))
}

/// Picks the linux/amd64 entry of an image index. An index of a single entry without platform
/// information is taken as it is.
pub(crate) fn select_platform<'a>(image: &str, entries: &'a [Descriptor]) -> Result<&'a Descriptor, ImageError> {
    if let Some(entry) =
        entries.iter().find(|entry| entry.platform.as_ref().is_some_and(|p| p.os == WANTED_OS && p.architecture == WANTED_ARCHITECTURE))
    {
        return Ok(entry);
    }
    if let [only] = entries {
        if only.platform.is_none() {
            return Ok(only);
        }
    }
    let available: Vec<String> =
        entries.iter().filter_map(|entry| entry.platform.as_ref()).map(|p| format!("{}/{}", p.os, p.architecture)).collect();
    Err(ImageError::NotFound {
        image: image.to_owned(),
        what: format!(
            "a {WANTED_OS}/{WANTED_ARCHITECTURE} manifest (the index offers: {})",
            if available.is_empty() { "no platforms".to_owned() } else { available.join(", ") }
        ),
    })
}

impl ImageManifest {
    /// Checks the config and layer media types, returning each layer's compression.
    pub(crate) fn layer_compressions(&self, image: &str) -> Result<Vec<Compression>, ImageError> {
        let config_type = self.config.media_type.as_str();
        if !config_type.is_empty() && config_type != OCI_CONFIG && config_type != DOCKER_CONFIG {
            return Err(ImageError::UnsupportedMediaType {
                image: image.to_owned(),
                what: "the image config (this artifact is not a container image)".to_owned(),
                media_type: config_type.to_owned(),
            });
        }
        self.layers
            .iter()
            .enumerate()
            .map(|(index, layer)| {
                layer_compression(&layer.media_type).ok_or_else(|| ImageError::UnsupportedMediaType {
                    image: image.to_owned(),
                    what: format!("layer {} ({})", index + 1, layer.digest),
                    media_type: layer.media_type.clone(),
                })
            })
            .collect()
    }
}

/// A parsed descriptor digest; a malformed one makes the image invalid.
pub(crate) fn descriptor_digest(image: &str, descriptor: &Descriptor) -> Result<Digest, ImageError> {
    Digest::parse(&descriptor.digest).map_err(|reason| ImageError::InvalidImage { image: image.to_owned(), reason })
}

/// The image config as the runtime needs it, plus the layer diff IDs to verify the unpacked
/// layers against.
#[derive(Debug)]
pub(crate) struct ParsedConfig {
    pub(crate) config: ImageConfig,
    pub(crate) diff_ids: Vec<Digest>,
}

impl ParsedConfig {
    /// Checks that the config's `diff_ids` (when it lists any) match the manifest's layers.
    pub(crate) fn check_layer_count(&self, image: &str, manifest_layers: usize) -> Result<(), ImageError> {
        if !self.diff_ids.is_empty() && self.diff_ids.len() != manifest_layers {
            return Err(ImageError::InvalidImage {
                image: image.to_owned(),
                reason: format!("the manifest lists {manifest_layers} layers but the config {} diff_ids", self.diff_ids.len()),
            });
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct RawConfigFile {
    os: Option<String>,
    architecture: Option<String>,
    config: Option<RawContainerConfig>,
    rootfs: Option<RawRootFs>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawContainerConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Deserialize)]
struct RawRootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

pub(crate) fn parse_config(image: &str, bytes: &[u8]) -> Result<ParsedConfig, ImageError> {
    let invalid = |reason: String| ImageError::InvalidImage { image: image.to_owned(), reason };
    let raw: RawConfigFile = serde_json::from_slice(bytes).map_err(|err| invalid(format!("the image config is not valid JSON: {err}")))?;
    if let Some(os) = raw.os.as_deref() {
        if !os.is_empty() && os != WANTED_OS {
            return Err(invalid(format!("the image is built for the `{os}` operating system, not {WANTED_OS}")));
        }
    }
    if let Some(architecture) = raw.architecture.as_deref() {
        if !architecture.is_empty() && architecture != WANTED_ARCHITECTURE {
            tracing::warn!(image, architecture, "the image is not built for {WANTED_ARCHITECTURE}; its programs may fail to start");
        }
    }
    let diff_ids = raw
        .rootfs
        .map(|rootfs| rootfs.diff_ids)
        .unwrap_or_default()
        .iter()
        .map(|text| Digest::parse(text).map_err(|reason| invalid(format!("rootfs.diff_ids: {reason}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let container = raw.config.unwrap_or(RawContainerConfig {
        entrypoint: None,
        cmd: None,
        env: None,
        working_dir: None,
        user: None,
        exposed_ports: None,
    });
    let config = ImageConfig {
        entrypoint: container.entrypoint.unwrap_or_default(),
        cmd: container.cmd.unwrap_or_default(),
        env: container.env.unwrap_or_default(),
        working_dir: container.working_dir.filter(|dir| !dir.is_empty()),
        user: container.user.filter(|user| !user.is_empty()),
        exposed_ports: container.exposed_ports.unwrap_or_default().into_keys().collect(),
    };
    Ok(ParsedConfig { config, diff_ids })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_runtime_parts_of_a_docker_config() {
        let json = br#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":null,"Cmd":["python3","-m","http.server"],
            "Env":["PATH=/usr/bin"],"WorkingDir":"","User":"1000:1000","ExposedPorts":{"8080/tcp":{},"53/udp":{}}},
            "rootfs":{"type":"layers","diff_ids":[]}}"#;
        let parsed = parse_config("img", json).unwrap();
        assert_eq!(
            parsed.config,
            ImageConfig {
                entrypoint: vec![],
                cmd: vec!["python3".into(), "-m".into(), "http.server".into()],
                env: vec!["PATH=/usr/bin".into()],
                working_dir: None,
                user: Some("1000:1000".into()),
                exposed_ports: vec!["53/udp".into(), "8080/tcp".into()],
            }
        );
        let windows = br#"{"os":"windows","config":{}}"#;
        assert!(parse_config("img", windows).unwrap_err().to_string().contains("`windows` operating system"));
    }

    #[test]
    fn tells_manifests_from_indexes_and_refuses_other_types() {
        let index = br#"{"schemaVersion":2,"manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:1","size":1,"platform":{"os":"linux","architecture":"arm64"}},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:2","size":1,"platform":{"os":"linux","architecture":"amd64"}}]}"#;
        let ManifestDocument::Index(entries) = parse_manifest_document("img", "manifest", index).unwrap() else { panic!("not an index") };
        assert_eq!(select_platform("img", &entries).unwrap().digest, "sha256:2");
        assert!(select_platform("img", &entries[..1]).unwrap_err().to_string().contains("linux/arm64"));

        let artifact =
            br#"{"schemaVersion":2,"mediaType":"application/vnd.cncf.helm.chart.v1+json","config":{"digest":"sha256:1"},"layers":[]}"#;
        let err = parse_manifest_document("img", "manifest", artifact).unwrap_err();
        assert!(matches!(err, ImageError::UnsupportedMediaType { .. }), "{err}");
        let schema1 = br#"{"schemaVersion":1,"name":"x"}"#;
        assert!(parse_manifest_document("img", "manifest", schema1).unwrap_err().to_string().contains("schema 1"));
    }
}
