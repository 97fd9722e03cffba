use std::path::{Path, PathBuf};

use crate::Format;

/// Why an image could not be decoded. Every variant that comes from decoding names the
/// file (or, for [`crate::decode_bytes`], the path the caller gave for error messages), so
/// that the engine can record the reason next to the file and keep walking.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Zero bytes.
    #[error("{}: empty file", path.display())]
    Empty { path: PathBuf },

    /// The content matches none of the formats we know (whatever the extension says).
    #[error("{}: not an image (unrecognised content)", path.display())]
    NotAnImage { path: PathBuf },

    /// Recognised, but a format we do not decode (HEIC, AVIF).
    #[error("{}: unsupported format {format}", path.display())]
    UnsupportedFormat { path: PathBuf, format: Format },

    /// A supported format using a feature its decoder lacks (a TIFF compression, a
    /// 12-bit JPEG, …).
    #[error("{}: unsupported {format} image ({detail})", path.display())]
    UnsupportedFeature {
        path: PathBuf,
        format: Format,
        detail: String,
    },

    /// The header declares more pixels than [`crate::DecodeOptions::max_pixels`]. Checked
    /// before any pixel buffer is allocated.
    #[error(
        "{}: image is {width}×{height} = {pixels} pixels, over the limit of {limit} (decompression bomb?)",
        path.display()
    )]
    TooLarge {
        path: PathBuf,
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },

    /// A decoder refused to allocate more than its memory limit (derived from
    /// `max_pixels`) for intermediate buffers.
    #[error("{}: decoder memory limit exceeded ({detail}) (decompression bomb?)", path.display())]
    LimitExceeded { path: PathBuf, detail: String },

    /// The data ends early or is malformed.
    #[error("{}: truncated or corrupt {format} ({detail})", path.display())]
    Corrupt {
        path: PathBuf,
        format: Format,
        detail: String,
    },

    /// Encoding a thumbnail failed (no file involved).
    #[error("cannot encode thumbnail: {0}")]
    Encode(String),
}

impl Error {
    /// The file the error is about, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Error::Io { path, .. }
            | Error::Empty { path }
            | Error::NotAnImage { path }
            | Error::UnsupportedFormat { path, .. }
            | Error::UnsupportedFeature { path, .. }
            | Error::TooLarge { path, .. }
            | Error::LimitExceeded { path, .. }
            | Error::Corrupt { path, .. } => Some(path),
            Error::Encode(_) => None,
        }
    }

    /// Maps an `image` crate error for a file of a known format.
    pub(crate) fn from_image(path: &Path, format: Format, err: image::ImageError) -> Error {
        use image::ImageError as E;
        let path = path.to_path_buf();
        match err {
            E::Limits(e) => Error::LimitExceeded {
                path,
                detail: e.to_string(),
            },
            E::Unsupported(e) => Error::UnsupportedFeature {
                path,
                format,
                detail: e.to_string(),
            },
            // Decoding from memory: an io error can only mean the data ran out.
            E::IoError(e) => Error::Corrupt {
                path,
                format,
                detail: e.to_string(),
            },
            other => Error::Corrupt {
                path,
                format,
                detail: other.to_string(),
            },
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
