//! Multipart uploads, streamed straight into the session's data directory.
//!
//! The boundary comes from `Content-Type` when it is `multipart/form-data`; otherwise it is
//! read from the body's first line. Semantic Kernel sends multipart bodies labelled
//! `application/json` (contract §0.4), so sniffing is required, not a nicety. Every part with a
//! filename is stored (names relative to `/mnt/data`, a `/mnt/data/` prefix stripped); a file
//! larger than the limit is removed again and the request fails with 413.

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, StreamExt};
use sandpool_engine::backend::{FileEntry, FileError};
use sandpool_engine::path::DataPath;
use sandpool_engine::session::SessionFiles;
use tokio::io::AsyncWriteExt;

use crate::error::{code, ApiError};

/// A multipart boundary line is at most 70 characters plus `--` and CRLF (RFC 2046).
const MAX_BOUNDARY_LINE: usize = 80;

type BodyStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// Stores every file part of `body` under `dir` and returns the stored files, in order.
pub async fn receive(
    headers: &HeaderMap,
    body: Body,
    dir: &DataPath,
    files: SessionFiles,
    max_file_bytes: u64,
) -> Result<Vec<FileEntry>, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            code::TOO_LARGE,
            format!("the upload is larger than the {} MiB limit", max_file_bytes >> 20),
        )
    };
    if let Some(length) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()) {
        // Room for the multipart framing around one maximum-size file.
        if length > max_file_bytes + (1 << 20) {
            return Err(too_large());
        }
    }
    let mut stream: BodyStream = Box::pin(body.into_data_stream().map(|chunk| chunk.map_err(std::io::Error::other)));
    let declared = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.trim_start().to_ascii_lowercase().starts_with("multipart/"))
        .and_then(|v| multer::parse_boundary(v).ok());
    let boundary = match declared {
        Some(boundary) => boundary,
        None => {
            let (boundary, replay) = sniff_boundary(&mut stream).await?;
            stream = Box::pin(stream::once(async move { Ok::<_, std::io::Error>(replay) }).chain(stream));
            boundary
        }
    };
    let constraints = multer::Constraints::new()
        .size_limit(multer::SizeLimit::new().whole_stream(max_file_bytes * 4 + (1 << 20)).per_field(max_file_bytes + 1));
    let mut multipart = multer::Multipart::with_constraints(stream, boundary, constraints);
    match store_all(&mut multipart, dir, &files, max_file_bytes, &too_large).await {
        Ok(stored) => Ok(stored),
        Err(err) => {
            // Read what the client is still sending, so that it gets this answer instead of a
            // connection closed under its upload.
            drain(&mut multipart, max_file_bytes * 2).await;
            Err(err)
        }
    }
}

async fn store_all(
    multipart: &mut multer::Multipart<'static>,
    dir: &DataPath,
    files: &SessionFiles,
    max_file_bytes: u64,
    too_large: &(dyn Fn() -> ApiError + Sync),
) -> Result<Vec<FileEntry>, ApiError> {
    let mut stored = Vec::new();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(err) => return Err(multipart_error(err, too_large)),
        };
        let Some(file_name) = field.file_name().map(str::to_owned) else { continue };
        let path = DataPath::parse_in(Some(&dir.as_relative()), &file_name)?;
        if path.is_root() {
            return Err(ApiError::validation(format!("the upload's filename {file_name:?} does not name a file")));
        }
        stored.push(store_field(field, &path, files, max_file_bytes, too_large).await?);
    }
    if stored.is_empty() {
        return Err(ApiError::validation("the upload has no file; send multipart/form-data with a part named 'file' that has a filename"));
    }
    Ok(stored)
}

/// Discards the rest of a multipart body, up to `limit` bytes.
async fn drain(multipart: &mut multer::Multipart<'static>, limit: u64) {
    let mut read: u64 = 0;
    while let Ok(Some(mut field)) = multipart.next_field().await {
        while let Ok(Some(chunk)) = field.chunk().await {
            read += chunk.len() as u64;
            if read > limit {
                return;
            }
        }
    }
}

async fn store_field(
    mut field: multer::Field<'static>,
    path: &DataPath,
    files: &SessionFiles,
    max: u64,
    too_large: &(dyn Fn() -> ApiError + Sync),
) -> Result<FileEntry, ApiError> {
    let create_files = files.clone();
    let create_path = path.clone();
    let file = tokio::task::spawn_blocking(move || create_files.store().create(&create_path)).await.map_err(ApiError::internal)??;
    let mut file = tokio::fs::File::from_std(file);
    let mut written: u64 = 0;
    let outcome: Result<(), ApiError> = async {
        loop {
            let chunk = match field.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(err) => return Err(multipart_error(err, too_large)),
            };
            written += chunk.len() as u64;
            if written > max {
                return Err(too_large());
            }
            file.write_all(&chunk).await.map_err(write_error)?;
        }
        file.flush().await.map_err(write_error)
    }
    .await;
    drop(file);
    let stat_files = files.clone();
    let stat_path = path.clone();
    if let Err(err) = outcome {
        // Never leave a truncated file behind.
        let _ = tokio::task::spawn_blocking(move || stat_files.store().delete(&stat_path)).await;
        return Err(err);
    }
    Ok(tokio::task::spawn_blocking(move || stat_files.store().stat(&stat_path)).await.map_err(ApiError::internal)??)
}

fn write_error(err: std::io::Error) -> ApiError {
    match err.raw_os_error() {
        Some(libc_enospc) if libc_enospc == 28 || libc_enospc == 122 => FileError::NoSpace.into(),
        _ => FileError::Io(err).into(),
    }
}

fn multipart_error(err: multer::Error, too_large: &(dyn Fn() -> ApiError + Sync)) -> ApiError {
    match err {
        multer::Error::FieldSizeExceeded { .. } | multer::Error::StreamSizeExceeded { .. } => too_large(),
        other => ApiError::validation(format!("the multipart body is malformed: {other}")),
    }
}

/// Reads the body's first line, `--<boundary>`, and returns the boundary plus the bytes read
/// so far (to be replayed in front of the rest of the stream).
async fn sniff_boundary(stream: &mut BodyStream) -> Result<(String, Bytes), ApiError> {
    let not_multipart = || {
        ApiError::validation(
            "uploads must be multipart/form-data with a part named 'file' (the body does not start with a multipart boundary)",
        )
    };
    let mut seen = BytesMut::new();
    while !seen.windows(2).any(|w| w == b"\r\n") {
        if seen.len() > MAX_BOUNDARY_LINE + 2 {
            return Err(not_multipart());
        }
        match stream.next().await {
            Some(Ok(chunk)) => seen.extend_from_slice(&chunk),
            Some(Err(err)) => return Err(ApiError::validation(format!("could not read the request body: {err}"))),
            None => return Err(not_multipart()),
        }
    }
    let end = seen.windows(2).position(|w| w == b"\r\n").expect("found above");
    let line = std::str::from_utf8(&seen[..end]).map_err(|_| not_multipart())?;
    let boundary =
        line.strip_prefix("--").filter(|b| !b.is_empty() && b.len() <= 70 && !b.contains(' ')).ok_or_else(not_multipart)?.to_owned();
    Ok((boundary, seen.freeze()))
}
