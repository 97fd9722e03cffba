//! `magpie`: index folders of photos and search them by meaning, from the command line.

mod bench;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use magpie_core::{Captioner, Device, GenerationOptions, ImageEmbedder, ImageId, TextEmbedder, VisualChat};
use magpie_engine::{CaptionOptions, CaptionReport, IndexOptions, Library, LibraryConfig, SearchHit, SearchMode};
use magpie_models::blip2::Precision;
use magpie_models::{Blip2, Clip, ClipPrecision};
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_MODEL: &str = "openai/clip-vit-base-patch32";
const DEFAULT_CAPTION_MODEL: &str = "Salesforce/blip2-opt-2.7b";

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
    /// How CLIP computes on a CPU: auto (bf16 where the CPU has BF16 dot products, AVX-512
    /// BF16 or AMX tiles, and a short race at load finds them faster than f32; else f32),
    /// f32 or bf16. Embeddings agree with f32 to cosine ≥ 0.999.
    #[arg(long, global = true, env = "MAGPIE_PRECISION", default_value = "auto", value_name = "PRECISION")]
    precision: ClipPrecision,
    /// Captioning and chat model (BLIP-2): a local Hugging Face directory or a hub id.
    #[arg(long, global = true, env = "MAGPIE_CAPTION_MODEL", default_value = DEFAULT_CAPTION_MODEL, value_name = "DIR|ID")]
    caption_model: String,
    /// How BLIP-2 is held and computed: auto (q8_0 on a CPU, f16 on a GPU), f32, f16,
    /// bf16, or the language model quantized to q8_0, q6_k, q5_k or q4_k, and then on a
    /// CPU the vision encoder on int8 kernels too (smaller and faster, slightly different
    /// text; see the README).
    #[arg(long, global = true, env = "MAGPIE_CAPTION_PRECISION", default_value = "auto", value_name = "PRECISION", value_parser = parse_precision)]
    caption_precision: PrecisionArg,
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
        /// Then caption the images that have no caption yet (BLIP-2; slower).
        #[arg(long)]
        captions: bool,
        /// Then keep following the folders: new, changed, moved and deleted files are
        /// indexed within seconds of the change (file-system events), until Ctrl-C.
        #[arg(long)]
        watch: bool,
        /// With --watch, when events cannot be had (e.g. the inotify limit): seconds
        /// between full rescans.
        #[arg(long, default_value_t = 300, value_name = "SECS")]
        rescan_every: u64,
        #[command(flatten)]
        generation: GenerationArgs,
    },
    /// Find images matching a text.
    Search {
        text: String,
        #[arg(short, default_value_t = 10)]
        k: usize,
        /// vector: CLIP only; text: words in captions and file/folder names (BM25);
        /// hybrid: both, fused by reciprocal rank.
        #[arg(long, default_value_t = SearchMode::Hybrid)]
        mode: SearchMode,
    },
    /// Caption every indexed image that has none yet (--all; resumable), or one image
    /// (an indexed image's caption is stored; any other file's is only printed).
    Caption {
        #[arg(value_name = "PATH|ID", required_unless_present = "all", conflicts_with = "all")]
        target: Option<String>,
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        generation: GenerationArgs,
    },
    /// Chat about an indexed image: questions from standard input, one per line;
    /// answers stream as they are generated. Ends at end of input or `/quit`.
    Chat {
        #[arg(value_name = "PATH|ID", required_unless_present = "resume")]
        target: Option<String>,
        /// Continue the conversation with this id.
        #[arg(long, value_name = "CONV_ID")]
        resume: Option<i64>,
        #[command(flatten)]
        generation: GenerationArgs,
    },
    /// Ask one question about an indexed image and print the answer.
    Ask {
        #[arg(value_name = "PATH|ID")]
        target: String,
        question: String,
        /// Continue the conversation with this id (its history is part of the prompt).
        #[arg(long, value_name = "CONV_ID")]
        conversation: Option<i64>,
        #[command(flatten)]
        generation: GenerationArgs,
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
    /// Measure this machine with the configured models (--model, --device, --precision):
    /// CLIP image embeddings per second and text query latency; with --captions also
    /// BLIP-2's vision time, ms per generated token and caption time (--caption-model,
    /// --caption-precision). Synthetic inputs; no library is touched.
    Bench {
        /// The larger image batch measured (besides 1), and the caption batch.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Seconds spent on each measurement.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Also BLIP-2.
        #[arg(long)]
        captions: bool,
    },
    /// Rebuild the vector index and the caption index from the database. With a --model
    /// other than the library's: re-embed every image with it, then switch the library
    /// to it (resumable; the current index keeps answering until the switch).
    Reindex,
    /// Groups of duplicate images: exact copies (the same bytes) and near-duplicates
    /// (resized, re-encoded or slightly cropped copies: CLIP cosine ≥ --threshold).
    Duplicates {
        /// Cosine similarity at or above which two images are near-duplicates.
        #[arg(long, default_value_t = magpie_engine::DEFAULT_NEAR_THRESHOLD)]
        threshold: f32,
        /// Only exact copies.
        #[arg(long)]
        exact_only: bool,
    },
    /// Serve the library over HTTP: the JSON API (/api, described at
    /// /api/openapi.json) and the web page (/).
    Serve {
        /// Address to listen on. Anything but loopback requires --token.
        #[arg(long, default_value = "127.0.0.1:7878", value_name = "ADDR:PORT")]
        bind: std::net::SocketAddr,
        /// API token required on every /api request (Bearer header or ?token=).
        #[arg(long, env = "MAGPIE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Folders index jobs may index (default: those the library already has).
        #[arg(long = "root", value_name = "DIR")]
        roots: Vec<PathBuf>,
        /// Largest request body (an uploaded image), in MiB.
        #[arg(long, default_value_t = 32)]
        max_upload_mib: usize,
        /// Follow the --root folders: changes are indexed within seconds (file-system
        /// events; periodic rescans when events cannot be had).
        #[arg(long)]
        watch: bool,
    },
}

/// How captions and answers are generated.
#[derive(Args, Clone)]
struct GenerationArgs {
    /// Tokens to generate at most.
    #[arg(long, default_value_t = GenerationOptions::default().max_new_tokens)]
    max_new_tokens: usize,
    /// 1: greedy decoding; more: beam search.
    #[arg(long, default_value_t = GenerationOptions::default().num_beams)]
    num_beams: usize,
    /// Above 1 discourages repeating tokens.
    #[arg(long, default_value_t = GenerationOptions::default().repetition_penalty)]
    repetition_penalty: f32,
}

impl GenerationArgs {
    fn options(&self) -> GenerationOptions {
        GenerationOptions {
            max_new_tokens: self.max_new_tokens,
            num_beams: self.num_beams.max(1),
            repetition_penalty: self.repetition_penalty,
        }
    }
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
    let clip = Clip::load_with(&g.model, g.device, g.precision).with_context(|| format!("loading model {}", g.model))?;
    tracing::info!(model = %clip.info().id, dim = clip.info().dim, device = ?clip.device(), precision = clip.precision(), "model loaded");
    Ok(Arc::new(clip))
}

// The captioning and chat models come in through this seam only: the rest of the binary
// (and the engine) sees the `Captioner` and `VisualChat` traits.
fn load_blip2(g: &Global) -> Result<Arc<Blip2>> {
    let m = Blip2::load_with(&g.caption_model, g.device, g.caption_precision.0)
        .with_context(|| format!("loading captioning model {}", g.caption_model))?;
    tracing::info!(model = %Captioner::model(&m).id, precision = %m.precision(), "captioning model loaded");
    Ok(Arc::new(m))
}

fn load_captioner(g: &Global) -> Result<Arc<dyn Captioner>> {
    Ok(load_blip2(g)?)
}

fn load_chat(g: &Global) -> Result<Arc<dyn VisualChat>> {
    Ok(load_blip2(g)?)
}

/// The library as it is, without loading CLIP (captions and chat do not need it).
async fn open_recorded(g: &Global) -> Result<Library> {
    let dir = data_dir(g)?;
    Ok(Library::open_recorded(&dir, LibraryConfig::default()).await?)
}

/// An indexed image given as a path or an id.
async fn resolve(lib: &Library, target: &str) -> Result<ImageId> {
    let path = Path::new(target);
    if path.exists() {
        return Ok(lib.resolve_file(path).await?);
    }
    match target.parse::<ImageId>() {
        Ok(id) => {
            lib.store().get_file(id).await?.filter(|f| f.status == magpie_store::FileStatus::Indexed).with_context(|| format!("no indexed image with id {id}"))?;
            Ok(id)
        }
        Err(_) => bail!("{target}: no such file, and not an image id"),
    }
}

fn caption_bar(g: &Global) -> ProgressBar {
    let bar = if g.json { ProgressBar::hidden() } else { ProgressBar::new(0) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} captions  {per_sec}  ETA {eta}  {msg}")
            .expect("valid template"),
    );
    bar
}

async fn caption_all(g: &Global, lib: &Library, captioner: Arc<dyn Captioner>, generation: GenerationOptions) -> Result<CaptionReport> {
    let bar = caption_bar(g);
    let opts = CaptionOptions { generation, ..Default::default() };
    let report = lib
        .caption_all(
            captioner,
            &opts,
            &|p| {
                bar.set_length(p.total);
                bar.set_position(p.done);
                if p.failed > 0 {
                    bar.set_message(format!("{} failed", p.failed));
                }
            },
            Arc::new(AtomicBool::new(false)),
        )
        .await?;
    bar.finish_and_clear();
    Ok(report)
}

fn print_caption_report(report: &CaptionReport) {
    println!(
        "{} captioned, {} failed, {} still without a caption; {:.1} s",
        report.captioned,
        report.failed.len(),
        report.remaining,
        report.elapsed.as_secs_f64()
    );
    for (p, why) in &report.failed {
        println!("  {}: {why}", p.display());
    }
}

/// Asks one question, streaming the answer to stdout (JSON: one object at the end).
async fn ask_one(g: &Global, lib: &Library, conversation: i64, question: &str, chat: Arc<dyn VisualChat>, opts: &GenerationOptions) -> Result<String> {
    let json = g.json;
    let answer = lib
        .ask(conversation, question, chat, opts, &mut |piece| {
            if !json {
                print!("{piece}");
                let _ = std::io::stdout().flush();
            }
        })
        .await?;
    if json {
        println!("{}", serde_json::json!({ "conversation": conversation, "question": question.trim(), "answer": answer }));
    } else {
        println!();
    }
    Ok(answer)
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
        if let Some(c) = &h.caption {
            println!("         “{c}”");
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    let g = cli.global.clone();
    match cli.command {
        Command::Index { dirs, batch_size, max_pixels, captions, watch, rescan_every, generation } => {
            // Load the captioner first: a missing model should fail before the long pass.
            let captioner = if captions { Some(load_captioner(&g)?) } else { None };
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
            if let Some(captioner) = captioner {
                let report = caption_all(&g, &lib, captioner, generation.options()).await?;
                if g.json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print_caption_report(&report);
                }
            }
            if watch {
                let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let c = cancel.clone();
                tokio::spawn(async move {
                    let _ = tokio::signal::ctrl_c().await;
                    c.store(true, std::sync::atomic::Ordering::SeqCst);
                });
                let wopts = magpie_engine::WatchOptions { rescan_every: std::time::Duration::from_secs(rescan_every.max(1)), ..Default::default() };
                let embedder: Arc<dyn ImageEmbedder> = clip.clone();
                let json = g.json;
                lib.watch(&dirs, embedder, &opts, &wopts, &|e| print_watch_event(e, json), cancel).await?;
            }
        }
        Command::Search { text, k, mode } => {
            let clip = load_model(&g)?;
            let lib = open_library(&g, &clip).await?;
            if lib.indexed_vectors() == 0 {
                bail!("the library at {} has no images yet: run `magpie index DIR` first", lib.dir().display());
            }
            let hits = lib.search_text_hybrid(clip.as_ref(), &text, k, mode).await?;
            print_hits(&g, &hits)?;
        }
        Command::Caption { target, all, generation } => {
            let captioner = load_captioner(&g)?;
            let opts = generation.options();
            if all {
                let lib = open_recorded(&g).await?;
                let report = caption_all(&g, &lib, captioner, opts).await?;
                if g.json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print_caption_report(&report);
                }
            } else {
                let target = target.expect("clap requires PATH|ID without --all");
                let path = PathBuf::from(&target);
                // Any image file can be captioned, in a library or not (then nothing is stored).
                let lib = match Library::open_recorded(&data_dir(&g)?, LibraryConfig::default()).await {
                    Ok(lib) => Some(lib),
                    Err(magpie_engine::Error::Empty(_)) => None,
                    Err(e) => return Err(e.into()),
                };
                let id = match &lib {
                    Some(lib) if path.exists() => match lib.resolve_file(&path).await {
                        Ok(id) => Some(id),
                        Err(magpie_engine::Error::NotIndexed(_)) => None,
                        Err(e) => return Err(e.into()),
                    },
                    Some(lib) => Some(resolve(lib, &target).await?),
                    None if path.exists() => None,
                    None => bail!("{target}: no such file, and there is no library to look an id up in"),
                };
                let copts = CaptionOptions { generation: opts, ..Default::default() };
                let caption = match (id, &lib) {
                    (Some(id), Some(lib)) => lib.caption_one(id, captioner, &copts).await?,
                    _ => magpie_engine::caption_file(&path, captioner.as_ref(), &copts)?,
                };
                if g.json {
                    println!("{}", serde_json::json!({ "target": target, "id": id, "caption": caption, "stored": id.is_some() }));
                } else {
                    println!("{caption}");
                    if id.is_none() {
                        eprintln!("note: {target} is not in the library; the caption was not stored");
                    }
                }
            }
        }
        Command::Chat { target, resume, generation } => {
            let lib = open_recorded(&g).await?;
            let chat = load_chat(&g)?;
            let conversation = match (resume, &target) {
                (Some(c), target) => {
                    let history = lib.conversation(c).await?;
                    if let Some(t) = target {
                        let id = resolve(&lib, t).await?;
                        if id != history.conversation.file_id {
                            bail!("conversation {c} is about image {}, not {t}", history.conversation.file_id);
                        }
                    }
                    if !g.json {
                        for (q, a) in history.turns() {
                            println!("> {q}\n{a}");
                        }
                    }
                    c
                }
                (None, Some(t)) => {
                    let id = resolve(&lib, t).await?;
                    lib.start_chat(id, &chat.model().id).await?
                }
                (None, None) => bail!("pass PATH|ID or --resume CONV_ID"),
            };
            let opts = generation.options();
            let interactive = std::io::stdin().is_terminal();
            eprintln!("conversation {conversation}: ask a question per line; end with Ctrl-D or /quit");
            let stdin = std::io::stdin();
            let mut lines = stdin.lock().lines();
            loop {
                if interactive {
                    eprint!("> ");
                }
                let Some(line) = lines.next() else { break };
                let line = line.context("reading standard input")?;
                let q = line.trim();
                if q.is_empty() {
                    continue;
                }
                if q == "/quit" || q == "/exit" {
                    break;
                }
                ask_one(&g, &lib, conversation, q, chat.clone(), &opts).await?;
            }
            eprintln!("conversation {conversation} (continue it with: magpie chat --resume {conversation})");
        }
        Command::Ask { target, question, conversation, generation } => {
            let lib = open_recorded(&g).await?;
            let id = resolve(&lib, &target).await?;
            let chat = load_chat(&g)?;
            let conversation = match conversation {
                Some(c) => {
                    let about = lib.conversation(c).await?.conversation.file_id;
                    if about != id {
                        bail!("conversation {c} is about image {about}, not {target}");
                    }
                    c
                }
                None => lib.start_chat(id, &chat.model().id).await?,
            };
            ask_one(&g, &lib, conversation, &question, chat, &generation.options()).await?;
            if !g.json {
                eprintln!("conversation {conversation} (continue it with: magpie ask {target} \"…\" --conversation {conversation})");
            }
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
        Command::Bench { batch, seconds, captions } => {
            if !(seconds.is_finite() && seconds >= 0.0) {
                bail!("--seconds must be a non-negative number, not {seconds}");
            }
            let clip = load_model(&g)?;
            let mut out = serde_json::json!({ "device": describe_device(g.device), "clip": bench::clip(&clip, batch, seconds)? });
            if clip.device().is_cpu() {
                out["cpu"] = serde_json::json!(magpie_models::cpu::Isa::detect().name());
            }
            drop(clip);
            if captions {
                let blip = load_blip2(&g)?;
                out["blip2"] = bench::blip2(&blip, batch, seconds)?;
            }
            if g.json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                let c = &out["clip"];
                println!("device    {}", out["device"].as_str().unwrap_or(""));
                println!("CLIP      {} ({})", c["model"].as_str().unwrap_or(""), c["precision"].as_str().unwrap_or(""));
                // JSON objects keep their keys sorted as text ("16" < "8"): print by number.
                let by_number = |v: &serde_json::Value| {
                    let mut kv: Vec<(usize, f64)> = v.as_object().into_iter().flatten().filter_map(|(k, x)| Some((k.parse().ok()?, x.as_f64()?))).collect();
                    kv.sort_by_key(|(k, _)| *k);
                    kv
                };
                for (b, r) in by_number(&c["images_per_s"]) {
                    println!("          {r:>8.1} images/s at batch {b}");
                }
                for (t, ms) in by_number(&c["text_query_ms"]) {
                    println!("          {ms:>8.2} ms per {t}-token text query (median)");
                }
                if let Some(b) = out.get("blip2") {
                    let f = |k: &str| b[k].as_f64().unwrap_or(0.0);
                    println!("BLIP-2    {} ({})", b["model"].as_str().unwrap_or(""), b["precision"].as_str().unwrap_or(""));
                    println!("          {:>8.3} s vision encoder per image", f("vision_s"));
                    println!("          {:>8.1} ms per generated token", f("token_ms"));
                    println!("          {:>8.2} s per {}-token caption", f("caption_s"), b["tokens"]);
                    println!("          {:>8.2} s per caption in batches of {}", f("caption_s_per_image_batched"), b["batch"]);
                }
            }
        }
        Command::Duplicates { threshold, exact_only } => {
            if !(threshold > 0.0 && threshold <= 1.0) {
                bail!("--threshold must be in (0, 1], not {threshold}");
            }
            let dir = data_dir(&g)?;
            let lib = Library::open_recorded(&dir, LibraryConfig::default()).await?;
            let d = lib.duplicates((!exact_only).then_some(threshold)).await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                println!("{} groups of exact copies", d.exact.len());
                for grp in &d.exact {
                    println!("  same content ({}…):", &grp.content_hash[..12.min(grp.content_hash.len())]);
                    for f in &grp.files {
                        println!("    {}  (id {}, {} bytes)", f.path, f.id, f.size);
                    }
                }
                if !exact_only {
                    println!("{} groups of near-duplicates (cosine ≥ {threshold})", d.near.len());
                    for grp in &d.near {
                        println!("  lowest cosine {:.4}:", grp.min_cosine);
                        for f in &grp.files {
                            let dims = match (f.width, f.height) {
                                (Some(w), Some(h)) => format!("{w}×{h}, "),
                                _ => String::new(),
                            };
                            println!("    {}  (id {}, {dims}{} bytes)", f.path, f.id, f.size);
                        }
                    }
                }
            }
        }
        Command::Status => {
            let dir = data_dir(&g)?;
            match Library::status(&dir, Default::default()).await? {
                None => {
                    if g.json {
                        let mut v = serde_json::json!({ "data_dir": dir, "library": null, "device": describe_device(g.device) });
                        if let Some(c) = compute_json(&g) {
                            v["compute"] = c;
                        }
                        println!("{v}");
                    } else {
                        println!("no library at {} yet: run `magpie index DIR`", dir.display());
                        println!("device    {}", describe_device(g.device));
                        if compute_json(&g).is_some() {
                            println!("compute   CLIP in {}", g.precision.describe_cpu());
                        }
                    }
                }
                Some(s) if g.json => {
                    let mut v = serde_json::to_value(&s)?;
                    v["device"] = serde_json::json!(describe_device(g.device));
                    if let Some(c) = compute_json(&g) {
                        v["compute"] = c;
                    }
                    println!("{}", serde_json::to_string_pretty(&v)?)
                }
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
                    println!("captions  {} of {} images", s.captions, s.counts.indexed);
                    match &s.text_index {
                        Some(t) if t.up_to_date => println!("text      {} documents, up to date", t.documents),
                        Some(_) => println!("text      stale: it will be rebuilt from the database on next use (or run `magpie reindex`)"),
                        None => println!("text      not built yet"),
                    }
                    println!("device    {}", describe_device(g.device));
                    if magpie_models::select_device(g.device).is_ok_and(|d| d.is_cpu()) {
                        println!("compute   CLIP in {}", g.precision.describe_cpu());
                    }
                }
            }
        }
        Command::Serve { bind, token, roots, max_upload_mib, watch } => {
            let token = token.filter(|t| !t.trim().is_empty());
            if !bind.ip().is_loopback() && token.is_none() {
                bail!("serving on {bind} (not loopback) needs an API token: pass --token TOKEN or set MAGPIE_TOKEN");
            }
            let mut canonical = Vec::new();
            for r in &roots {
                let c = std::fs::canonicalize(r).with_context(|| format!("--root {}", r.display()))?;
                if !c.is_dir() {
                    bail!("--root {}: not a directory", r.display());
                }
                canonical.push(c);
            }
            let clip = load_model(&g)?;
            let lib = Arc::new(open_library(&g, &clip).await?);
            let gl = g.clone();
            let loader: magpie_server::ChatLoader = Arc::new(move || {
                load_blip2(&gl).map(|m| m as Arc<dyn magpie_server::ChatModel>).map_err(|e| format!("{e:#}"))
            });
            if watch && canonical.is_empty() {
                bail!("--watch follows the --root folders: give at least one --root DIR");
            }
            let config = magpie_server::ServerConfig {
                token,
                roots: canonical.clone(),
                body_limit: max_upload_mib.max(1) << 20,
                ..Default::default()
            };
            let stop_watch = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let watcher = watch.then(|| {
                let (lib, clip, stop) = (lib.clone(), clip.clone(), stop_watch.clone());
                let opts = config.index.clone();
                tokio::spawn(async move {
                    let embedder: Arc<dyn ImageEmbedder> = clip;
                    let wopts = magpie_engine::WatchOptions::default();
                    // Catch up with what changed while the server was down, then follow.
                    if let Err(e) = lib.index_cancellable(&canonical, embedder.clone(), &opts, &|_| {}, stop.clone()).await {
                        eprintln!("error: indexing {}: {e}", canonical.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
                    }
                    if let Err(e) = lib.watch(&canonical, embedder, &opts, &wopts, &|e| print_watch_event(e, false), stop).await {
                        eprintln!("error: watching: {e}");
                    }
                })
            });
            let state = magpie_server::AppState::new(lib, clip, g.caption_model.clone(), loader, config);
            let listener = tokio::net::TcpListener::bind(bind).await.with_context(|| format!("listening on {bind}"))?;
            let addr = listener.local_addr()?;
            eprintln!("magpie: serving on http://{addr}/");
            let app = magpie_server::router(state.clone());
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await?;
            stop_watch.store(true, std::sync::atomic::Ordering::SeqCst);
            state.cancel_jobs().await;
            if let Some(w) = watcher {
                let _ = w.await;
            }
        }
        Command::Reindex => {
            let dir = data_dir(&g)?;
            if model_given() && dir.join(magpie_engine::DB_FILE).is_file() {
                let lib = Library::open_recorded(&dir, LibraryConfig::default()).await?;
                let clip = load_model(&g)?;
                if clip.info() != lib.model() {
                    let from = lib.model().id.clone();
                    if !g.json {
                        eprintln!("switching the library from {from} to {}: re-embedding every image (the current index keeps answering until the switch; Ctrl-C stops, a rerun resumes)", clip.info().id);
                    }
                    let bar = if g.json { ProgressBar::hidden() } else { ProgressBar::new(0) };
                    bar.set_style(
                        ProgressStyle::with_template("{bar:30} {pos}/{len} images  {per_sec}  eta {eta}").unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let c = cancel.clone();
                    tokio::spawn(async move {
                        let _ = tokio::signal::ctrl_c().await;
                        c.store(true, std::sync::atomic::Ordering::SeqCst);
                    });
                    let progress = |done: u64, total: u64| {
                        bar.set_length(total);
                        bar.set_position(done);
                    };
                    let emb: Arc<dyn ImageEmbedder> = clip.clone();
                    let r = lib.switch_model(emb, &IndexOptions::default(), &progress, &cancel).await?;
                    bar.finish_and_clear();
                    for (p, why) in &r.failed {
                        eprintln!("warning: {}: {why} (left pending for the next `magpie index`)", p.display());
                    }
                    if g.json {
                        println!("{}", serde_json::json!({ "from": from, "to": r.model, "switched": r.switched, "embedded": r.embedded, "failed": r.failed.len(), "vectors": r.vectors }));
                    } else if r.switched {
                        println!("switched from {from} to {}: {} images embedded, {} vectors in the index", r.model, r.embedded, r.vectors);
                    } else {
                        println!("stopped before the switch: {} images embedded so far; rerun to resume", r.embedded);
                    }
                    return Ok(());
                }
            }
            let clip = load_model(&g)?;
            let lib = open_library(&g, &clip).await?;
            let n = lib.rebuild_index().await?;
            let docs = lib.text_documents();
            if g.json {
                println!("{}", serde_json::json!({ "vectors": n, "text_documents": docs }));
            } else {
                println!("rebuilt the vector index: {n} vectors; the caption index: {docs} documents");
            }
        }
    }
    Ok(())
}

/// One line per watch event: on stderr for people, JSON lines on stdout with --json.
fn print_watch_event(e: &magpie_engine::WatchEvent, json: bool) {
    use magpie_engine::WatchEvent::*;
    if json {
        let v = match e {
            Watching { roots } => serde_json::json!({"event": "watching", "roots": roots}),
            Polling { reason, every } => serde_json::json!({"event": "polling", "reason": reason, "every_seconds": every.as_secs()}),
            Indexed { paths, rescan, report } => serde_json::json!({"event": "indexed", "paths": paths, "rescan": rescan, "report": report}),
            Failed { message } => serde_json::json!({"event": "failed", "message": message}),
        };
        println!("{v}");
        return;
    }
    match e {
        Watching { roots } => eprintln!("watching {} folder(s) for changes (Ctrl-C stops)", roots.len()),
        Polling { reason, every } => eprintln!("note: {reason}; rescanning every {} s instead", every.as_secs()),
        Indexed { report: r, .. } => {
            if r.added + r.updated + r.deleted + r.failed.len() as u64 > 0 {
                eprintln!("{} new, {} updated, {} removed, {} moved, {} failed", r.added, r.updated, r.deleted, r.moved, r.failed.len());
                for (p, why) in &r.failed {
                    eprintln!("  {}: {why}", p.display());
                }
            }
        }
        Failed { message } => eprintln!("error: {message}"),
    }
}

/// Whether the user chose the CLIP model (`--model` or `MAGPIE_MODEL`) rather than taking
/// the default.
fn model_given() -> bool {
    std::env::var_os("MAGPIE_MODEL").is_some() || std::env::args().any(|a| a == "--model" || a.starts_with("--model="))
}

/// `--caption-precision`: `auto` (`None`) lets the device decide.
#[derive(Clone, Copy, Debug)]
struct PrecisionArg(Option<Precision>);

fn parse_precision(s: &str) -> Result<PrecisionArg, String> {
    if s.eq_ignore_ascii_case("auto") {
        Ok(PrecisionArg(None))
    } else {
        s.parse().map(|p| PrecisionArg(Some(p)))
    }
}

/// `{"cpu": level, "clip_precision": …, "bf16_speedup": …}` for `status --json` when CLIP
/// would run on the CPU; the speed-up (BF16 GEMM over f32, measured here) is null on a
/// CPU without BF16 dot products.
fn compute_json(g: &Global) -> Option<serde_json::Value> {
    if !magpie_models::select_device(g.device).is_ok_and(|d| d.is_cpu()) {
        return None;
    }
    let isa = magpie_models::cpu::Isa::detect();
    let speedup = magpie_models::bf16_gemm::speedup_over_f32(isa);
    Some(serde_json::json!({ "cpu": isa.name(), "clip_precision": g.precision.resolve(isa), "bf16_speedup": speedup }))
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
