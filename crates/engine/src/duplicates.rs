//! Duplicates: exact (the same bytes: equal content hashes) and near (CLIP cosine at or
//! above a threshold: resized, re-encoded, slightly cropped copies).

use crate::{Library, Result};
use magpie_core::ImageId;
use magpie_store::{FileRecord, FileStatus};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// Cosine at or above which two images count as near-duplicates by default.
pub const DEFAULT_NEAR_THRESHOLD: f32 = 0.95;
/// Neighbours examined per image when looking for near-duplicates.
const NEIGHBOURS: usize = 16;

#[derive(Debug, Clone, Serialize)]
pub struct DuplicateFile {
    pub id: ImageId,
    pub path: String,
    pub size: u64,
    pub width: Option<u32>,
    pub height: Option<u32>,
}

impl DuplicateFile {
    fn new(f: &FileRecord) -> Self {
        Self {
            id: f.id,
            path: f.path.to_string_lossy().into_owned(),
            size: f.size,
            width: f.meta.as_ref().map(|m| m.width),
            height: f.meta.as_ref().map(|m| m.height),
        }
    }
}

/// Files with identical content.
#[derive(Debug, Clone, Serialize)]
pub struct ExactGroup {
    pub content_hash: String,
    pub files: Vec<DuplicateFile>,
}

/// Files that look alike: connected by pairs at or above the threshold.
#[derive(Debug, Clone, Serialize)]
pub struct NearGroup {
    pub files: Vec<DuplicateFile>,
    /// The lowest cosine among the pairs that joined the group.
    pub min_cosine: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Duplicates {
    pub exact: Vec<ExactGroup>,
    pub near: Vec<NearGroup>,
    pub threshold: f32,
}

/// Union-find over indices.
struct Groups {
    parent: Vec<usize>,
}

impl Groups {
    fn new(n: usize) -> Self {
        Self { parent: (0..n).collect() }
    }

    fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] != x {
            self.parent[x] = self.parent[self.parent[x]];
            x = self.parent[x];
        }
        x
    }

    fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.parent[ra.max(rb)] = ra.min(rb);
        }
    }
}

impl Library {
    /// Exact duplicate groups, and (unless `near` is `None`) near-duplicate groups at
    /// cosine ≥ `near`. Files with the same content count once in near groups (their
    /// first id stands for them), and a near group must hold at least two different
    /// contents. Groups are ordered by their smallest id; files in a group by id.
    pub async fn duplicates(&self, near: Option<f32>) -> Result<Duplicates> {
        // Every indexed file, by id.
        let mut files: BTreeMap<ImageId, FileRecord> = BTreeMap::new();
        let mut after = ImageId::MIN;
        loop {
            let page = self.store.embeddings_page(&self.model.id, after, 4096).await?;
            let Some(last) = page.last() else { break };
            after = last.0;
            let ids: Vec<ImageId> = page.iter().map(|(id, _)| *id).collect();
            for f in self.store.get_files(&ids).await? {
                if f.status == FileStatus::Indexed {
                    files.insert(f.id, f);
                }
            }
        }
        // Exact: equal hashes.
        let mut by_hash: BTreeMap<String, Vec<ImageId>> = BTreeMap::new();
        for f in files.values() {
            if let Some(h) = &f.content_hash {
                by_hash.entry(h.clone()).or_default().push(f.id);
            }
        }
        let mut exact: Vec<ExactGroup> = by_hash
            .iter()
            .filter(|(_, ids)| ids.len() > 1)
            .map(|(h, ids)| ExactGroup { content_hash: h.clone(), files: ids.iter().map(|id| DuplicateFile::new(&files[id])).collect() })
            .collect();
        exact.sort_by_key(|g| g.files[0].id);
        let threshold = near.unwrap_or(DEFAULT_NEAR_THRESHOLD);
        let Some(threshold) = near else {
            return Ok(Duplicates { exact, near: vec![], threshold });
        };

        // Near: one representative per content; its neighbours at or above the threshold.
        let hash_of = |id: ImageId| files[&id].content_hash.clone().unwrap_or_else(|| format!("#{id}"));
        let reps: Vec<ImageId> = {
            let mut seen = std::collections::HashSet::new();
            files.keys().copied().filter(|id| seen.insert(hash_of(*id))).collect()
        };
        let index_of: HashMap<ImageId, usize> = reps.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let rep_of_hash: HashMap<String, ImageId> = reps.iter().map(|id| (hash_of(*id), *id)).collect();
        let mut groups = Groups::new(reps.len());
        let mut min_cos: HashMap<(usize, usize), f32> = HashMap::new();
        for &id in &reps {
            let Some(e) = self.store.embedding(id, &self.model.id).await? else { continue };
            let hits = {
                let ix = self.index.read().expect("index lock");
                ix.search(e.vector(), NEIGHBOURS, None, None)?
            };
            for h in hits {
                if h.score < threshold || h.id == id {
                    continue;
                }
                // A neighbour stands for its content's representative.
                let Some(other) = files.get(&h.id).map(|_| rep_of_hash[&hash_of(h.id)]) else { continue };
                if other == id {
                    continue;
                }
                let (a, b) = (index_of[&id], index_of[&other]);
                groups.union(a, b);
                let key = (a.min(b), a.max(b));
                let e = min_cos.entry(key).or_insert(h.score);
                *e = e.min(h.score);
            }
        }
        let mut members: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for i in 0..reps.len() {
            let r = groups.find(i);
            members.entry(r).or_default().push(i);
        }
        let mut near_groups = Vec::new();
        for (root, idx) in members {
            if idx.len() < 2 {
                continue;
            }
            let min_cosine = min_cos
                .iter()
                .filter(|((a, _), _)| groups.find(*a) == root)
                .map(|(_, c)| *c)
                .fold(f32::INFINITY, f32::min);
            // Every file of each member content, by id.
            let hashes: std::collections::HashSet<String> = idx.iter().map(|&i| hash_of(reps[i])).collect();
            let list: Vec<DuplicateFile> =
                files.values().filter(|f| hashes.contains(&hash_of(f.id))).map(DuplicateFile::new).collect();
            near_groups.push(NearGroup { files: list, min_cosine });
        }
        near_groups.sort_by_key(|g| g.files[0].id);
        Ok(Duplicates { exact, near: near_groups, threshold })
    }
}

#[cfg(test)]
mod tests {
    use super::Groups;

    #[test]
    fn union_find_groups_transitively() {
        let mut g = Groups::new(5);
        g.union(0, 3);
        g.union(3, 4);
        assert_eq!(g.find(4), g.find(0));
        assert_ne!(g.find(1), g.find(0));
        assert_eq!(g.find(2), 2);
    }
}
