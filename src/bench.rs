//! `magpie bench`: what this machine does with the configured models — CLIP image
//! embeddings per second, text query latency, and (with `--captions`) BLIP-2's vision
//! time, milliseconds per generated token and caption time, single and batched. Nothing is
//! read from or written to a library; the inputs are synthetic (speed does not depend on
//! pixel values).

use anyhow::Result;
use magpie_core::Pixels;
use magpie_models::blip2::GenerateOptions;
use magpie_models::{Blip2, Clip};
use serde_json::{json, Value};
use std::time::Instant;

/// Mean seconds per call of `f` over at least `seconds` (and 2 calls), after one warm-up.
fn timed(seconds: f64, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let (mut n, start) = (0u32, Instant::now());
    while n < 2 || start.elapsed().as_secs_f64() < seconds {
        f()?;
        n += 1;
    }
    Ok(start.elapsed().as_secs_f64() / n as f64)
}

/// Median seconds per call of `f` over at least `seconds` (and 5 calls), after one
/// warm-up: a latency, which an occasional slow call (a busy neighbour) does not move as
/// it moves the mean.
fn timed_median(seconds: f64, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let (mut times, start) = (Vec::new(), Instant::now());
    while times.len() < 5 || start.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// A smooth synthetic photo of `side`² pixels.
fn test_image(side: u32) -> magpie_media::image::DynamicImage {
    magpie_media::image::RgbImage::from_fn(side, side, |x, y| {
        magpie_media::image::Rgb([(x * 255 / side) as u8, (y * 255 / side) as u8, ((x + y) * 127 / side) as u8])
    })
    .into()
}

/// CLIP figures: images per second at batch 1 and `batch`, the median ms per text query
/// of 8 and 77 tokens (or the model's context, if shorter).
pub fn clip(clip: &Clip, batch: usize, seconds: f64) -> Result<Value> {
    let size = clip.config().vision_config.image_size;
    let mut rates = serde_json::Map::new();
    for b in [1, batch.max(1)] {
        let pixels: Vec<Pixels> = (0..b)
            .map(|i| Pixels {
                channels: 3,
                height: size,
                width: size,
                data: (0..3 * size * size).map(|j| (((i * 7919 + j * 104_729) % 1000) as f32 / 500.0) - 1.0).collect(),
            })
            .collect();
        let dt = timed(seconds, &mut || {
            magpie_core::ImageEmbedder::embed_pixels(clip, &pixels)?;
            Ok(())
        })?;
        rates.insert(b.to_string(), json!(b as f64 / dt));
    }
    let ids = clip.tokenize(&["a photo"])?.remove(0);
    let (bos, eos, word) = (ids[0], ids[ids.len() - 1], ids[1]);
    let context = clip.config().text_config.max_position_embeddings;
    let mut text = serde_json::Map::new();
    for t in [8usize, 77] {
        let t = t.min(context).max(2);
        let seq: Vec<u32> = std::iter::once(bos).chain(std::iter::repeat_n(word, t - 2)).chain([eos]).collect();
        let dt = timed_median(seconds / 2.0, &mut || {
            clip.embed_ids(std::slice::from_ref(&seq))?;
            Ok(())
        })?;
        text.insert(t.to_string(), json!(dt * 1000.0));
    }
    Ok(json!({
        "model": clip.info().id,
        "precision": clip.precision(),
        "images_per_s": rates,
        "text_query_ms": text,
    }))
}

/// BLIP-2 figures: vision encoder seconds per image, ms per decoding step, a 20-token
/// caption (with the prefill), and a caption per image in batches of `batch`.
pub fn blip2(blip: &Blip2, batch: usize, seconds: f64) -> Result<Value> {
    let image = test_image(blip.processor().resize_side().max(224));
    let px = blip.pixel_tensor(&blip.preprocess(&image)?)?;
    let vision_s = timed(seconds, &mut || {
        blip.vision_forward(&px)?;
        Ok(())
    })?;
    let ids = blip.prompt_ids(None)?;
    let max_new = 20usize.min(blip.config().text_config.max_position_embeddings.saturating_sub(ids.len())).max(2);
    // A caption end to end; each decoding step timed directly, as the time between the
    // moments two consecutive tokens are chosen.
    let opts = GenerateOptions { max_new_tokens: max_new, min_new_tokens: max_new, ..Default::default() };
    let (mut steps, mut step_s) = (0usize, 0f64);
    let full_s = timed(seconds, &mut || {
        let mut prev: Option<Instant> = None;
        blip.generate_ids(&px, &ids, &opts, &mut |_| {
            let now = Instant::now();
            if let Some(p) = prev {
                step_s += (now - p).as_secs_f64();
                steps += 1;
            }
            prev = Some(now);
        })?;
        Ok(())
    })?;
    let token_ms = step_s / steps.max(1) as f64 * 1000.0;
    let images: Vec<&magpie_media::image::DynamicImage> = std::iter::repeat_n(&image, batch.max(1)).collect();
    let batch_s = timed(seconds, &mut || {
        blip.caption_batch(&images, &opts)?;
        Ok(())
    })? / images.len() as f64;
    Ok(json!({
        "model": blip.id(),
        "precision": blip.precision().name(),
        "vision_s": vision_s,
        "token_ms": token_ms,
        "tokens": max_new,
        "caption_s": full_s,
        "batch": images.len(),
        "caption_s_per_image_batched": batch_s,
    }))
}
