//! Search semantics shared by both kinds: tombstones, supersede, filters, dimensions.

mod common;

use common::{assert_sorted_best_first, exact_of, ids, items, recall, Clustered};
use magpie_index::{Error, HnswIndex, IndexKind, IndexParams, IndexSpec, VectorIndex};

const DIM: usize = 64;

fn index(kind: IndexKind) -> VectorIndex {
    let exact_threshold = match kind {
        IndexKind::Exact => usize::MAX,
        IndexKind::Hnsw => 0,
    };
    let spec = IndexSpec::new("test-model", DIM, IndexParams { exact_threshold, ..Default::default() });
    let ix = VectorIndex::new(spec).unwrap();
    assert_eq!(ix.kind(), kind);
    ix
}

const KINDS: [IndexKind; 2] = [IndexKind::Exact, IndexKind::Hnsw];

#[test]
fn removed_images_never_come_back_and_k_live_hits_still_do() {
    let mut gen = Clustered::embeddings(1, DIM, 20);
    let data = gen.points(3000);
    let query = data[0].clone();
    for kind in KINDS {
        let mut ix = index(kind);
        ix.insert(&items(&data)).unwrap();
        // Remove the query's whole neighbourhood: the 200 nearest, so the graph walk
        // starts among tombstones.
        let nearest = ix.search(&query, 200, None, None).unwrap();
        for h in &nearest {
            assert!(ix.remove(h.id));
        }
        assert!(!ix.remove(nearest[0].id), "second remove reports nothing removed");
        assert_eq!(ix.len(), 2800);
        let hits = ix.search(&query, 10, None, None).unwrap();
        assert_eq!(hits.len(), 10, "{kind:?}");
        assert_sorted_best_first(&hits);
        assert!(hits.iter().all(|h| !nearest.iter().any(|n| n.id == h.id)), "{kind:?} returned a removed image");
        assert!(hits.iter().all(|h| ix.contains(h.id)));
        // And they are the right ones: the next best live images.
        let mut live = data.clone();
        let removed: Vec<usize> = nearest.iter().map(|h| h.id as usize).collect();
        for i in removed {
            live[i] = Vec::new();
        }
        let truth = {
            let mut e = magpie_index::ExactIndex::new(DIM);
            let kept: Vec<(i64, &[f32])> =
                live.iter().enumerate().filter(|(_, v)| !v.is_empty()).map(|(i, v)| (i as i64, v.as_slice())).collect();
            e.insert(&kept).unwrap();
            e.search(&query, 10, None).unwrap()
        };
        assert!(recall(&hits, &truth) >= 0.9, "{kind:?}: {hits:?} vs {truth:?}");
    }
}

#[test]
fn reinserting_an_id_supersedes_its_old_vector() {
    let mut gen = Clustered::embeddings(2, DIM, 10);
    let data = gen.points(1000);
    for kind in KINDS {
        let mut ix = index(kind);
        ix.insert(&items(&data)).unwrap();
        // Image 5 gets the vector of image 700 (say, the file was replaced).
        ix.insert(&[(5, data[700].as_slice())]).unwrap();
        assert_eq!(ix.len(), 1000, "{kind:?}: supersede must not add an image");
        let old = ix.search(&data[5], 20, None, None).unwrap();
        assert!(old.iter().all(|h| h.id != 5 || h.score < 0.99), "{kind:?}: old vector of 5 still found: {old:?}");
        let new = ix.search(&data[700], 2, None, None).unwrap();
        assert_eq!(ids(&new).into_iter().collect::<std::collections::BTreeSet<_>>(), [5, 700].into(), "{kind:?}");
        assert!(new.iter().all(|h| (h.score - 1.0).abs() < 1e-5));
        // Within one batch the last vector of an id wins.
        ix.insert(&[(6, data[1].as_slice()), (6, data[2].as_slice())]).unwrap();
        let hits = ix.search(&data[2], 2, None, None).unwrap();
        assert!(ids(&hits).contains(&6), "{kind:?}: {hits:?}");
        assert_eq!(ix.tombstones(), if kind == IndexKind::Hnsw { 2 } else { 0 });
    }
}

#[test]
fn filter_closure_restricts_results_and_still_fills_the_page() {
    let mut gen = Clustered::embeddings(3, DIM, 20);
    let data = gen.points(4000);
    let exact = exact_of(DIM, &data);
    let queries = gen.points(20);
    for kind in KINDS {
        let mut ix = index(kind);
        ix.insert(&items(&data)).unwrap();
        for (selective, modulus) in [(false, 2), (true, 400)] {
            let keep = move |id: i64| id % modulus == modulus - 1;
            let mut total = 0.0;
            for q in &queries {
                let hits = ix.search(q, 10, None, Some(&keep)).unwrap();
                assert_eq!(hits.len(), 10, "{kind:?} modulus {modulus}: page not filled");
                assert!(hits.iter().all(|h| keep(h.id)), "{kind:?}: filter ignored");
                assert_sorted_best_first(&hits);
                total += recall(&hits, &exact.search(q, 10, Some(&keep)).unwrap());
            }
            let mean = total / queries.len() as f64;
            // 10 matching images out of 4000: found by the exact fallback scan, exactly.
            let bound = if selective { 1.0 } else { 0.9 };
            assert!(mean >= bound, "{kind:?} modulus {modulus}: recall {mean}");
        }
        // A filter nothing passes: empty, not an error.
        assert!(ix.search(&queries[0], 10, None, Some(&|_| false)).unwrap().is_empty());
        // The narrowest search (ef 1) with a filter still answers, with an image that
        // passes (a greedy walk that wide need not find the best one); the default ef does.
        let sevens = |id: i64| id % 7 == 0;
        let one = ix.search(&queries[0], 1, Some(1), Some(&sevens)).unwrap();
        assert!(one.len() == 1 && sevens(one[0].id), "{kind:?}: {one:?}");
        let best = ix.search(&queries[0], 1, None, Some(&sevens)).unwrap();
        assert_eq!(best, exact.search(&queries[0], 1, Some(&sevens)).unwrap(), "{kind:?}");
    }
}

#[test]
fn wrong_dimensions_and_bad_vectors_are_errors_that_change_nothing() {
    for kind in KINDS {
        let mut ix = index(kind);
        let good = vec![0.5f32; DIM];
        let short = vec![0.5f32; DIM - 1];
        let nan = {
            let mut v = good.clone();
            v[3] = f32::NAN;
            v
        };
        ix.insert(&[(1, good.as_slice())]).unwrap();
        let err = ix.insert(&[(2, good.as_slice()), (3, short.as_slice())]).unwrap_err();
        assert!(matches!(err, Error::Dimension { id: 3, expected: DIM, got } if got == DIM - 1), "{err:?}");
        assert!(err.to_string().contains("image 3"), "{err}");
        assert!(!ix.contains(2), "{kind:?}: a failed batch must not be half-applied");
        assert!(matches!(ix.insert(&[(4, nan.as_slice())]), Err(Error::InvalidVector { id: 4 })));
        assert!(matches!(ix.insert(&[(5, &[0.0; DIM][..])]), Err(Error::InvalidVector { id: 5 })));
        assert_eq!(ix.len(), 1);
        assert!(matches!(ix.search(&short, 3, None, None), Err(Error::QueryDimension { expected: DIM, got }) if got == DIM - 1));
        assert!(matches!(ix.search(&[0.0; DIM], 3, None, None), Err(Error::InvalidQuery)));
        // An empty index checks the query too.
        assert!(index(kind).search(&short, 3, None, None).is_err());
    }
}

#[test]
fn unnormalised_input_is_normalised_and_scores_are_cosines() {
    for kind in KINDS {
        let mut ix = index(kind);
        let mut a = vec![0.0f32; DIM];
        a[0] = 30.0;
        let mut b = vec![0.0f32; DIM];
        b[0] = 1.0;
        b[1] = 1.0;
        ix.insert(&[(1, a.as_slice()), (2, b.as_slice())]).unwrap();
        let hits = ix.search(&a, 5, None, Some(&|_| true)).unwrap();
        assert_eq!(ids(&hits), vec![1, 2]);
        assert!((hits[0].score - 1.0).abs() < 1e-5);
        assert!((hits[1].score - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-5, "{hits:?}");
        assert!(ix.search(&a, 0, None, None).unwrap().is_empty());
    }
}

#[test]
fn hnsw_compaction_drops_tombstones_and_keeps_results() {
    let mut gen = Clustered::embeddings(4, DIM, 20);
    let data = gen.points(3000);
    let mut ix = HnswIndex::new(DIM, IndexParams::default()).unwrap();
    ix.insert(&items(&data)).unwrap();
    for id in (0..3000).step_by(3) {
        ix.remove(id);
    }
    assert_eq!(ix.tombstones(), 1000);
    let q = gen.point();
    let before = ix.search(&q, 10, None, None).unwrap();
    ix.compact();
    assert_eq!((ix.len(), ix.points(), ix.tombstones()), (2000, 2000, 0));
    let after = ix.search(&q, 10, None, None).unwrap();
    assert!(after.iter().all(|h| h.id % 3 != 0));
    assert!(recall(&after, &before) >= 0.8, "{before:?} vs {after:?}");
}
