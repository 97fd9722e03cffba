use std::path::PathBuf;

/// Error kinds shared across crates. Library crates wrap these in their own enums.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("embedding of model `{model}` has dimension {got}, expected {expected}")]
    Dimension { model: String, expected: usize, got: usize },
    #[error("embedding from model `{got}` cannot be used with model `{expected}`")]
    ModelMismatch { expected: String, got: String },
    #[error("embedding blob has {0} bytes, not a multiple of 4")]
    BadBlob(usize),
    #[error("embedding contains a non-finite value")]
    NonFinite,
    #[error("invalid device `{0}`: expected auto, cpu, cuda or cuda:N")]
    BadDevice(String),
    #[error("{path}: {message}")]
    WithPath { path: PathBuf, message: String },
    #[error("{0}")]
    Model(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
