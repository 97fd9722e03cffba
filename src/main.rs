//! `magpie`: index folders of photos and search them by meaning, from the command line.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use magpie_core::{Device, ImageEmbedder, TextEmbedder};
use magpie_engine::{IndexOptions, Library, LibraryConfig, SearchHit};
use magpie_models::Clip;
use std::path::PathBuf;
use std::sync::Arc;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_MODEL: &str = "openai/clip-vit-base-patch32";

#[derive(Parser)]
#[command(name = "magpie", version, about = "Self-hosted multimodal image search: find photos by meaning.")]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Global {
    /// Where the library lives (database and indexes). Default: the platform data directory.
    #[arg(long, global = true, env = "MAGPIE_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// CLIP model: a local Hugging Face directory or a hub id (downloaded once).
    #[arg(long, global = true, env = "MAGPIE_MODEL", default_value = DEFAULT_MODEL, value_name = "DIR|ID")]
    model: String,
    /// Where models run: auto, cpu, cuda or cuda:N.
    #[arg(long, global = true, env = "MAGPIE_DEVICE", default_value = "auto")]
    device: Device,
    /// Machine-readable JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Subcommand)]
enum Command {
    /// Index (or update) folders of images: new files are embedded, changed ones
    /// re-embedded, deleted ones retired.
    Index {
        #[arg(required = true, value_name = "DIR")]
        dirs: Vec<PathBuf>,
        /// Images per model call.
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// Refuse images declaring more pixels than this (decompression bombs).
        #[arg(long)]
        max_pixels: Option<u64>,
    },
    /// Find images matching a text.
    Search {
        text: String,
        #[arg(short, default_value_t = 10)]
        k: usize,
    },
    /// Find images that look like an image file or an indexed image id.
    Similar {
        #[arg(value_name = "PATH|ID")]
        target: String,
        #[arg(short, default_value_t = 10)]
        k: usize,
    },
    /// Print the embedding of a text or an image.
    Embed {
        #[arg(long, conflicts_with = "image", required_unless_present = "image")]
        text: Option<String>,
        #[arg(long, value_name = "PATH")]
        image: Option<PathBuf>,
    },
    /// Counts, model and index state of the library.
    Status,
    /// Rebuild the vector index from the database.
    Reindex,
}

fn data_dir(g: &Global) -> Result<PathBuf> {
    if let Some(d) = &g.data_dir {
        return Ok(d.clone());
    }
    let dirs = directories::ProjectDirs::from("", "", "magpie")
        .context("cannot determine a data directory for this platform; pass --data-dir")?;
    Ok(dirs.data_dir().to_path_buf())
}

fn load_model(g: &Global) -> Result<Arc<Clip>> {
    let clip = Clip::load(&g.model, g.device).with_context(|| format!("loading model {}", g.model))?;
    tracing::info!(model = %clip.info().id, dim = clip.info().dim, device = ?clip.device(), "model loaded");
    Ok(Arc::new(clip))
}

async fn open_library(g: &Global, clip: &Clip) -> Result<Library> {
    let dir = data_dir(g)?;
    let lib = Library::open(&dir, clip.info(), LibraryConfig::default()).await?;
    if let magpie_engine::IndexState::Rebuilt(why) = lib.index_state() {
        if lib.indexed_vectors() > 0 {
            eprintln!("note: rebuilt the vector index from the database ({why})");
        }
    }
    Ok(lib)
}

fn print_hits(g: &Global, hits: &[SearchHit]) -> Result<()> {
    if g.json {
        println!("{}", serde_json::to_string_pretty(hits)?);
        return Ok(());
    }
    if hits.is_empty() {
        println!("no results");
    }
    for h in hits {
        let extra = h.taken_at.as_deref().map(|t| format!("  taken {t}")).unwrap_or_default();
        println!("{:>7.4}  {}  (id {}){extra}", h.score, h.path, h.id);
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    let g = cli.global.clone();
    match cli.command {
        Command::Index { dirs, batch_size, max_pixels } => {
            let clip = load_model(&g)?;
            let lib = open_library(&g, &clip).await?;
            let mut opts = IndexOptions { batch_size, ..Default::default() };
            if let Some(m) = max_pixels {
                opts.max_pixels = m;
            }
            let bar = if g.json { ProgressBar::hidden() } else { ProgressBar::new(0) };
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} images  {per_sec}  ETA {eta}  {msg}")
                    .expect("valid template"),
            );
            let embedder: Arc<dyn ImageEmbedder> = clip.clone();
            let report = lib
                .index(&dirs, embedder, &opts, &|p| {
                    bar.set_length(p.total);
                    bar.set_position(p.done);
                    if p.failed > 0 {
                        bar.set_message(format!("{} failed", p.failed));
                    }
                })
                .await?;
            bar.finish_and_clear();
            if g.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{} new, {} updated, {} unchanged, {} removed, {} failed; {} files scanned in {:.1} s ({:.1} images/s)",
                    report.added,
                    report.updated,
                    report.unchanged,
                    report.deleted,
                    report.failed.len(),
                    report.scanned,
                    report.elapsed.as_secs_f64(),
                    report.rate()
                );
                if !report.failed.is_empty() {
                    println!("skipped:");
                    for (p, why) in &report.failed {
                        println!("  {}: {why}", p.display());
                    }
                }
            }
        }
        Command::Search { text, k } => {
            let clip = load_model(&g)?;
            let lib = open_library(&g, &clip).await?;
            if lib.indexed_vectors() == 0 {
                bail!("the library at {} has no images yet: run `magpie index DIR` first", lib.dir().display());
            }
            let hits = lib.search_text(clip.as_ref(), &text, k).await?;
            print_hits(&g, &hits)?;
        }
        Command::Similar { target, k } => {
            let clip = load_model(&g)?;
            let lib = open_library(&g, &clip).await?;
            let path = PathBuf::from(&target);
            let hits = if path.exists() {
                lib.similar_to_file(&path, clip.as_ref(), k).await?
            } else if let Ok(id) = target.parse::<i64>() {
                lib.similar_to_id(id, k).await?
            } else {
                bail!("{target}: no such file, and not an image id");
            };
            print_hits(&g, &hits)?;
        }
        Command::Embed { text, image } => {
            let clip = load_model(&g)?;
            let vector = match (text, image) {
                (Some(t), _) => clip.embed_texts(&[t.as_str()])?.remove(0),
                (None, Some(p)) => magpie_engine::embed_file(&p, clip.as_ref())?,
                (None, None) => bail!("pass --text or --image"),
            };
            if g.json {
                let out = serde_json::json!({ "model": clip.info().id, "dim": vector.len(), "vector": vector });
                println!("{out}");
            } else {
                let s: Vec<String> = vector.iter().map(|v| format!("{v:.6}")).collect();
                println!("{}", s.join(" "));
            }
        }
        Command::Status => {
            let dir = data_dir(&g)?;
            match Library::status(&dir, Default::default()).await? {
                None => {
                    if g.json {
                        println!("{}", serde_json::json!({ "data_dir": dir, "library": null }));
                    } else {
                        println!("no library at {} yet: run `magpie index DIR`", dir.display());
                    }
                }
                Some(s) if g.json => println!("{}", serde_json::to_string_pretty(&s)?),
                Some(s) => {
                    println!("library   {}", s.data_dir.display());
                    match &s.model {
                        Some(m) => println!("model     {} ({}-d)", m.id, m.dim),
                        None => println!("model     (none yet)"),
                    }
                    println!(
                        "images    {} indexed, {} failed, {} pending, {} removed",
                        s.counts.indexed, s.counts.failed, s.counts.pending, s.counts.deleted
                    );
                    for r in &s.roots {
                        println!("folder    {}", r.display());
                    }
                    match &s.index {
                        Some(i) if i.up_to_date => {
                            println!("index     {:?}, {} vectors, up to date (generation {})", i.kind, i.vectors, i.generation)
                        }
                        Some(_) => println!("index     stale: it will be rebuilt from the database on next use (or run `magpie reindex`)"),
                        None => println!("index     not built yet"),
                    }
                    println!("device    {}", describe_device(g.device));
                }
            }
        }
        Command::Reindex => {
            let clip = load_model(&g)?;
            let lib = open_library(&g, &clip).await?;
            let n = lib.rebuild_index().await?;
            if g.json {
                println!("{}", serde_json::json!({ "vectors": n }));
            } else {
                println!("rebuilt the vector index: {n} vectors");
            }
        }
    }
    Ok(())
}

fn describe_device(d: Device) -> String {
    match magpie_models::select_device(d) {
        Ok(dev) if dev.is_cpu() => format!("cpu (asked: {d})"),
        Ok(dev) => format!("{dev:?} (asked: {d})"),
        Err(e) => format!("unavailable: {e}"),
    }
}

fn main() {
    // Die quietly on a closed pipe (`magpie search … | head`) like other Unix tools.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let level = match cli.global.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into()))
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
