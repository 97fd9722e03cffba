use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("{path}: cannot load tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("model `{model}` not found: {message}")]
    NotFound { model: String, message: String },
    #[error(
        "could not download model `{model}` from the Hugging Face hub ({message}). If this machine \
         is offline, fetch the model directory elsewhere (config.json, model.safetensors, \
         tokenizer.json, preprocessor_config.json) and pass its path: --model /path/to/dir"
    )]
    Download { model: String, message: String },
    #[error("CUDA was requested but this magpie was built without CUDA support; rebuild with `--features cuda` (see README) or use --device cpu")]
    CudaNotCompiled,
    #[error("device error: {0}")]
    Device(String),
    #[error("tokenizer: {0}")]
    Tokenize(String),
    #[error("image preprocessing: {0}")]
    Preprocess(String),
    #[error("generation: {0}")]
    Generate(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for magpie_core::Error {
    fn from(e: Error) -> Self {
        magpie_core::Error::Model(e.to_string())
    }
}
