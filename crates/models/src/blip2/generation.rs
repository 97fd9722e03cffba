//! Text generation as transformers 5.24's `GenerationMixin` does it for a decoder-only
//! model (`generation/utils.py`: `_sample` without sampling, `_beam_search`), with the logits
//! processors magpie exposes: `RepetitionPenaltyLogitsProcessor`, then
//! `MinNewTokensLengthLogitsProcessor`.
//!
//! Semantics kept from the reference, because they change the output:
//! - The repetition penalty looks at every id of `input_ids`: for BLIP-2 that is the
//!   `num_query_tokens` image placeholder ids, BOS and the prompt, then the generated
//!   tokens. Greedy search applies it to the raw logits, beam search to the log-softmax
//!   scores (the processors run after `log_softmax` there).
//! - Beam search keeps `2 · num_beams` candidates per step (one EOS id), finishes a
//!   hypothesis only when it is among the top `num_beams` candidates, scores finished
//!   ones by `sum log p / generated_len ^ length_penalty`, and stops by the
//!   `early_stopping` heuristic (`false` by default) — see [`EarlyStopping`].
//! - Beams start from one hypothesis (the others at -1e9), so the first step does not
//!   pick the same token on every beam.
//! - `min_new_tokens` sets the EOS scores to -inf (not renormalised) while fewer tokens
//!   have been generated.
//! - The generated tokens include the EOS that ended them.

use crate::nn::log_softmax;
use candle_core::Result;

/// When beam search stops (`GenerationConfig.early_stopping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// `False` (the default): stop when the best running beam, scored at the current
    /// length, cannot beat the worst finished hypothesis.
    #[default]
    Heuristic,
    /// `True`: stop as soon as `num_beams` hypotheses are finished.
    Always,
    /// `"never"`: the canonical beam search; with a positive length penalty the best
    /// running beam is scored at `max_length`.
    Never,
}

/// Decoding settings, with transformers' names and defaults.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Tokens to generate at most (EOS included). transformers' default `max_length=20`
    /// means 20 new tokens after an `inputs_embeds` prompt.
    pub max_new_tokens: usize,
    /// 1: greedy search; more: beam search.
    pub num_beams: usize,
    /// Exponent of the generated length that divides a finished beam's log-probability.
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    /// 1.0: off. Above 1 penalises tokens already in the sequence (prompt included).
    pub repetition_penalty: f32,
    /// EOS is forbidden until this many tokens have been generated.
    pub min_new_tokens: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 20,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
            repetition_penalty: 1.0,
            min_new_tokens: 0,
        }
    }
}

impl GenerateOptions {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_beams == 0 {
            return Err("num_beams must be at least 1".into());
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!("repetition_penalty must be a positive number, not {}", self.repetition_penalty));
        }
        if !self.length_penalty.is_finite() {
            return Err("length_penalty must be finite".into());
        }
        Ok(())
    }
}

/// A language model with a cache, seen by the search: rows are running sequences.
pub trait Decoder {
    /// Appends one token to every row; returns each row's next-token logits (f32).
    fn step(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>>;
    /// Keeps rows `idx` in that order, repeats allowed (expanding one prompt to several
    /// beams, and beam search's cache reordering).
    fn reorder(&mut self, idx: &[usize]) -> Result<()>;
}

/// `RepetitionPenaltyLogitsProcessor`: each distinct id of `context` has its score divided
/// by `penalty` if positive, multiplied by it if negative. Ids outside the scores are
/// ignored.
pub fn apply_repetition_penalty(scores: &mut [f32], context: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; scores.len()];
    for &t in context {
        let t = t as usize;
        if t < scores.len() && !seen[t] {
            seen[t] = true;
            let s = scores[t];
            scores[t] = if s < 0.0 { s * penalty } else { s / penalty };
        }
    }
}

/// `MinNewTokensLengthLogitsProcessor`: EOS impossible while `generated < min_new_tokens`.
fn apply_min_new_tokens(scores: &mut [f32], generated: usize, min_new_tokens: usize, eos: &[u32]) {
    if generated < min_new_tokens {
        for &e in eos {
            if let Some(s) = scores.get_mut(e as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}

/// Index of the first maximum (torch.argmax).
fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Indices of the `k` largest values, largest first, ties by lower index (torch.topk's
/// order on distinct values).
fn topk(xs: &[f32], k: usize) -> Vec<usize> {
    let cmp = |a: &usize, b: &usize| xs[*b].total_cmp(&xs[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..xs.len()).collect();
    let k = k.min(xs.len());
    if k < idx.len() {
        idx.select_nth_unstable_by(k, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx
}

/// Greedy search (`num_beams == 1`): `first_logits` are the prompt's next-token logits,
/// `prompt` its ids (the repetition penalty's context). Each token goes to `on_token` as
/// it is chosen, with `true` for the last one. Returns the new tokens.
pub fn greedy(
    decoder: &mut dyn Decoder,
    prompt: &[u32],
    first_logits: Vec<f32>,
    opts: &GenerateOptions,
    eos: &[u32],
    on_token: &mut dyn FnMut(u32, bool),
) -> Result<Vec<u32>> {
    let mut context = prompt.to_vec();
    let mut out = Vec::new();
    let mut logits = first_logits;
    while out.len() < opts.max_new_tokens {
        apply_repetition_penalty(&mut logits, &context, opts.repetition_penalty);
        apply_min_new_tokens(&mut logits, out.len(), opts.min_new_tokens, eos);
        let next = argmax(&logits) as u32;
        context.push(next);
        out.push(next);
        let last = eos.contains(&next) || out.len() == opts.max_new_tokens;
        on_token(next, last);
        if last {
            break;
        }
        logits = decoder.step(&[next])?.swap_remove(0);
    }
    Ok(out)
}

/// Greedy search over a batch of rows that share one prompt (captions of several images):
/// row `i` starts from `first_logits[i]`, and each step feeds every row its last token
/// (a finished row gets its EOS again; what it produces is ignored). Each row's tokens are
/// those [`greedy`] would give it alone. Stops when every row has ended.
pub fn greedy_batch(
    decoder: &mut dyn Decoder,
    prompt: &[u32],
    first_logits: Vec<Vec<f32>>,
    opts: &GenerateOptions,
    eos: &[u32],
) -> Result<Vec<Vec<u32>>> {
    let rows = first_logits.len();
    let mut contexts = vec![prompt.to_vec(); rows];
    let mut outs: Vec<Vec<u32>> = vec![Vec::new(); rows];
    let mut done = vec![opts.max_new_tokens == 0; rows];
    let mut logits = first_logits;
    loop {
        let mut feed = Vec::with_capacity(rows);
        for i in 0..rows {
            if done[i] {
                feed.push(*outs[i].last().or(eos.first()).unwrap_or(&0));
                continue;
            }
            let row = &mut logits[i];
            apply_repetition_penalty(row, &contexts[i], opts.repetition_penalty);
            apply_min_new_tokens(row, outs[i].len(), opts.min_new_tokens, eos);
            let next = argmax(row) as u32;
            contexts[i].push(next);
            outs[i].push(next);
            done[i] = eos.contains(&next) || outs[i].len() == opts.max_new_tokens;
            feed.push(next);
        }
        if done.iter().all(|d| *d) {
            return Ok(outs);
        }
        logits = decoder.step(&feed)?;
    }
}

/// Beam search (`_beam_search` of transformers 5.24, batch of one): the decoder holds one
/// row for the prompt; it is expanded to `num_beams` rows here. Returns the generated
/// tokens of the best finished hypothesis.
pub fn beam_search(
    decoder: &mut dyn Decoder,
    prompt: &[u32],
    first_logits: Vec<f32>,
    opts: &GenerateOptions,
    eos: &[u32],
) -> Result<Vec<u32>> {
    const NEG: f32 = -1.0e9;
    let nb = opts.num_beams;
    if opts.max_new_tokens == 0 {
        return Ok(vec![]);
    }
    let keep = 2.max(1 + eos.len()) * nb;
    let prompt_len = prompt.len();
    let max_length = prompt_len + opts.max_new_tokens;
    let lp = opts.length_penalty as f64;
    let mut cur_len = prompt_len;

    let mut running: Vec<Vec<u32>> = vec![vec![]; nb];
    let mut running_scores = vec![NEG; nb];
    running_scores[0] = 0.0;
    let mut finished: Vec<Vec<u32>> = vec![vec![]; nb];
    let mut finished_scores = vec![NEG; nb];
    let mut is_finished = vec![false; nb];
    let mut unsatisfied = true;

    decoder.reorder(&vec![0; nb])?;
    let mut logits = vec![first_logits; nb];
    loop {
        // b. log-probabilities, processed, accumulated over each beam.
        let vocab = logits[0].len();
        let mut acc = Vec::with_capacity(nb * vocab);
        for (r, row) in logits.iter().enumerate() {
            let mut lp_row = log_softmax(row);
            if opts.repetition_penalty != 1.0 {
                let context: Vec<u32> = prompt.iter().chain(&running[r]).copied().collect();
                apply_repetition_penalty(&mut lp_row, &context, opts.repetition_penalty);
            }
            apply_min_new_tokens(&mut lp_row, cur_len - prompt_len, opts.min_new_tokens, eos);
            acc.extend(lp_row.iter().map(|x| x + running_scores[r]));
        }
        // c. the top `keep` continuations over all beams.
        let top = topk(&acc, keep);
        let scores: Vec<f32> = top.iter().map(|&i| acc[i]).collect();
        let seqs: Vec<Vec<u32>> =
            top.iter().map(|&i| running[i / vocab].iter().copied().chain([(i % vocab) as u32]).collect()).collect();
        let sources: Vec<usize> = top.iter().map(|&i| i / vocab).collect();
        // d. which of them stop here (EOS, or the length limit).
        let hits: Vec<bool> =
            top.iter().map(|&i| eos.contains(&((i % vocab) as u32)) || cur_len + 1 >= max_length).collect();
        // e. the best `num_beams` that go on.
        let running_lp: Vec<f32> = scores.iter().zip(&hits).map(|(s, &h)| s + (h as u8 as f32) * NEG).collect();
        let next = topk(&running_lp, nb);
        let beam_idx: Vec<usize> = next.iter().map(|&i| sources[i]).collect();
        running = next.iter().map(|&i| seqs[i].clone()).collect();
        running_scores = next.iter().map(|&i| running_lp[i]).collect();
        // f. finished hypotheses: the previous ones merged with those just completed.
        let all_finished = is_finished.iter().all(|&f| f);
        let norm = ((cur_len + 1 - prompt_len) as f64).powf(lp) as f32;
        let mut merged_scores = finished_scores.clone();
        let mut merged_done = is_finished.clone();
        for (i, s) in scores.iter().enumerate() {
            let just_finished = hits[i] && i < nb;
            let mut s = s / norm;
            s += ((all_finished && opts.early_stopping == EarlyStopping::Always) as u8 as f32) * NEG;
            s += (!unsatisfied as u8 as f32) * NEG;
            s += (!just_finished as u8 as f32) * NEG;
            merged_scores.push(s);
            merged_done.push(just_finished);
        }
        let best = topk(&merged_scores, nb);
        finished = best.iter().map(|&i| if i < nb { finished[i].clone() } else { seqs[i - nb].clone() }).collect();
        finished_scores = best.iter().map(|&i| merged_scores[i]).collect();
        is_finished = best.iter().map(|&i| merged_done[i]).collect();
        // g. stopping conditions for the search as a whole.
        cur_len += 1;
        let best_len = if opts.early_stopping == EarlyStopping::Never && lp > 0.0 {
            max_length - prompt_len
        } else {
            cur_len - prompt_len
        };
        let best_possible = running_scores[0] / (best_len as f64).powf(lp) as f32;
        let worst = finished_scores.iter().copied().fold(f32::INFINITY, f32::min);
        unsatisfied = unsatisfied && is_finished.iter().any(|&f| best_possible > if f { worst } else { NEG });
        let open_beam = !(is_finished.iter().all(|&f| f) && opts.early_stopping == EarlyStopping::Always);
        let can_continue = !hits.iter().all(|&h| h);
        if !(unsatisfied && open_beam && can_continue) {
            break;
        }
        decoder.reorder(&beam_idx)?;
        let last: Vec<u32> = running.iter().map(|s| *s.last().expect("one token per step")).collect();
        logits = decoder.step(&last)?;
    }
    Ok(finished.swap_remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy language model: the logits depend on the last token and the length, from a
    /// fixed pseudo-random table; `eos_bias` pushes EOS up after `eos_after` tokens.
    struct Toy {
        vocab: usize,
        rows: Vec<Vec<u32>>,
        eos_after: usize,
        eos_bias: f32,
    }

    impl Toy {
        fn new(vocab: usize, eos_after: usize, eos_bias: f32) -> Self {
            Self { vocab, rows: vec![vec![]], eos_after, eos_bias }
        }

        fn logits(&self, seq: &[u32]) -> Vec<f32> {
            let last = seq.last().copied().unwrap_or(0) as u64;
            let n = seq.len() as u64;
            (0..self.vocab as u64)
                .map(|t| {
                    let mut h = (last * 31 + t * 17 + n * 7 + 3).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    h ^= h >> 29;
                    let x = (h % 10_000) as f32 / 1000.0 - 5.0;
                    if t == 0 && seq.len() >= self.eos_after {
                        x + self.eos_bias
                    } else {
                        x
                    }
                })
                .collect()
        }

        fn first(&self) -> Vec<f32> {
            self.logits(&self.rows[0])
        }
    }

    impl Decoder for Toy {
        fn step(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
            assert_eq!(tokens.len(), self.rows.len());
            for (r, &t) in self.rows.iter_mut().zip(tokens) {
                r.push(t);
            }
            Ok(self.rows.iter().map(|r| self.logits(r)).collect())
        }

        fn reorder(&mut self, idx: &[usize]) -> Result<()> {
            self.rows = idx.iter().map(|&i| self.rows[i].clone()).collect();
            Ok(())
        }
    }

    fn opts(max_new_tokens: usize, num_beams: usize) -> GenerateOptions {
        GenerateOptions { max_new_tokens, num_beams, ..Default::default() }
    }

    /// Σ log p of `gen` after the (empty) prompt under the toy.
    fn seq_logprob(toy: &Toy, gen: &[u32]) -> f32 {
        let mut seq = vec![];
        let mut total = 0.0;
        for &t in gen {
            total += log_softmax(&toy.logits(&seq))[t as usize];
            seq.push(t);
        }
        total
    }

    #[test]
    fn repetition_penalty_semantics() {
        let mut s = vec![2.0, -2.0, 1.0, 0.0, 4.0];
        // Ids repeat (penalised once), include "prompt" ids, and one is outside the vocabulary.
        apply_repetition_penalty(&mut s, &[0, 1, 1, 3, 9, 0], 2.0);
        assert_eq!(s, vec![1.0, -4.0, 1.0, 0.0, 4.0]);
        let mut s = vec![2.0, -2.0];
        apply_repetition_penalty(&mut s, &[0, 1], 0.5);
        assert_eq!(s, vec![4.0, -1.0]);
        let mut s = vec![2.0, -2.0];
        apply_repetition_penalty(&mut s, &[0, 1], 1.0);
        assert_eq!(s, vec![2.0, -2.0]);
    }

    #[test]
    fn greedy_follows_argmax_and_stops_at_eos_and_length() {
        let mut toy = Toy::new(11, 100, 0.0);
        let first = toy.first();
        let mut streamed = vec![];
        let out = greedy(&mut toy, &[], first, &opts(7, 1), &[0], &mut |t, _| streamed.push(t)).unwrap();
        assert_eq!(out, streamed);
        let mut seq = vec![];
        for &t in &out {
            let l = toy.logits(&seq);
            assert_eq!(argmax(&l), t as usize);
            seq.push(t);
            if t == 0 {
                break;
            }
        }
        assert!(out.len() == 7 || *out.last().unwrap() == 0);
        // EOS made certain after 3 tokens: exactly 4 tokens, the last one EOS.
        let mut toy = Toy::new(11, 3, 100.0);
        let first = toy.first();
        let out = greedy(&mut toy, &[], first, &opts(20, 1), &[0], &mut |_, _| {}).unwrap();
        assert_eq!(out.len(), 4);
        assert_eq!(out[3], 0);
        assert!(out[..3].iter().all(|&t| t != 0));
    }

    #[test]
    fn greedy_repetition_penalty_changes_choice_including_prompt_ids() {
        // The prompt holds the argmax token; a strong penalty must move the choice.
        let toy = Toy::new(11, 100, 0.0);
        let l = toy.first();
        let top = argmax(&l) as u32;
        let mut toy = Toy::new(11, 100, 0.0);
        let out = greedy(
            &mut toy,
            &[top],
            l.clone(),
            &GenerateOptions { repetition_penalty: 1e6, ..opts(1, 1) },
            &[],
            &mut |_, _| {},
        )
        .unwrap();
        assert_ne!(out[0], top);
        let mut toy = Toy::new(11, 100, 0.0);
        let out = greedy(&mut toy, &[top], l, &opts(1, 1), &[], &mut |_, _| {}).unwrap();
        assert_eq!(out[0], top);
    }

    #[test]
    fn one_beam_equals_greedy_without_eos() {
        for max_new in [1, 2, 5, 12] {
            let mut a = Toy::new(13, 1000, 0.0);
            let f = a.first();
            let g = greedy(&mut a, &[], f, &opts(max_new, 1), &[], &mut |_, _| {}).unwrap();
            let mut b = Toy::new(13, 1000, 0.0);
            let f = b.first();
            let s = beam_search(&mut b, &[], f, &opts(max_new, 1), &[]).unwrap();
            assert_eq!(g, s, "max_new_tokens {max_new}");
            assert_eq!(g.len(), max_new);
        }
        // With a certain EOS the one-beam search stops where greedy does.
        let mut a = Toy::new(13, 4, 1000.0);
        let f = a.first();
        let g = greedy(&mut a, &[], f, &opts(20, 1), &[0], &mut |_, _| {}).unwrap();
        let mut b = Toy::new(13, 4, 1000.0);
        let f = b.first();
        let s = beam_search(&mut b, &[], f, &opts(20, 1), &[0]).unwrap();
        assert_eq!(g, s);
    }

    #[test]
    fn beams_find_the_best_sequence_without_eos() {
        // Without EOS every hypothesis has the full length, so the result is the most
        // likely sequence among those the beams kept: never worse than greedy, and with
        // as many beams as the vocabulary, the exact best over a short horizon.
        let (vocab, len) = (5, 3);
        let mut best = (f32::NEG_INFINITY, vec![]);
        let toy = Toy::new(vocab, 1000, 0.0);
        for a in 0..vocab as u32 {
            for b in 0..vocab as u32 {
                for c in 0..vocab as u32 {
                    let s = seq_logprob(&toy, &[a, b, c]);
                    if s > best.0 {
                        best = (s, vec![a, b, c]);
                    }
                }
            }
        }
        let mut t = Toy::new(vocab, 1000, 0.0);
        let f = t.first();
        let got = beam_search(&mut t, &[], f, &opts(len, vocab * vocab), &[]).unwrap();
        assert_eq!(got, best.1);
        let mut t = Toy::new(vocab, 1000, 0.0);
        let f = t.first();
        let greedy_out = greedy(&mut t, &[], f, &opts(len, 1), &[], &mut |_, _| {}).unwrap();
        let mut t = Toy::new(vocab, 1000, 0.0);
        let f = t.first();
        let four = beam_search(&mut t, &[], f, &opts(len, 4), &[]).unwrap();
        assert!(seq_logprob(&toy, &four) >= seq_logprob(&toy, &greedy_out) - 1e-5);
    }

    #[test]
    fn beam_search_ends_with_eos_and_respects_max_new_tokens() {
        let mut t = Toy::new(17, 3, 6.0);
        let f = t.first();
        let out = beam_search(&mut t, &[5, 6], f, &opts(10, 4), &[0]).unwrap();
        assert!(!out.is_empty() && out.len() <= 10);
        if out.len() < 10 {
            assert_eq!(*out.last().unwrap(), 0);
        }
        assert!(out[..out.len() - 1].iter().all(|&x| x != 0));
        let mut t = Toy::new(17, 3, 6.0);
        let f = t.first();
        assert!(beam_search(&mut t, &[], f, &opts(0, 4), &[0]).unwrap().is_empty());
    }

    #[test]
    fn min_new_tokens_forbids_eos() {
        // EOS certain after 2 tokens, but at least 6 must come: EOS at the 7th.
        for beams in [1, 3] {
            let mut t = Toy::new(11, 2, 1000.0);
            let f = t.first();
            let o = GenerateOptions { min_new_tokens: 6, ..opts(20, beams) };
            let out = if beams == 1 {
                greedy(&mut t, &[], f, &o, &[0], &mut |_, _| {}).unwrap()
            } else {
                beam_search(&mut t, &[], f, &o, &[0]).unwrap()
            };
            assert_eq!(out.len(), 7, "{beams} beams: {out:?}");
            assert_eq!(out[6], 0);
        }
        let mut s = vec![1.0, 2.0];
        apply_min_new_tokens(&mut s, 3, 3, &[1]);
        assert_eq!(s, vec![1.0, 2.0]);
        apply_min_new_tokens(&mut s, 2, 3, &[1, 7]);
        assert_eq!(s, vec![1.0, f32::NEG_INFINITY]);
    }

    /// Several toy rows at once, one of them ending early: each row's tokens are what
    /// greedy search gives it alone.
    #[test]
    fn batched_greedy_equals_greedy_per_row() {
        struct Rows(Vec<Toy>);
        impl Decoder for Rows {
            fn step(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
                assert_eq!(tokens.len(), self.0.len());
                self.0.iter_mut().zip(tokens).map(|(t, &tok)| Ok(t.step(&[tok])?.remove(0))).collect()
            }
            fn reorder(&mut self, _: &[usize]) -> Result<()> {
                unreachable!()
            }
        }
        let toys = || vec![Toy::new(17, 3, 9.0), Toy::new(17, 40, 0.0), Toy::new(23, 6, 2.0)];
        for penalty in [1.0, 1.3] {
            let mut o = opts(12, 1);
            o.repetition_penalty = penalty;
            let mut batch = Rows(toys());
            let first = batch.0.iter().map(Toy::first).collect();
            let got = greedy_batch(&mut batch, &[1, 2], first, &o, &[0]).unwrap();
            for (i, mut toy) in toys().into_iter().enumerate() {
                let first = toy.first();
                let want = greedy(&mut toy, &[1, 2], first, &o, &[0], &mut |_, _| {}).unwrap();
                assert_eq!(got[i], want, "row {i}, penalty {penalty}");
            }
            // Rows end at different steps (the finished ones keep being fed).
            assert!(got.iter().any(|r| r.len() != got[0].len()), "{got:?}");
        }
    }

    #[test]
    fn topk_orders_and_breaks_ties_by_index() {
        assert_eq!(topk(&[1.0, 3.0, 3.0, 2.0, -1.0], 3), vec![1, 2, 3]);
        assert_eq!(topk(&[1.0, 2.0], 5), vec![1, 0]);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
