//! Builders for the tests: layer tarballs (including malicious ones the `tar` crate would not
//! write), OCI image layouts and docker-archive tarballs, made on the fly.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::image::digest::Digest;

/// The mtime of every test entry.
pub(crate) const MTIME: u64 = 1_700_000_000;

/// A layer tarball under construction.
pub(crate) struct TarBuilder {
    builder: tar::Builder<Vec<u8>>,
}

impl TarBuilder {
    pub(crate) fn new() -> TarBuilder {
        TarBuilder { builder: tar::Builder::new(Vec::new()) }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(MTIME);
        header
    }

    pub(crate) fn dir(mut self, path: &str, mode: u32) -> TarBuilder {
        let mut header = Self::header(tar::EntryType::Directory, mode, 0);
        self.builder.append_data(&mut header, path, &[][..]).unwrap();
        self
    }

    pub(crate) fn file(mut self, path: &str, data: &[u8], mode: u32) -> TarBuilder {
        let mut header = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.builder.append_data(&mut header, path, data).unwrap();
        self
    }

    pub(crate) fn file_owned(mut self, path: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> TarBuilder {
        let mut header = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        header.set_uid(uid);
        header.set_gid(gid);
        self.builder.append_data(&mut header, path, data).unwrap();
        self
    }

    /// An empty file named `.wh.NAME` (or `.wh..wh..opq`).
    pub(crate) fn whiteout(self, path: &str) -> TarBuilder {
        self.file(path, b"", 0o644)
    }

    pub(crate) fn symlink(mut self, path: &str, target: &str) -> TarBuilder {
        let mut header = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.builder.append_link(&mut header, path, target).unwrap();
        self
    }

    pub(crate) fn hard_link(mut self, path: &str, target: &str) -> TarBuilder {
        let mut header = Self::header(tar::EntryType::Link, 0o644, 0);
        self.builder.append_link(&mut header, path, target).unwrap();
        self
    }

    /// A file whose name is written as is (the tar crate refuses `..` when building).
    pub(crate) fn raw_file(mut self, path: &str, data: &[u8], mode: u32) -> TarBuilder {
        let mut header = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        set_raw_name(&mut header, path);
        self.builder.append(&header, data).unwrap();
        self
    }

    pub(crate) fn raw_hard_link(mut self, path: &str, target: &str) -> TarBuilder {
        let mut header = Self::header(tar::EntryType::Link, 0o644, 0);
        set_raw_name(&mut header, path);
        header.set_link_name(target).unwrap();
        header.set_cksum();
        self.builder.append(&header, &[][..]).unwrap();
        self
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }
}

fn set_raw_name(header: &mut tar::Header, path: &str) {
    let name = &mut header.as_old_mut().name;
    name.fill(0);
    name[..path.len()].copy_from_slice(path.as_bytes());
    header.set_cksum();
}

pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

pub(crate) const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub(crate) const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A layer for the image builders: its uncompressed tar and how to store it.
pub(crate) struct TestLayer {
    pub(crate) media_type: &'static str,
    pub(crate) tar: Vec<u8>,
}

impl TestLayer {
    pub(crate) fn gzip(tar: Vec<u8>) -> TestLayer {
        TestLayer { media_type: LAYER_GZIP, tar }
    }

    fn stored_bytes(&self) -> Vec<u8> {
        if self.media_type.ends_with("gzip") {
            gzip(&self.tar)
        } else {
            self.tar.clone()
        }
    }
}

pub(crate) fn test_config(layers: &[TestLayer]) -> Value {
    let diff_ids: Vec<String> = layers.iter().map(|layer| Digest::sha256_of(&layer.tar).to_string()).collect();
    json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/app"], "Env": ["PATH=/bin"], "WorkingDir": "/srv", "ExposedPorts": {"8080/tcp": {}}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
}

/// An OCI image layout directory under construction.
pub(crate) struct OciLayoutBuilder {
    pub(crate) dir: PathBuf,
    index_entries: Vec<Value>,
}

impl OciLayoutBuilder {
    pub(crate) fn new(dir: &Path) -> OciLayoutBuilder {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        OciLayoutBuilder { dir: dir.to_owned(), index_entries: Vec::new() }
    }

    /// Stores a blob; returns its descriptor fields.
    pub(crate) fn blob(&self, bytes: &[u8]) -> (Digest, usize) {
        let digest = Digest::sha256_of(bytes);
        fs::write(self.blob_path(&digest), bytes).unwrap();
        (digest, bytes.len())
    }

    pub(crate) fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(&digest.hex)
    }

    /// Adds an image (manifest, config, layers), listed in index.json under `tag`; returns the
    /// manifest digest.
    pub(crate) fn image(&mut self, tag: Option<&str>, layers: &[TestLayer]) -> Digest {
        let (config_digest, config_size) = self.blob(&serde_json::to_vec(&test_config(layers)).unwrap());
        let layer_descriptors: Vec<Value> = layers
            .iter()
            .map(|layer| {
                let (digest, size) = self.blob(&layer.stored_bytes());
                json!({"mediaType": layer.media_type, "digest": digest.to_string(), "size": size})
            })
            .collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config_size},
            "layers": layer_descriptors,
        });
        let (digest, size) = self.blob(&serde_json::to_vec(&manifest).unwrap());
        let mut entry = json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest.to_string(), "size": size});
        if let Some(tag) = tag {
            entry["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        }
        self.index_entries.push(entry);
        self.write_index();
        digest
    }

    fn write_index(&self) {
        let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": self.index_entries});
        fs::write(self.dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    }
}

/// Writes a docker-archive (legacy `docker save` layout) holding one image per
/// `(repo_tags, layers)`; layers are stored gzipped when `gzip_layers`.
pub(crate) fn docker_archive(path: &Path, images: &[(&[&str], Vec<TestLayer>)], gzip_layers: bool) {
    let mut builder = tar::Builder::new(Vec::new());
    let mut manifest = Vec::new();
    let add = |builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        builder.append_data(&mut header, name, data).unwrap();
    };
    for (tags, layers) in images {
        let config = serde_json::to_vec(&test_config(layers)).unwrap();
        let config_name = format!("{}.json", Digest::sha256_of(&config).hex);
        add(&mut builder, &config_name, &config);
        let mut layer_names = Vec::new();
        for layer in layers {
            let id = Digest::sha256_of(&layer.tar).hex;
            let name = format!("{id}/layer.tar");
            let data = if gzip_layers { gzip(&layer.tar) } else { layer.tar.clone() };
            add(&mut builder, &name, &data);
            layer_names.push(name);
        }
        manifest.push(json!({"Config": config_name, "RepoTags": tags, "Layers": layer_names}));
    }
    add(&mut builder, "manifest.json", &serde_json::to_vec(&manifest).unwrap());
    fs::write(path, builder.into_inner().unwrap()).unwrap();
}
