//! GGUF checkpoints (llama.cpp's single-file format) as an input: the reader, the block
//! formats' dequantization ([`dequant`]) and the import into a Hugging Face folder
//! ([`import`]) that the rest of the engine loads like any other checkpoint.
//!
//! Format (v2/v3, little-endian): `GGUF`, version u32, tensor count u64, key/value count u64;
//! the key/values (key string, type u32, value); the tensor infos (name, dims u32 + u64 each,
//! ggml type u32, offset u64 relative to the data section); padding to `general.alignment`
//! (default 32); the data. Strings are a u64 length and UTF-8 bytes.
//!
//! Invariants of a parsed [`GgufFile`]: every tensor's bytes lie inside the file and start
//! aligned; its element count is a whole number of its type's blocks; names are unique.
//! Nothing outside the file's own counts is trusted: a length or count that runs past the end
//! is an error naming what it was reading, never a panic or a huge allocation.

pub mod dequant;
pub mod import;

use memmap2::Mmap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use dequant::GgmlType;

/// Errors reading or importing a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (magic {magic:?})")]
    NotGguf { path: PathBuf, magic: [u8; 4] },
    #[error("{path}: GGUF version {version} (2 and 3 are read)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: truncated or malformed at byte {offset} reading {what}")]
    Malformed {
        path: PathBuf,
        offset: usize,
        what: String,
    },
    #[error("{path}: tensor {tensor}: {detail}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        detail: String,
    },
    #[error("{path}: metadata {key}: {detail}")]
    Metadata {
        path: PathBuf,
        key: String,
        detail: String,
    },
    #[error("{path}: {detail}")]
    Unsupported { path: PathBuf, detail: String },
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            Value::Bool(v) => Some(v.into()),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => self.as_u64().map(|v| v != 0),
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's header entry.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) axis.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    pub nbytes: usize,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
    /// The shape in row-major (PyTorch) order: `dims` reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    /// Name -> position in `tensors`.
    index: std::collections::HashMap<String, usize>,
    map: Mmap,
}

/// Reads values from the mapped header, bounds-checked.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
    path: &'a Path,
}

/// More array elements than this cannot be metadata of any real model (vocabularies are
/// under a million entries); refused before allocating.
const MAX_ARRAY: u64 = 1 << 26;

impl<'a> Cursor<'a> {
    fn err(&self, what: impl Into<String>) -> GgufError {
        GgufError::Malformed {
            path: self.path.to_path_buf(),
            offset: self.at,
            what: what.into(),
        }
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| self.err(what))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let n = self.u64(what)?;
        let n = usize::try_from(n).map_err(|_| self.err(what))?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err(format!("{what} (not UTF-8)")))
    }
    fn value(&mut self, ty: u32, what: &str, depth: u32) -> Result<Value, GgufError> {
        let mut fixed = |n: usize| -> Result<&'a [u8], GgufError> { self.take(n, what) };
        Ok(match ty {
            0 => Value::U8(fixed(1)?[0]),
            1 => Value::I8(fixed(1)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(fixed(2)?.try_into().unwrap())),
            3 => Value::I16(i16::from_le_bytes(fixed(2)?.try_into().unwrap())),
            4 => Value::U32(u32::from_le_bytes(fixed(4)?.try_into().unwrap())),
            5 => Value::I32(i32::from_le_bytes(fixed(4)?.try_into().unwrap())),
            6 => Value::F32(f32::from_le_bytes(fixed(4)?.try_into().unwrap())),
            7 => Value::Bool(fixed(1)?[0] != 0),
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth > 2 {
                    return Err(self.err(format!("{what} (arrays nested too deep)")));
                }
                let it = self.u32(what)?;
                let n = self.u64(what)?;
                if n > MAX_ARRAY || n as usize > self.b.len() - self.at {
                    return Err(self.err(format!("{what} (array of {n})")));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(it, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(u64::from_le_bytes(fixed(8)?.try_into().unwrap())),
            11 => Value::I64(i64::from_le_bytes(fixed(8)?.try_into().unwrap())),
            12 => Value::F64(f64::from_le_bytes(fixed(8)?.try_into().unwrap())),
            t => return Err(self.err(format!("{what} (value type {t})"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let f = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the file is mapped read-only; a checkpoint is not rewritten while served.
        let map = unsafe { Mmap::map(&f) }.map_err(io)?;
        let (version, metadata, tensors) = Self::parse(path, &map)?;
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            index,
            map,
        })
    }

    #[allow(clippy::type_complexity)]
    fn parse(
        path: &Path,
        b: &[u8],
    ) -> Result<(u32, BTreeMap<String, Value>, Vec<TensorInfo>), GgufError> {
        let mut c = Cursor { b, at: 0, path };
        let magic: [u8; 4] = c.take(4, "magic")?.try_into().unwrap();
        if &magic != b"GGUF" {
            return Err(GgufError::NotGguf {
                path: path.into(),
                magic,
            });
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version {
                path: path.into(),
                version,
            });
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("key/value count")?;
        if n_tensors > MAX_ARRAY || n_kv > MAX_ARRAY {
            return Err(c.err("counts"));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let align = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 16 => a as usize,
                _ => {
                    return Err(GgufError::Metadata {
                        path: path.into(),
                        key: "general.alignment".into(),
                        detail: format!("{v:?} is not a power of two"),
                    })
                }
            },
        };
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let nd = c.u32(&name)?;
            if nd == 0 || nd > 4 {
                return Err(c.err(format!("{name} ({nd} dimensions)")));
            }
            let dims = (0..nd)
                .map(|_| c.u64(&name))
                .collect::<Result<Vec<_>, _>>()?;
            let ty = c.u32(&name)?;
            let off = c.u64(&name)?;
            raw.push((name, dims, ty, off));
        }
        let data = c.at.div_ceil(align) * align;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut seen = std::collections::HashSet::new();
        for (name, dims, ty, off) in raw {
            let bad = |detail: String| GgufError::Tensor {
                path: path.into(),
                tensor: name.clone(),
                detail,
            };
            if !seen.insert(name.clone()) {
                return Err(bad("appears twice".into()));
            }
            let ty = GgmlType::from_id(ty).ok_or_else(|| {
                bad(format!(
                    "ggml type {ty} is not read here (supported: {})",
                    GgmlType::supported()
                ))
            })?;
            let n = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n > 0 && n < 1 << 40)
                .ok_or_else(|| bad(format!("dims {dims:?}")))?;
            let (block, bytes) = ty.block();
            if dims[0] % block as u64 != 0 {
                return Err(bad(format!(
                    "rows of {} are not whole {} blocks of {block}",
                    dims[0],
                    ty.name()
                )));
            }
            let nbytes = (n / block as u64) as usize * bytes;
            let offset = usize::try_from(off)
                .ok()
                .and_then(|o| o.checked_add(data))
                .filter(|o| o % align == 0)
                .ok_or_else(|| bad(format!("offset {off} is not aligned to {align}")))?;
            if offset.checked_add(nbytes).is_none_or(|e| e > b.len()) {
                return Err(bad(format!(
                    "{nbytes} bytes at {offset} run past the end of the file ({} bytes)",
                    b.len()
                )));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                nbytes,
            });
        }
        Ok((version, metadata, tensors))
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// A tensor's raw bytes (in the file's map).
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.offset..t.offset + t.nbytes]
    }

    /// A tensor's values as f32 (dequantized), row-major in [`TensorInfo::shape`].
    pub fn f32s(&self, t: &TensorInfo) -> Vec<f32> {
        dequant::dequantize(t.ty, self.bytes(t), t.elements())
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn meta_err(&self, key: &str, detail: impl Into<String>) -> GgufError {
        GgufError::Metadata {
            path: self.path.clone(),
            key: key.into(),
            detail: detail.into(),
        }
    }

    /// A required string.
    pub fn str(&self, key: &str) -> Result<&str, GgufError> {
        match self.get(key) {
            None => Err(self.meta_err(key, "missing")),
            Some(v) => v.as_str().ok_or_else(|| self.meta_err(key, "not a string")),
        }
    }

    /// A required unsigned integer.
    pub fn usize(&self, key: &str) -> Result<usize, GgufError> {
        self.opt_usize(key)?
            .ok_or_else(|| self.meta_err(key, "missing"))
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| self.meta_err(key, format!("{v:?} is not a count"))),
        }
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.meta_err(key, format!("{v:?} is not a number"))),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.meta_err(key, format!("{v:?} is not a boolean"))),
        }
    }

    /// A string array (a vocabulary, merges).
    pub fn strings(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let a = self
            .get(key)
            .ok_or_else(|| self.meta_err(key, "missing"))?
            .as_array()
            .ok_or_else(|| self.meta_err(key, "not an array"))?;
        a.iter()
            .map(|v| v.as_str().ok_or_else(|| self.meta_err(key, "not strings")))
            .collect()
    }
}

/// Refuses a GGUF file given where a Hugging Face folder belongs, saying how to import it.
pub fn refuse_as_folder(path: &Path) -> Result<(), crate::weights::LoadError> {
    if path.is_file() {
        let mut magic = [0u8; 4];
        let gguf = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok()
            && &magic == b"GGUF";
        if gguf {
            return Err(crate::weights::LoadError::Gguf(path.to_path_buf()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
