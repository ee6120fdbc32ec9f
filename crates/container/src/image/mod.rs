//! Container images: where they come from and how they become a root filesystem.
//!
//! [`ImageSource::parse`] reads the pool config's `image` string; [`ImageStore::prepare`]
//! fetches the image (registry), or reads it in place (OCI layout, docker-archive), checks
//! every digest, and unpacks it once per manifest digest into a root filesystem that sessions
//! share read-only (each session adds its own overlay on top).
//!
//! Modules: `reference` (the `image` string), `store` (the directory layout, locking,
//! `prepare`), `registry` (pulls), `layout` (OCI layout directories), `archive` (`docker save`
//! tarballs), `manifest` (the JSON documents), `unpack` (layers, whiteouts, and keeping every
//! write inside the root), `digest`, `error`.

mod archive;
mod digest;
mod error;
mod layout;
mod manifest;
mod reference;
mod registry;
mod store;
#[cfg(test)]
mod test_support;
mod unpack;

pub use error::ImageError;
pub use manifest::ImageConfig;
pub use reference::ImageSource;
pub use registry::RegistryAuth;
pub use store::{ImageStore, PreparedImage};
