//! Finding and reading model files: a local Hugging Face directory or the hub cache, and
//! strict safetensors loading that names every missing, misshapen or unused tensor.

use crate::{Error, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A model checkpoint directory in the Hugging Face layout.
#[derive(Debug, Clone)]
pub struct ModelDir {
    /// The id the user gave (hub id or directory), kept as the library's model id.
    pub id: String,
    pub dir: PathBuf,
}

impl ModelDir {
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The safetensors shards: `model.safetensors`, or those named by
    /// `model.safetensors.index.json`.
    pub fn weight_files(&self) -> Result<Vec<PathBuf>> {
        let single = self.file("model.safetensors");
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = self.file("model.safetensors.index.json");
        if index.is_file() {
            return Ok(shard_names(&index)?.into_iter().map(|s| self.file(&s)).collect());
        }
        let hint = if self.file("pytorch_model.bin").is_file() {
            " (only pytorch_model.bin is present: convert it to safetensors)"
        } else {
            ""
        };
        Err(Error::NotFound {
            model: self.id.clone(),
            message: format!("{} has no model.safetensors{hint}", self.dir.display()),
        })
    }
}

/// Resolves `model` (a local directory or a hub id such as `openai/clip-vit-base-patch32`)
/// to a directory holding `required` files (and `optional` ones when the hub has them).
/// Hub files are downloaded once into the Hugging Face cache (`HF_HOME`); with
/// `HF_HUB_OFFLINE=1`, or when they are all cached already, no network is used.
pub fn resolve(model: &str, required: &[&str], optional: &[&str]) -> Result<ModelDir> {
    let path = Path::new(model);
    if path.is_dir() {
        for f in required {
            if !path.join(f).is_file() && !(f.ends_with(".safetensors") && path.join(format!("{f}.index.json")).is_file()) {
                return Err(Error::NotFound {
                    model: model.into(),
                    message: format!("{} has no {f}", path.display()),
                });
            }
        }
        return Ok(ModelDir { id: model.into(), dir: path.to_path_buf() });
    }
    let looks_like_path = model.starts_with(['/', '.', '~']) || model.contains('\\') || model.matches('/').count() != 1;
    if looks_like_path {
        return Err(Error::NotFound {
            model: model.into(),
            message: "no such directory (a hub id looks like `owner/name`)".into(),
        });
    }
    from_hub(model, required, optional)
}

fn from_hub(model: &str, required: &[&str], optional: &[&str]) -> Result<ModelDir> {
    let cache = hf_hub::Cache::from_env();
    let cached = cache.model(model.to_string());
    let mut dir = None;
    let mut missing = Vec::new();
    for f in required {
        match cached.get(f).or_else(|| cached_shards(&cached, f)) {
            Some(p) => dir = p.parent().map(Path::to_path_buf),
            None => missing.push(*f),
        }
    }
    if missing.is_empty() {
        if let Some(dir) = dir {
            return Ok(ModelDir { id: model.into(), dir });
        }
    }
    let offline = std::env::var("HF_HUB_OFFLINE").map(|v| v == "1" || v.eq_ignore_ascii_case("true")).unwrap_or(false);
    if offline {
        return Err(Error::Download {
            model: model.into(),
            message: format!("HF_HUB_OFFLINE is set and {} is not in the cache", missing.join(", ")),
        });
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| Error::Download { model: model.into(), message: e.to_string() })?;
    let repo = api.model(model.to_string());
    let mut dir = None;
    for f in required {
        let p = match repo.get(f) {
            Ok(p) => p,
            // Big checkpoints are sharded: `<f>.index.json` names the shards.
            Err(e) if f.ends_with(".safetensors") => {
                let index = repo.get(&format!("{f}.index.json")).map_err(|_| Error::Download { model: model.into(), message: format!("{f}: {e}") })?;
                for shard in shard_names(&index)? {
                    repo.get(&shard).map_err(|e| Error::Download { model: model.into(), message: format!("{shard}: {e}") })?;
                }
                index
            }
            Err(e) => return Err(Error::Download { model: model.into(), message: format!("{f}: {e}") }),
        };
        dir = p.parent().map(Path::to_path_buf);
    }
    for f in optional {
        let _ = repo.get(f);
    }
    let dir = dir.ok_or_else(|| Error::NotFound { model: model.into(), message: "no files requested".into() })?;
    Ok(ModelDir { id: model.into(), dir })
}

/// The cached index of a sharded `f` (`f.index.json`), if it and all its shards are cached.
fn cached_shards(cached: &hf_hub::CacheRepo, f: &str) -> Option<PathBuf> {
    if !f.ends_with(".safetensors") {
        return None;
    }
    let index = cached.get(&format!("{f}.index.json"))?;
    let shards = shard_names(&index).ok()?;
    shards.iter().all(|s| cached.get(s).is_some()).then_some(index)
}

/// The shard files named by a `model.safetensors.index.json`.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    let json = read_json(index)?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::Config {
        path: index.to_path_buf(),
        message: "missing `weight_map`".into(),
    })?;
    let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    Ok(shards.into_iter().map(str::to_string).collect())
}

/// The id stored with a library: the hub id, or for a local directory its name plus a
/// fingerprint of its config and weights header, so that moving the directory keeps the
/// id while a different model gets a different one.
pub fn model_id(dir: &ModelDir) -> String {
    if !Path::new(&dir.id).is_dir() {
        return dir.id.clone();
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    feed(&std::fs::read(dir.file("config.json")).unwrap_or_default());
    for f in dir.weight_files().unwrap_or_default() {
        feed(&std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0).to_le_bytes());
        if let Ok(mut file) = std::fs::File::open(&f) {
            use std::io::Read;
            let mut head = vec![0u8; 1 << 16];
            let n = file.read(&mut head).unwrap_or(0);
            feed(&head[..n]);
        }
    }
    let name = std::fs::canonicalize(&dir.dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.id.clone());
    format!("{name}@{:08x}", (h ^ (h >> 32)) as u32)
}

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.into(), source })?;
    let mut v: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| Error::Json { path: path.into(), source })?;
    strip_nulls(&mut v);
    Ok(v)
}

/// Old `config.json` files carry `null` for many keys; treat them as absent so that serde
/// defaults apply.
fn strip_nulls(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(path: &Path, v: serde_json::Value) -> Result<T> {
    serde_json::from_value(v).map_err(|source| Error::Json { path: path.into(), source })
}

/// Safetensors weights that remember which tensors were asked for, so that after building
/// a model we can insist every tensor in the files was used.
#[derive(Clone)]
pub struct CheckedWeights {
    inner: Arc<candle_core::safetensors::MmapedSafetensors>,
    used: Arc<Mutex<BTreeSet<String>>>,
    paths: Vec<PathBuf>,
}

impl CheckedWeights {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        for p in paths {
            if !p.is_file() {
                return Err(Error::Weights { path: p.clone(), message: "file not found".into() });
            }
        }
        // SAFETY: the files are memory-mapped read-only; magpie never writes model files
        // while they are mapped (the usual caveat of mmap: another process truncating
        // the file would fault).
        let inner = unsafe { candle_core::safetensors::MmapedSafetensors::multi(paths) }
            .map_err(|e| Error::Weights { path: paths.first().cloned().unwrap_or_default(), message: e.to_string() })?;
        Ok(Self { inner: Arc::new(inner), used: Default::default(), paths: paths.to_vec() })
    }

    fn display_path(&self) -> PathBuf {
        match self.paths.as_slice() {
            [one] => one.clone(),
            _ => self.paths.first().and_then(|p| p.parent()).map(Path::to_path_buf).unwrap_or_default(),
        }
    }

    /// A var builder over these weights in `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> candle_nn::VarBuilder<'static> {
        candle_nn::VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// Names of tensors in the files that no module asked for (besides `ignore`d ones).
    pub fn unused(&self, ignore: &dyn Fn(&str) -> bool) -> Vec<String> {
        let used = self.used.lock().expect("poisoned");
        let mut names: Vec<String> =
            self.inner.tensors().into_iter().map(|(n, _)| n).filter(|n| !used.contains(n) && !ignore(n)).collect();
        names.sort();
        names
    }

    /// Fails, naming them, if any tensor of the files was left unused.
    pub fn ensure_all_used(&self, ignore: &dyn Fn(&str) -> bool) -> Result<()> {
        let unused = self.unused(ignore);
        if unused.is_empty() {
            return Ok(());
        }
        let shown: Vec<_> = unused.iter().take(10).cloned().collect();
        Err(Error::Weights {
            path: self.display_path(),
            message: format!(
                "{} unexpected tensor(s) not used by the model (wrong architecture or config?): {}{}",
                unused.len(),
                shown.join(", "),
                if unused.len() > 10 { ", …" } else { "" }
            ),
        })
    }

    /// Converts a candle error raised while building a model into one naming the file.
    pub fn wrap(&self, e: candle_core::Error) -> Error {
        let msg = match e {
            candle_core::Error::WithBacktrace { inner, .. } => inner.to_string(),
            other => other.to_string(),
        };
        Error::Weights { path: self.display_path(), message: msg }
    }
}

/// Drops the mapped file pages of a tensor that has been copied out, so that loading a
/// checkpoint does not hold the whole file resident next to the converted weights (a
/// 15.5 GB f32 BLIP-2 loaded in f16 would otherwise peak at 23 GB). The mapping is
/// read-only and the file is not modified, so a later read of these pages re-faults the
/// same bytes from the page cache or the disk.
fn release_pages(data: &[u8]) {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let start = data.as_ptr() as usize;
        // Only whole pages inside the tensor: its neighbours stay mapped in.
        let first = start.div_ceil(page) * page;
        let end = (start + data.len()) / page * page;
        if end > first {
            // SAFETY: [first, end) lies inside the read-only file mapping `data` borrows
            // from; MADV_DONTNEED on a file-backed mapping only discards this process's
            // page-table entries.
            unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED);
            }
        }
    }
    #[cfg(not(unix))]
    let _ = data;
}

impl SimpleBackend for CheckedWeights {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!("tensor `{name}` has shape {:?}, the config expects {:?}", t.dims(), s.dims());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let view = self.inner.get(name).map_err(|_| candle_core::Error::Msg(format!("missing tensor `{name}`")))?;
        let t = candle_core::safetensors::Load::load(&view, dev)?.to_dtype(dtype)?;
        release_pages(view.data());
        self.used.lock().expect("poisoned").insert(name.to_string());
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.get(name).is_ok()
    }
}
