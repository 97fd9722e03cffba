use crate::{Error, Result};

/// An L2-normalised embedding tagged with the id of the model that produced it.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    model: String,
    vector: Vec<f32>,
}

impl Embedding {
    /// Normalises `vector` to unit length. Fails on NaN/inf or a zero vector.
    pub fn normalized(model: impl Into<String>, mut vector: Vec<f32>) -> Result<Self> {
        if vector.iter().any(|v| !v.is_finite()) || !l2_normalize(&mut vector) {
            return Err(Error::NonFinite);
        }
        Ok(Self { model: model.into(), vector })
    }

    /// Decodes a little-endian f32 blob as stored in SQLite, checking its dimension.
    pub fn from_le_bytes(model: impl Into<String>, bytes: &[u8], dim: usize) -> Result<Self> {
        let model = model.into();
        if bytes.len() % 4 != 0 {
            return Err(Error::BadBlob(bytes.len()));
        }
        if bytes.len() / 4 != dim {
            return Err(Error::Dimension { model, expected: dim, got: bytes.len() / 4 });
        }
        let vector: Vec<f32> =
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        if vector.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite);
        }
        Ok(Self { model, vector })
    }

    pub fn to_le_bytes(&self) -> Vec<u8> {
        self.vector.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn vector(&self) -> &[f32] {
        &self.vector
    }

    pub fn into_vector(self) -> Vec<f32> {
        self.vector
    }

    pub fn dim(&self) -> usize {
        self.vector.len()
    }

    /// Fails unless this embedding came from `model` with its dimension.
    pub fn check(&self, model: &crate::ModelInfo) -> Result<()> {
        if self.model != model.id {
            return Err(Error::ModelMismatch { expected: model.id.clone(), got: self.model.clone() });
        }
        if self.dim() != model.dim {
            return Err(Error::Dimension { model: self.model.clone(), expected: model.dim, got: self.dim() });
        }
        Ok(())
    }

    /// Cosine similarity (both are unit vectors, so the dot product).
    pub fn cosine(&self, other: &Embedding) -> f32 {
        dot(&self.vector, &other.vector)
    }
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Normalises in place; returns false for a zero or non-finite norm.
pub fn l2_normalize(v: &mut [f32]) -> bool {
    let norm = v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt();
    if !(norm.is_finite() && norm > 0.0) {
        return false;
    }
    let inv = (1.0 / norm) as f32;
    v.iter_mut().for_each(|x| *x *= inv);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_checks() {
        let e = Embedding::normalized("m", vec![1.0, 2.0, 2.0]).unwrap();
        assert!((e.vector()[1] - 2.0 / 3.0).abs() < 1e-6);
        let bytes = e.to_le_bytes();
        assert_eq!(bytes.len(), 12);
        assert!(matches!(Embedding::from_le_bytes("m", &bytes, 4), Err(Error::Dimension { .. })));
        assert!(matches!(Embedding::from_le_bytes("m", &bytes[..5], 3), Err(Error::BadBlob(5))));
        let info = crate::ModelInfo { id: "other".into(), dim: 3 };
        assert!(matches!(e.check(&info), Err(Error::ModelMismatch { .. })));
        assert!(Embedding::normalized("m", vec![0.0, 0.0]).is_err());
        assert!(Embedding::normalized("m", vec![f32::NAN, 1.0]).is_err());
    }
}
