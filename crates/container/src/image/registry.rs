//! Registry pulls with `oci-client`: anonymous or basic auth (and the bearer tokens a registry
//! hands out for them), the linux/amd64 manifest of an index, and blobs streamed into the
//! store with their sha256 and size checked here, whatever the crate checks too.
//!
//! Manifests and configs are kept in the store next to the layers, so a reference pinned by
//! digest whose manifest is stored resolves without the network. Layers are fetched three at
//! a time.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::{Client, Reference, RegistryOperation};
use tokio::io::AsyncWriteExt;

use crate::image::digest::{Digest, Hasher};
use crate::image::error::{error_chain, ImageError};
use crate::image::manifest::{
    descriptor_digest, parse_config, parse_manifest_document, select_platform, ImageManifest, ManifestDocument, ACCEPTED_MANIFEST_TYPES,
    MAX_DOCUMENT_BYTES,
};
use crate::image::store::{blob_path, run_blocking, sync_dir, write_blob, InProgress, ResolvedImage};
use crate::image::unpack::LayerInput;

/// Credentials for a registry (HTTP basic auth, also used to obtain a bearer token when the
/// registry asks for one).
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

const CONCURRENT_LAYER_DOWNLOADS: usize = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Between two reads of a response, not for a whole layer.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// One image reference on one registry, with the client that reaches it.
pub(crate) struct Remote {
    image: String,
    client: Client,
    reference: Reference,
    auth: oci_client::secrets::RegistryAuth,
    authenticated: tokio::sync::OnceCell<()>,
}

impl Remote {
    pub(crate) fn new(
        image: &str,
        reference_text: &str,
        auth: Option<&RegistryAuth>,
        insecure_registries: &[String],
    ) -> Result<Remote, ImageError> {
        let reference: Reference = reference_text.parse().map_err(|err: oci_client::ParseError| ImageError::InvalidReference {
            text: reference_text.to_owned(),
            reason: err.to_string(),
        })?;
        let mut plain_http: Vec<String> = insecure_registries.to_vec();
        if is_loopback(reference.resolve_registry()) {
            plain_http.push(reference.resolve_registry().to_owned());
        }
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain_http),
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            ..ClientConfig::default()
        };
        // reqwest (built without a default TLS provider) panics when no rustls provider is
        // installed; the binary installs ring at start, and this makes sure a library caller
        // (tests, tools) gets the same instead of a panic. A no-op when one is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::try_from(config).map_err(|err| ImageError::Registry {
            image: image.to_owned(),
            registry: reference.registry().to_owned(),
            detail: format!("cannot build the HTTP client: {}", error_chain(&err)),
        })?;
        let auth = match auth {
            Some(auth) => oci_client::secrets::RegistryAuth::Basic(auth.username.clone(), auth.password.clone()),
            None => oci_client::secrets::RegistryAuth::Anonymous,
        };
        Ok(Remote { image: image.to_owned(), client, reference, auth, authenticated: tokio::sync::OnceCell::new() })
    }

    /// Resolves the reference to its linux/amd64 image manifest and config. `blobs` is the
    /// store's `blobs` directory.
    pub(crate) async fn resolve(&self, blobs: &Path) -> Result<ResolvedImage, ImageError> {
        let image = self.image.as_str();
        let (digest, manifest) = self.image_manifest(blobs).await?;
        let compressions = manifest.layer_compressions(image)?;
        let config_digest = descriptor_digest(image, &manifest.config)?;
        let config_size = u64::try_from(manifest.config.size).ok().filter(|size| *size > 0);
        let config_bytes = self.small_blob(blobs, &config_digest, config_size, "the image config").await?;
        let parsed = parse_config(image, &config_bytes)?;
        parsed.check_layer_count(image, manifest.layers.len())?;
        let count = manifest.layers.len();
        let mut layers = Vec::with_capacity(count);
        for (index, (layer, compression)) in manifest.layers.iter().zip(compressions).enumerate() {
            let layer_digest = descriptor_digest(image, layer)?;
            let length = u64::try_from(layer.size).map_err(|_| ImageError::InvalidImage {
                image: image.to_owned(),
                reason: format!("layer {} has a negative size", layer.digest),
            })?;
            layers.push(LayerInput {
                label: format!("layer {}/{count} ({})", index + 1, layer_digest.short()),
                path: blob_path(blobs, &layer_digest),
                offset: 0,
                length,
                compression,
                digest: Some(layer_digest),
                diff_id: parsed.diff_ids.get(index).cloned(),
                remove_if_corrupt: true,
            });
        }
        Ok(ResolvedImage { digest, config: parsed.config, layers })
    }

    /// Fetches the layers not yet in the store.
    pub(crate) async fn download_missing(&self, layers: &[LayerInput]) -> Result<(), ImageError> {
        let missing: Vec<&LayerInput> = layers.iter().filter(|layer| !layer.path.is_file()).collect();
        if missing.is_empty() {
            return Ok(());
        }
        tracing::info!(image = %self.image, layers = missing.len(), of = layers.len(), "fetching layers");
        // A hand-fed FuturesUnordered rather than `stream::iter(..).map(..).buffer_unordered`:
        // the closure version is not `Send` enough for callers inside `#[async_trait]` methods.
        let mut waiting = missing.into_iter();
        let mut running = futures_util::stream::FuturesUnordered::new();
        for layer in waiting.by_ref().take(CONCURRENT_LAYER_DOWNLOADS) {
            running.push(self.download_layer(layer));
        }
        while let Some(result) = running.next().await {
            result?;
            if let Some(layer) = waiting.next() {
                running.push(self.download_layer(layer));
            }
        }
        Ok(())
    }

    async fn download_layer(&self, layer: &LayerInput) -> Result<(), ImageError> {
        let digest = layer.digest.as_ref().expect("registry layers have a digest");
        let started = Instant::now();
        let bytes = self.download(&layer.path, digest, Some(layer.length), &layer.label).await?;
        tracing::info!(
            image = %self.image,
            layer = %layer.label,
            bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "layer fetched"
        );
        Ok(())
    }

    /// The image manifest (digest and content), through an index if the reference names one.
    async fn image_manifest(&self, blobs: &Path) -> Result<(Digest, ImageManifest), ImageError> {
        let image = self.image.as_str();
        let pinned = match self.reference.digest() {
            Some(text) => {
                Some(Digest::parse(text).map_err(|reason| ImageError::InvalidReference { text: self.reference.whole(), reason })?)
            }
            None => None,
        };
        let (mut digest, mut bytes) = match &pinned {
            Some(pinned) => (pinned.clone(), self.manifest(blobs, &self.reference, Some(pinned)).await?),
            None => self.manifest_by_tag().await?,
        };
        for _ in 0..4 {
            let what = format!("manifest {digest}");
            match parse_manifest_document(image, &what, &bytes)? {
                ManifestDocument::Image(manifest) => {
                    store_blob(image, blobs, &digest, bytes).await?;
                    return Ok((digest, manifest));
                }
                ManifestDocument::Index(entries) => {
                    store_blob(image, blobs, &digest, bytes).await?;
                    let entry = select_platform(image, &entries)?;
                    digest = descriptor_digest(image, entry)?;
                    let child = self.reference.clone_with_digest(digest.to_string());
                    bytes = self.manifest(blobs, &child, Some(&digest)).await?;
                }
            }
        }
        Err(ImageError::InvalidImage { image: image.to_owned(), reason: "image indexes nested too deeply".to_owned() })
    }

    /// A manifest by digest: from the store if it is there, else from the registry.
    async fn manifest(&self, blobs: &Path, reference: &Reference, expected: Option<&Digest>) -> Result<Vec<u8>, ImageError> {
        if let Some(expected) = expected {
            if let Some(bytes) = read_stored_blob(&self.image, blobs, expected).await? {
                return Ok(bytes);
            }
        }
        self.authenticate().await?;
        let what = format!("manifest of {reference}");
        let (bytes, _) = self
            .client
            .pull_manifest_raw(reference, &self.auth, ACCEPTED_MANIFEST_TYPES)
            .await
            .map_err(|err| self.registry_error(err, &what))?;
        if let Some(expected) = expected {
            check_digest(&self.image, &what, expected, &bytes)?;
        }
        Ok(bytes.to_vec())
    }

    async fn manifest_by_tag(&self) -> Result<(Digest, Vec<u8>), ImageError> {
        self.authenticate().await?;
        let what = format!("manifest of {}", self.reference);
        let (bytes, _) = self
            .client
            .pull_manifest_raw(&self.reference, &self.auth, ACCEPTED_MANIFEST_TYPES)
            .await
            .map_err(|err| self.registry_error(err, &what))?;
        Ok((Digest::sha256_of(&bytes), bytes.to_vec()))
    }

    /// A config blob: from the store, or fetched into it.
    async fn small_blob(&self, blobs: &Path, digest: &Digest, size: Option<u64>, what: &str) -> Result<Vec<u8>, ImageError> {
        if let Some(bytes) = read_stored_blob(&self.image, blobs, digest).await? {
            return Ok(bytes);
        }
        let path = blob_path(blobs, digest);
        self.download(&path, digest, size, what).await?;
        let image = self.image.clone();
        run_blocking(move || crate::image::layout::read_limited(&path).map_err(|err| ImageError::io(&image, "read", &path, err))).await
    }

    /// Streams a blob into `destination` (in the store), checking size and digest, through a
    /// temporary file that is fsynced and renamed.
    async fn download(&self, destination: &Path, digest: &Digest, size: Option<u64>, what: &str) -> Result<u64, ImageError> {
        let image = self.image.as_str();
        self.authenticate().await?;
        let directory = destination.parent().expect("blob paths have a parent").to_owned();
        let temporary = InProgress::new(directory.join(format!("tmp-{}", uuid::Uuid::new_v4())));
        let io_error = |action: &'static str, path: &Path| {
            let path: PathBuf = path.to_owned();
            move |err| ImageError::io(image, action, &path, err)
        };
        let mut file = tokio::fs::File::create(temporary.path()).await.map_err(io_error("create", temporary.path()))?;
        let digest_text = digest.to_string();
        let mut stream =
            self.client.pull_blob_stream(&self.reference, digest_text.as_str()).await.map_err(|err| self.registry_error(err, what))?;
        let mut hasher = Hasher::new(digest.algorithm);
        let mut received: u64 = 0;
        let limit = size.unwrap_or(MAX_DOCUMENT_BYTES);
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                // oci-client reports its own digest check as a stream error at the end; when
                // every byte arrived, report the mismatch computed here instead.
                Err(_) if Some(received) == size => break,
                Err(err) => {
                    return Err(ImageError::Registry {
                        image: image.to_owned(),
                        registry: self.reference.registry().to_owned(),
                        detail: format!("fetching {what} failed after {received} bytes: {}", error_chain(&err)),
                    })
                }
            };
            received += chunk.len() as u64;
            if received > limit {
                return Err(ImageError::InvalidImage {
                    image: image.to_owned(),
                    reason: format!("{what} ({digest}) is larger than the {limit} bytes its descriptor announces"),
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io_error("write", temporary.path()))?;
        }
        let actual = hasher.finish();
        if actual != *digest {
            return Err(ImageError::DigestMismatch {
                image: image.to_owned(),
                what: what.to_owned(),
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        if let Some(size) = size {
            if received != size {
                return Err(ImageError::InvalidImage {
                    image: image.to_owned(),
                    reason: format!("{what} ({digest}) is {received} bytes, its descriptor says {size}"),
                });
            }
        }
        file.sync_all().await.map_err(io_error("sync", temporary.path()))?;
        drop(file);
        tokio::fs::rename(temporary.path(), destination).await.map_err(io_error("rename into place", temporary.path()))?;
        let dir_for_sync = directory.clone();
        run_blocking(move || sync_dir(&dir_for_sync)).await.map_err(io_error("sync", &directory))?;
        Ok(received)
    }

    /// Asks the registry for a token (or checks that none is needed) once, so that refused
    /// credentials are reported as such rather than as a later 401.
    async fn authenticate(&self) -> Result<(), ImageError> {
        self.authenticated
            .get_or_try_init(|| async {
                self.client
                    .auth(&self.reference, &self.auth, RegistryOperation::Pull)
                    .await
                    .map(drop)
                    .map_err(|err| self.registry_error(err, "a token"))
            })
            .await
            .map(drop)
    }

    /// Turns an oci-client error into what the operator needs to know.
    fn registry_error(&self, err: OciDistributionError, what: &str) -> ImageError {
        let image = self.image.clone();
        let registry = self.reference.registry().to_owned();
        let refused = |detail: String| ImageError::AuthRefused { image: image.clone(), registry: registry.clone(), detail };
        let not_found = || ImageError::NotFound { image: image.clone(), what: format!("{what} in registry {registry}") };
        match err {
            OciDistributionError::UnauthorizedError { .. } => refused(format!("401 Unauthorized for {what}")),
            OciDistributionError::AuthenticationFailure(reason) => refused(format!("authentication failed: {}", truncate(reason.trim()))),
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes.iter().any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied)) {
                    refused(format!("{what}: {}", envelope_messages(&envelope)))
                } else if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::BlobUnknown | OciErrorCode::NotFound
                    )
                }) {
                    not_found()
                } else {
                    ImageError::Registry { image, registry, detail: format!("{what}: {}", envelope_messages(&envelope)) }
                }
            }
            OciDistributionError::ServerError { code: 404, .. } => not_found(),
            OciDistributionError::ServerError { code: code @ (401 | 403), .. } => refused(format!("HTTP {code} for {what}")),
            OciDistributionError::ServerError { code, message, .. } => {
                ImageError::Registry { image, registry, detail: format!("HTTP {code} for {what}: {}", truncate(message.trim())) }
            }
            OciDistributionError::RequestError(err) if err.is_connect() || err.is_timeout() => {
                ImageError::RegistryUnreachable { image, registry, detail: error_chain(&err) }
            }
            OciDistributionError::DigestError(oci_client::errors::DigestError::VerificationError { expected, actual }) => {
                ImageError::DigestMismatch { image, what: what.to_owned(), expected, actual }
            }
            other => ImageError::Registry { image, registry, detail: format!("{what}: {}", error_chain(&other)) },
        }
    }
}

fn envelope_messages(envelope: &oci_client::errors::OciEnvelope) -> String {
    let messages: Vec<String> = envelope.errors.iter().map(|e| format!("{:?}: {}", e.code, e.message)).collect();
    truncate(&messages.join("; "))
}

/// Registries can answer with whole HTML pages; keep messages to a line.
fn truncate(text: &str) -> String {
    const MAX: usize = 300;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

fn check_digest(image: &str, what: &str, expected: &Digest, bytes: &[u8]) -> Result<(), ImageError> {
    let mut hasher = Hasher::new(expected.algorithm);
    hasher.update(bytes);
    let actual = hasher.finish();
    if actual != *expected {
        return Err(ImageError::DigestMismatch {
            image: image.to_owned(),
            what: what.to_owned(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

/// A blob of the store, checked again (it is small), or `None` if absent or damaged.
async fn read_stored_blob(image: &str, blobs: &Path, digest: &Digest) -> Result<Option<Vec<u8>>, ImageError> {
    let path = blob_path(blobs, digest);
    let bytes = match tokio::fs::read(&path).await {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(ImageError::io(image, "read", &path, err)),
    };
    if check_digest(image, "", digest, &bytes).is_err() {
        tracing::warn!(image, path = %path.display(), "a stored blob does not match its digest; fetching it again");
        let _ = tokio::fs::remove_file(&path).await;
        return Ok(None);
    }
    Ok(Some(bytes))
}

async fn store_blob(image: &str, blobs: &Path, digest: &Digest, bytes: Vec<u8>) -> Result<(), ImageError> {
    if blob_path(blobs, digest).is_file() {
        return Ok(());
    }
    let (image, blobs, digest) = (image.to_owned(), blobs.to_owned(), digest.clone());
    run_blocking(move || {
        write_blob(&blobs, &digest, &bytes).map(drop).map_err(|err| ImageError::io(&image, "write", &blob_path(&blobs, &digest), err))
    })
    .await
}

/// `127.0.0.1:5000`, `localhost:5000`, `[::1]:5000`: registries on this host speak plain HTTP
/// unless told otherwise (the way Docker treats them).
fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or(""),
        None => registry.rsplit_once(':').map_or(
            registry,
            |(host, port)| {
                if port.chars().all(|c| c.is_ascii_digit()) {
                    host
                } else {
                    registry
                }
            },
        ),
    };
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::fs;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use axum::extract::{Path as UrlPath, State};
    use axum::http::{header, HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use serde_json::json;

    use super::*;
    use crate::image::test_support::{gzip, test_config, TarBuilder, TestLayer};
    use crate::image::{ImageSource, ImageStore};

    /// (repository, tag or digest)
    type ManifestKey = (String, String);
    /// (media type, body)
    type StoredManifest = (String, Vec<u8>);

    /// A registry speaking just enough of the distribution API: `/v2/`, manifests by tag or
    /// digest, blobs by digest, optional basic auth. Counts blob downloads.
    #[derive(Default)]
    struct FakeRegistry {
        manifests: Mutex<HashMap<ManifestKey, StoredManifest>>,
        blobs: Mutex<HashMap<String, Vec<u8>>>,
        credentials: Option<(String, String)>,
        blob_downloads: AtomicUsize,
    }

    impl FakeRegistry {
        fn authorized(&self, headers: &HeaderMap) -> bool {
            let Some((user, password)) = &self.credentials else { return true };
            use base64::Engine as _;
            let expected = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")));
            headers.get(header::AUTHORIZATION).is_some_and(|value| value == expected.as_str())
        }

        fn add_blob(&self, bytes: Vec<u8>) -> (String, usize) {
            let digest = Digest::sha256_of(&bytes).to_string();
            let size = bytes.len();
            self.blobs.lock().unwrap().insert(digest.clone(), bytes);
            (digest, size)
        }

        fn add_manifest(&self, repository: &str, tags: &[&str], media_type: &str, body: Vec<u8>) -> String {
            let digest = Digest::sha256_of(&body).to_string();
            let mut manifests = self.manifests.lock().unwrap();
            for name in tags.iter().copied().chain([digest.as_str()]) {
                manifests.insert((repository.to_owned(), name.to_owned()), (media_type.to_owned(), body.clone()));
            }
            digest
        }

        /// An image (Docker schema 2 manifest) behind an OCI index that also lists arm64.
        fn add_image(&self, repository: &str, tag: &str, layers: &[TestLayer]) -> String {
            let (config_digest, config_size) = self.add_blob(serde_json::to_vec(&test_config(layers)).unwrap());
            let layer_descriptors: Vec<_> = layers
                .iter()
                .map(|layer| {
                    let (digest, size) = self.add_blob(gzip(&layer.tar));
                    json!({"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": digest, "size": size})
                })
                .collect();
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config_digest, "size": config_size},
                "layers": layer_descriptors,
            });
            let body = serde_json::to_vec(&manifest).unwrap();
            let size = body.len();
            let manifest_digest = self.add_manifest(repository, &[], DOCKER_MANIFEST_TYPE, body);
            let index = json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [
                    {"mediaType": DOCKER_MANIFEST_TYPE, "digest": format!("sha256:{}", "0".repeat(64)), "size": 1,
                     "platform": {"os": "linux", "architecture": "arm64"}},
                    {"mediaType": DOCKER_MANIFEST_TYPE, "digest": manifest_digest, "size": size,
                     "platform": {"os": "linux", "architecture": "amd64"}},
                ],
            });
            self.add_manifest(repository, &[tag], "application/vnd.oci.image.index.v1+json", serde_json::to_vec(&index).unwrap());
            manifest_digest
        }
    }

    const DOCKER_MANIFEST_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";

    fn oci_error(status: StatusCode, code: &str) -> Response {
        (status, axum::Json(json!({"errors": [{"code": code, "message": code.to_lowercase()}]}))).into_response()
    }

    fn unauthorized() -> Response {
        (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Basic realm=\"test\"")]).into_response()
    }

    async fn version_check(State(registry): State<Arc<FakeRegistry>>, headers: HeaderMap) -> Response {
        if registry.authorized(&headers) {
            StatusCode::OK.into_response()
        } else {
            unauthorized()
        }
    }

    async fn content(State(registry): State<Arc<FakeRegistry>>, UrlPath(rest): UrlPath<String>, headers: HeaderMap) -> Response {
        if !registry.authorized(&headers) {
            return unauthorized();
        }
        if let Some((repository, reference)) = rest.rsplit_once("/manifests/") {
            let manifests = registry.manifests.lock().unwrap();
            return match manifests.get(&(repository.to_owned(), reference.to_owned())) {
                Some((media_type, body)) => (
                    [
                        (header::CONTENT_TYPE, media_type.clone()),
                        (header::HeaderName::from_static("docker-content-digest"), Digest::sha256_of(body).to_string()),
                    ],
                    body.clone(),
                )
                    .into_response(),
                None => oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
            };
        }
        if let Some((_, digest)) = rest.rsplit_once("/blobs/") {
            registry.blob_downloads.fetch_add(1, Ordering::SeqCst);
            return match registry.blobs.lock().unwrap().get(digest) {
                Some(body) => body.clone().into_response(),
                None => oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
            };
        }
        StatusCode::NOT_FOUND.into_response()
    }

    async fn serve(registry: Arc<FakeRegistry>) -> (String, tokio::task::JoinHandle<()>) {
        let app = axum::Router::new().route("/v2/", get(version_check)).route("/v2/{*rest}", get(content)).with_state(registry);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (address, server)
    }

    fn layers() -> Vec<TestLayer> {
        vec![
            TestLayer::gzip(TarBuilder::new().file("etc/issue", b"fake registry", 0o644).file("tmp/scratch", b"x", 0o644).finish()),
            TestLayer::gzip(TarBuilder::new().whiteout("tmp/.wh.scratch").file("bin/app", b"app", 0o755).finish()),
        ]
    }

    #[tokio::test]
    async fn pulls_through_an_index_with_basic_auth_and_reuses_what_it_has() {
        let registry = Arc::new(FakeRegistry { credentials: Some(("user".to_owned(), "secret".to_owned())), ..FakeRegistry::default() });
        let manifest_digest = registry.add_image("team/app", "v1", &layers());
        let (address, server) = serve(registry.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        let source = ImageSource::parse(&format!("{address}/team/app:v1")).unwrap();
        let good = RegistryAuth { username: "user".into(), password: "secret".into() };
        let bad = RegistryAuth { username: "user".into(), password: "wrong".into() };

        for auth in [None, Some(&bad)] {
            let err = ImageStore::new(images.clone()).prepare(&source, auth, &[]).await.unwrap_err();
            assert!(matches!(err, ImageError::AuthRefused { .. }), "{err}");
            assert!(err.to_string().contains(&format!("registry {address} refused access")), "{err}");
        }

        let prepared = ImageStore::new(images.clone()).prepare(&source, Some(&good), &[]).await.unwrap();
        assert_eq!(prepared.digest, manifest_digest, "the identity is the linux/amd64 manifest's digest");
        assert_eq!(fs::read(prepared.rootfs.join("etc/issue")).unwrap(), b"fake registry");
        assert!(!prepared.rootfs.join("tmp/scratch").exists());
        assert_eq!(prepared.config.cmd, vec!["/bin/app".to_owned()]);
        let downloads = registry.blob_downloads.load(Ordering::SeqCst);
        assert_eq!(downloads, 3, "config and two layers");

        // After a restart: the tag is resolved again, nothing else is downloaded.
        let again = ImageStore::new(images.clone()).prepare(&source, Some(&good), &[]).await.unwrap();
        assert_eq!(again, prepared);
        assert_eq!(registry.blob_downloads.load(Ordering::SeqCst), downloads);

        // Pinned by digest, with the manifest in the store: no network at all.
        let index_digest = Digest::sha256_of(&registry.manifests.lock().unwrap()[&("team/app".to_owned(), "v1".to_owned())].1);
        server.abort();
        let _ = server.await;
        let pinned = ImageSource::parse(&format!("{address}/team/app@{index_digest}")).unwrap();
        let offline = ImageStore::new(images).prepare(&pinned, None, &[]).await.unwrap();
        assert_eq!(offline, prepared);
    }

    #[tokio::test]
    async fn registry_failures_are_reported_clearly() {
        let registry = Arc::new(FakeRegistry::default());
        registry.add_image("team/app", "v1", &layers());
        // An image whose layer blob does not match its digest.
        let corrupt_digest =
            registry.add_image("team/corrupt", "v1", &[TestLayer::gzip(TarBuilder::new().file("f", b"1", 0o644).finish())]);
        let corrupt_manifest: serde_json::Value =
            serde_json::from_slice(&registry.manifests.lock().unwrap()[&("team/corrupt".to_owned(), corrupt_digest.clone())].1).unwrap();
        let layer_digest = corrupt_manifest["layers"][0]["digest"].as_str().unwrap().to_owned();
        {
            let mut blobs = registry.blobs.lock().unwrap();
            let layer = blobs.get_mut(&layer_digest).unwrap();
            let last = layer.len() - 1;
            layer[last] ^= 0xff;
        }
        let (address, server) = serve(registry.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path().join("images"));

        let missing = ImageSource::parse(&format!("{address}/team/app:v2")).unwrap();
        let err = store.prepare(&missing, None, &[]).await.unwrap_err();
        assert!(matches!(err, ImageError::NotFound { .. }), "{err}");

        let corrupt = ImageSource::parse(&format!("{address}/team/corrupt:v1")).unwrap();
        let err = store.prepare(&corrupt, None, &[]).await.unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        let stored: Vec<_> = fs::read_dir(dir.path().join("images/blobs/sha256"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(!stored.iter().any(|name| layer_digest.ends_with(name.as_str()) || name.starts_with("tmp-")), "{stored:?}");

        let wrong_pin = ImageSource::parse(&format!("{address}/team/app@sha256:{}", "1".repeat(64))).unwrap();
        let err = store.prepare(&wrong_pin, None, &[]).await.unwrap_err();
        assert!(matches!(err, ImageError::NotFound { .. }), "{err}");

        server.abort();
        let _ = server.await;
        let err = store.prepare(&missing, None, &[]).await.unwrap_err();
        assert!(matches!(err, ImageError::RegistryUnreachable { .. }), "{err}");
    }

    #[test]
    fn loopback_registries_are_recognised() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("127.1.2.3"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example:5000"));
        assert!(!is_loopback("index.docker.io"));
        assert!(!is_loopback("10.0.0.1:5000"));
    }

    #[test]
    fn credentials_stay_out_of_debug_output() {
        let auth = RegistryAuth { username: "me".into(), password: "hunter2".into() };
        assert!(!format!("{auth:?}").contains("hunter2"));
    }
}
