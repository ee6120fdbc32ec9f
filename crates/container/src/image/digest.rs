//! Content digests (`sha256:<hex>`, `sha512:<hex>`): strict parsing, since a digest taken from
//! a manifest becomes a file name in the store, and hashing of what is read or written.

use std::fmt;
use std::io::{self, Read};

use sha2::{Digest as _, Sha256, Sha512};

/// A validated content digest. Only lowercase hex of the algorithm's exact length is accepted,
/// so `algorithm` and `hex` are safe to use as path components.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Digest {
    pub(crate) algorithm: Algorithm,
    pub(crate) hex: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

impl Digest {
    /// Parses `algo:hex`; the error says what is wrong, for messages about the image.
    pub(crate) fn parse(text: &str) -> Result<Digest, String> {
        let Some((algorithm, hex)) = text.split_once(':') else {
            return Err(format!("`{text}` is not a digest (expected sha256:<hex>)"));
        };
        let algorithm = match algorithm {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => return Err(format!("digest algorithm `{other}` is not supported (only sha256 and sha512)")),
        };
        let well_formed = hex.len() == algorithm.hex_len() && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !well_formed {
            return Err(format!("`{text}` is not a well-formed {} digest", algorithm.name()));
        }
        Ok(Digest { algorithm, hex: hex.to_owned() })
    }

    pub(crate) fn sha256_of(bytes: &[u8]) -> Digest {
        let mut hasher = Hasher::new(Algorithm::Sha256);
        hasher.update(bytes);
        hasher.finish()
    }

    /// `sha256-<hex>`: the name of this image's unpacked root filesystem directory.
    pub(crate) fn dir_name(&self) -> String {
        format!("{}-{}", self.algorithm.name(), self.hex)
    }

    /// A short form for logs: `sha256:0123456789ab`.
    pub(crate) fn short(&self) -> String {
        format!("{}:{}", self.algorithm.name(), &self.hex[..12])
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

/// An incremental hash of either algorithm.
pub(crate) enum Hasher {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    pub(crate) fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(hasher) => hasher.update(bytes),
            Hasher::Sha512(hasher) => hasher.update(bytes),
        }
    }

    pub(crate) fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(hasher) => Digest { algorithm: Algorithm::Sha256, hex: hex::encode(hasher.finalize()) },
            Hasher::Sha512(hasher) => Digest { algorithm: Algorithm::Sha512, hex: hex::encode(hasher.finalize()) },
        }
    }
}

/// A reader that hashes and counts every byte read through it.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    bytes_read: u64,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R, algorithm: Algorithm) -> HashingReader<R> {
        HashingReader { inner, hasher: Hasher::new(algorithm), bytes_read: 0 }
    }

    /// Reads the rest of the stream, so that the digest covers all of it.
    pub(crate) fn drain(&mut self) -> io::Result<()> {
        io::copy(self, &mut io::sink()).map(drop)
    }

    /// The inner reader, the digest of what was read, and how many bytes that was.
    pub(crate) fn finish(self) -> (R, Digest, u64) {
        (self.inner, self.hasher.finish(), self.bytes_read)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes_read += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_well_formed_digests() {
        let hex = "a".repeat(64);
        let digest = Digest::parse(&format!("sha256:{hex}")).unwrap();
        assert_eq!(digest.dir_name(), format!("sha256-{hex}"));
        assert!(Digest::parse(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(Digest::parse("sha256:abc").is_err());
        assert!(Digest::parse(&format!("md5:{hex}")).unwrap_err().contains("not supported"));
        assert!(Digest::parse(&format!("sha256:../{}", "a".repeat(61))).is_err());
        assert!(Digest::parse(&format!("sha512:{}", "0".repeat(128))).is_ok());
    }

    #[test]
    fn hashing_reader_covers_the_whole_stream() {
        let data = b"hello world".to_vec();
        let mut reader = HashingReader::new(&data[..], Algorithm::Sha256);
        let mut first = [0u8; 5];
        reader.read_exact(&mut first).unwrap();
        reader.drain().unwrap();
        let (_, digest, n) = reader.finish();
        assert_eq!(n, 11);
        assert_eq!(digest, Digest::sha256_of(&data));
    }
}
