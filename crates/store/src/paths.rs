//! Paths are stored twice: `path_bytes` (the raw OS bytes, the identity, round-trips
//! non-UTF-8 names on Unix) and `path` (lossy UTF-8 text, for display and SQL users).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

#[cfg(unix)]
pub(crate) fn to_bytes(path: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes().to_vec()
}

#[cfg(unix)]
pub(crate) fn from_bytes(bytes: Vec<u8>) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(bytes))
}

// Elsewhere (Windows) a path that is not valid Unicode is stored lossily.
#[cfg(not(unix))]
pub(crate) fn to_bytes(path: &Path) -> Vec<u8> {
    path.to_string_lossy().into_owned().into_bytes()
}

#[cfg(not(unix))]
pub(crate) fn from_bytes(bytes: Vec<u8>) -> PathBuf {
    PathBuf::from(String::from_utf8_lossy(&bytes).into_owned())
}

pub(crate) fn to_text(path: &Path) -> Cow<'_, str> {
    path.to_string_lossy()
}
