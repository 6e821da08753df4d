//! Memory-mapped safetensors checkpoints.
//!
//! A [`Checkpoint`] maps `model.safetensors`, or every shard named by
//! `model.safetensors.index.json`, and validates each header against the file's length (a
//! truncated file fails here). Mapping reads nothing: a tensor's bytes are touched only when a
//! rank asks for that tensor, so a rank holding a subset of experts reads only those.
//!
//! Tensors stored in the requested dtype are used in place from the map (zero copy, shared page
//! cache); any other dtype is converted once into owned memory.

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::Dtype;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use switchyard_kernels::quant::{Fp8Block, Fp8Owned, Mxfp4, MX_BLOCK};
use switchyard_kernels::WeightRef;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file (truncated or corrupt): {detail}")]
    BadFile { path: PathBuf, detail: String },
    #[error("{path}: bad index: {detail}")]
    BadIndex { path: PathBuf, detail: String },
    #[error("no model.safetensors or model.safetensors.index.json in {0}")]
    NoWeights(PathBuf),
    #[error("{0}: a GGUF file, not a Hugging Face folder: import it with `switchyard import {0} --out DIR` and serve DIR")]
    Gguf(PathBuf),
    #[error("tensor `{0}` is missing from the checkpoint")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor `{name}` has unsupported dtype {dtype} (supported: F32, BF16, F16)")]
    Dtype { name: String, dtype: String },
}

/// The dtype weight matrices are kept in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDType {
    F32,
    Bf16,
}

impl std::str::FromStr for WeightDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(WeightDType::F32),
            "bf16" | "bfloat16" => Ok(WeightDType::Bf16),
            other => Err(format!("unknown dtype {other:?} (f32 or bf16)")),
        }
    }
}

#[derive(Debug)]
struct Shard {
    path: PathBuf,
    map: Arc<Mmap>,
    data_start: usize,
}

#[derive(Clone, Debug)]
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// An opened checkpoint folder.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    entries: HashMap<String, Entry>,
    /// `weight_block_size` of an FP8 checkpoint (`quantization_config`); FP8 tensors are
    /// refused without it.
    fp8_block: Option<[usize; 2]>,
}

/// Which rows of a fused MXFP4 expert tensor a view takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    All,
    /// Rows 0, 2, 4, … (GPT-OSS's gate rows).
    Even,
    /// Rows 1, 3, 5, … (GPT-OSS's up rows).
    Odd,
}

enum Data {
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
        dtype: WeightDType,
    },
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    /// FP8 e4m3 bytes in place in the file map, with their block scales (owned).
    Fp8 {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
        scale_inv: Vec<f32>,
        k: usize,
        block: [usize; 2],
    },
    /// An owned FP8 block matrix (derived from a stored one, e.g. MLA's per-head splits).
    Fp8Owned(Fp8Owned),
    /// MXFP4 packed values and e8m0 scales, both in place in the file maps; `step` selects
    /// every `step`-th stored row.
    Mxfp4 {
        blocks: Arc<Mmap>,
        blocks_start: usize,
        scales: Arc<Mmap>,
        scales_start: usize,
        n: usize,
        k: usize,
        step: usize,
    },
}

/// A loaded weight tensor, row-major.
pub struct Tensor {
    pub shape: Vec<usize>,
    data: Data,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor{:?}", self.shape)
    }
}

impl Tensor {
    pub fn weight(&self) -> WeightRef<'_> {
        match &self.data {
            Data::Mapped {
                map,
                start,
                len,
                dtype,
            } => {
                let bytes = &map[*start..*start + *len];
                match dtype {
                    // Alignment was checked when the tensor was loaded.
                    WeightDType::F32 => WeightRef::F32(bytemuck::cast_slice(bytes)),
                    WeightDType::Bf16 => WeightRef::Bf16(bytemuck::cast_slice(bytes)),
                }
            }
            Data::F32(v) => WeightRef::F32(v),
            Data::Bf16(v) => WeightRef::Bf16(v),
            Data::Fp8 {
                map,
                start,
                len,
                scale_inv,
                k,
                block,
            } => WeightRef::Fp8(Fp8Block {
                q: &map[*start..*start + *len],
                scale_inv,
                k: *k,
                block: *block,
            }),
            Data::Fp8Owned(o) => WeightRef::Fp8(o.view()),
            Data::Mxfp4 {
                blocks,
                blocks_start,
                scales,
                scales_start,
                n,
                k,
                step,
            } => {
                let stored = if *n == 0 { 0 } else { (*n - 1) * *step + 1 };
                WeightRef::Mxfp4(
                    Mxfp4::new(
                        &blocks[*blocks_start..*blocks_start + stored * *k / 2],
                        &scales[*scales_start..*scales_start + stored * *k / MX_BLOCK],
                        *n,
                        *k,
                        *step,
                    )
                    .expect("checked at load"),
                )
            }
        }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The tensor as an owned `f32` vector.
    pub fn to_f32(&self) -> Vec<f32> {
        match self.weight() {
            WeightRef::F32(w) => w.to_vec(),
            WeightRef::Bf16(w) => w.iter().map(|v| v.to_f32()).collect(),
            WeightRef::Fp8(w) => w.to_f32(),
            WeightRef::Mxfp4(w) => w.to_f32(),
        }
    }
    /// An owned tensor from `f32` values, kept in `dtype`.
    pub fn from_f32(shape: Vec<usize>, v: Vec<f32>, dtype: WeightDType) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), v.len());
        let data = match dtype {
            WeightDType::F32 => Data::F32(v),
            WeightDType::Bf16 => Data::Bf16(v.into_iter().map(bf16::from_f32).collect()),
        };
        Tensor { shape, data }
    }

    /// An owned FP8 tensor of shape `[n, k]`.
    pub fn fp8(o: Fp8Owned) -> Tensor {
        Tensor {
            shape: vec![o.q.len() / o.k.max(1), o.k],
            data: Data::Fp8Owned(o),
        }
    }

    /// Bytes of weight data this tensor holds.
    pub fn nbytes(&self) -> usize {
        match self.weight() {
            WeightRef::F32(w) => w.len() * 4,
            WeightRef::Bf16(w) => w.len() * 2,
            WeightRef::Fp8(w) => w.q.len() + w.scale_inv.len() * 4,
            WeightRef::Mxfp4(w) => w.nbytes(),
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
    move |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads one safetensors file's header: where its data starts and each tensor's entry (as
/// shard `shard`). Every offset is checked against the file's length (no arithmetic on
/// header values can overflow) and every shape against its byte size, so any bytes end in an
/// index or an error naming what is wrong.
fn index_shard(bytes: &[u8], shard: usize) -> Result<(usize, Vec<(String, Entry)>), String> {
    let (n, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| format!("{e:?}"))?;
    let data_start = n
        .checked_add(8)
        .filter(|d| *d <= bytes.len())
        .ok_or("header longer than the file")?;
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        let (s, e) = info.data_offsets;
        let (start, end) = match (data_start.checked_add(s), data_start.checked_add(e)) {
            (Some(a), Some(b)) if a <= b && b <= bytes.len() => (a, b),
            _ => return Err(format!("tensor `{name}` extends past the end of the file")),
        };
        let elems = info
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(info.dtype.bitsize()))
            .map(|bits| bits.div_ceil(8))
            .ok_or_else(|| format!("tensor `{name}`: shape {:?} overflows", info.shape))?;
        if elems != end - start {
            return Err(format!(
                "tensor `{name}`: shape {:?} of {:?} needs {elems} bytes, the header gives {}",
                info.shape,
                info.dtype,
                end - start
            ));
        }
        out.push((
            name.clone(),
            Entry {
                shard,
                dtype: info.dtype,
                shape: info.shape.clone(),
                start,
                end,
            },
        ));
    }
    Ok((data_start, out))
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(io(&index))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| LoadError::BadIndex {
                    path: index.clone(),
                    detail: e.to_string(),
                })?;
            let wm = v
                .get("weight_map")
                .and_then(|w| w.as_object())
                .ok_or_else(|| LoadError::BadIndex {
                    path: index.clone(),
                    detail: "missing `weight_map` object".into(),
                })?;
            let mut files: Vec<String> = Vec::new();
            for (name, f) in wm {
                let f = f.as_str().ok_or_else(|| LoadError::BadIndex {
                    path: index.clone(),
                    detail: format!("`{name}` maps to a non-string"),
                })?;
                if f.contains('/') || f.contains("..") {
                    return Err(LoadError::BadIndex {
                        path: index.clone(),
                        detail: format!("shard name {f:?} leaves the folder"),
                    });
                }
                if !files.iter().any(|x| x == f) {
                    files.push(f.to_string());
                }
            }
            files.sort();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(LoadError::NoWeights(dir.to_path_buf()));
        };
        let mut shards = Vec::new();
        let mut entries = HashMap::new();
        for path in files {
            let file = std::fs::File::open(&path).map_err(io(&path))?;
            // SAFETY: the file is opened read-only and checkpoints are not modified while
            // served; a concurrent truncation would be a deployment error.
            let map = unsafe { Mmap::map(&file) }.map_err(io(&path))?;
            let (data_start, tensors) =
                index_shard(&map[..], shards.len()).map_err(|detail| LoadError::BadFile {
                    path: path.clone(),
                    detail,
                })?;
            entries.extend(tensors);
            shards.push(Shard {
                path,
                map: Arc::new(map),
                data_start,
            });
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            shards,
            entries,
            fp8_block: None,
        })
    }

    /// Declares the FP8 block size of `config.json`'s `quantization_config` (see
    /// [`crate::config::Quantization`]).
    pub fn with_quantization(mut self, q: Option<&crate::config::Quantization>) -> Self {
        self.fp8_block = q.and_then(|q| q.fp8_block());
        self
    }

    /// Expert `e` of an MXFP4 tensor fused over experts, `base_blocks` `[experts, out, in/32,
    /// 16]` and `base_scales` `[experts, out, in/32]` (both U8), as an `[out', in]` matrix of
    /// the rows `rows` selects, in place in the file map. Shapes and dtypes are checked
    /// against `[experts, out, in]`, so a tensor whose scales do not match is refused.
    pub fn mxfp4_expert(
        &self,
        base: &str,
        [experts, out, inp]: [usize; 3],
        e: usize,
        rows: Rows,
    ) -> Result<Tensor, LoadError> {
        if inp % MX_BLOCK != 0 {
            return Err(LoadError::Shape {
                name: format!("{base}_blocks"),
                found: vec![experts, out, inp],
                expected: vec![experts, out, inp.next_multiple_of(MX_BLOCK)],
            });
        }
        let g = inp / MX_BLOCK;
        let bname = format!("{base}_blocks");
        let sname = format!("{base}_scales");
        let b = self.entry(&bname, &[experts, out, g, MX_BLOCK / 2])?;
        let sc = self.entry(&sname, &[experts, out, g])?;
        for (name, ent) in [(&bname, b), (&sname, sc)] {
            if ent.dtype != Dtype::U8 {
                return Err(LoadError::Dtype {
                    name: name.clone(),
                    dtype: format!("{:?} (MXFP4 blocks and scales are U8)", ent.dtype),
                });
            }
        }
        if e >= experts {
            return Err(LoadError::Shape {
                name: format!("{bname}[{e}]"),
                found: vec![experts, out, g, MX_BLOCK / 2],
                expected: vec![e + 1],
            });
        }
        let (first, step, n) = match rows {
            Rows::All => (0, 1, out),
            Rows::Even => (0, 2, out.div_ceil(2)),
            Rows::Odd => (1, 2, out / 2),
        };
        let row0 = e * out + first;
        Ok(Tensor {
            shape: vec![n, inp],
            data: Data::Mxfp4 {
                blocks: self.shards[b.shard].map.clone(),
                blocks_start: b.start + row0 * inp / 2,
                scales: self.shards[sc.shard].map.clone(),
                scales_start: sc.start + row0 * g,
                n,
                k: inp,
                step,
            },
        })
    }

    /// An FP8 tensor's block scales, checked against its shape: `name_scale_inv`
    /// `[⌈n/br⌉, ⌈k/bc⌉]` in f32.
    fn fp8_scales(&self, name: &str, shape: &[usize]) -> Result<(Vec<f32>, [usize; 2]), LoadError> {
        let block = self.fp8_block.ok_or_else(|| LoadError::Dtype {
            name: name.into(),
            dtype: "F8_E4M3 without an fp8 quantization_config in config.json".into(),
        })?;
        let [n, k] = match shape {
            [n, k] => [*n, *k],
            _ => {
                return Err(LoadError::Dtype {
                    name: name.into(),
                    dtype: format!(
                        "F8_E4M3 with {} dims (block scales need a matrix)",
                        shape.len()
                    ),
                })
            }
        };
        let sname = format!("{name}_scale_inv");
        let expect = [n.div_ceil(block[0]), k.div_ceil(block[1])];
        let e = self.entry(&sname, &expect)?;
        if e.dtype != Dtype::F32 {
            return Err(LoadError::Dtype {
                name: sname,
                dtype: format!("{:?} (block scales must be F32)", e.dtype),
            });
        }
        Ok((
            decode_f32(&self.shards[e.shard].map[e.start..e.end], e.dtype),
            block,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Drops this process's resident pages of `start..end` of shard `shard` once their bytes
    /// have been copied out (a converted or transposed tensor), so the copy is not held twice
    /// in RSS. Only whole pages inside the range are dropped: they belong to that tensor alone
    /// (tensors never overlap), and a later read would fault them in again from the file.
    fn release(&self, shard: usize, start: usize, end: usize) {
        #[cfg(unix)]
        {
            const PAGE: usize = 4096;
            let (a, b) = (start.next_multiple_of(PAGE), end / PAGE * PAGE);
            if b > a {
                // SAFETY: a read-only file mapping: MADV_DONTNEED only discards this process's
                // page-table entries; the data is re-read from the file if touched again, and
                // no reference into these pages outlives the copy just made from them.
                let _ = unsafe {
                    self.shards[shard].map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        a,
                        b - a,
                    )
                };
            }
        }
        let _ = (shard, start, end);
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    fn entry(&self, name: &str, shape: &[usize]) -> Result<&Entry, LoadError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor(name.to_string()))?;
        if e.shape != shape {
            return Err(LoadError::Shape {
                name: name.into(),
                found: e.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        Ok(e)
    }

    /// Loads a weight matrix in `dtype`, zero-copy when the stored dtype matches.
    pub fn matrix(
        &self,
        name: &str,
        shape: &[usize],
        dtype: WeightDType,
    ) -> Result<Tensor, LoadError> {
        let e = self.entry(name, shape)?;
        let shard = &self.shards[e.shard];
        let bytes = &shard.map[e.start..e.end];
        if e.dtype == Dtype::F8_E4M3 {
            // Kept quantized as released, in place in the map, whatever `dtype` asks.
            let (scale_inv, block) = self.fp8_scales(name, shape)?;
            return Ok(Tensor {
                shape: shape.to_vec(),
                data: Data::Fp8 {
                    map: shard.map.clone(),
                    start: e.start,
                    len: e.end - e.start,
                    scale_inv,
                    k: shape[1],
                    block,
                },
            });
        }
        let stored = match e.dtype {
            Dtype::F32 => Some(WeightDType::F32),
            Dtype::BF16 => Some(WeightDType::Bf16),
            Dtype::F16 => None,
            other => {
                return Err(LoadError::Dtype {
                    name: name.into(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let align = if stored == Some(WeightDType::F32) {
            4
        } else {
            2
        };
        if stored == Some(dtype) && (bytes.as_ptr() as usize) % align == 0 {
            return Ok(Tensor {
                shape: shape.to_vec(),
                data: Data::Mapped {
                    map: shard.map.clone(),
                    start: e.start,
                    len: e.end - e.start,
                    dtype,
                },
            });
        }
        let f32s = decode_f32(bytes, e.dtype);
        let data = match dtype {
            WeightDType::F32 => Data::F32(f32s),
            WeightDType::Bf16 => Data::Bf16(f32s.into_iter().map(bf16::from_f32).collect()),
        };
        self.release(e.shard, e.start, e.end);
        Ok(Tensor {
            shape: shape.to_vec(),
            data,
        })
    }

    /// Loads a small tensor (norm weights, biases) as owned `f32`.
    pub fn vector(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, LoadError> {
        let e = self.entry(name, shape)?;
        if e.dtype == Dtype::F8_E4M3 {
            // An FP8 matrix wanted in f32 (MLA's kv_b_proj, split per head at load).
            return Ok(self.matrix(name, shape, WeightDType::F32)?.to_f32());
        }
        match e.dtype {
            Dtype::F32 | Dtype::BF16 | Dtype::F16 => Ok(decode_f32(
                &self.shards[e.shard].map[e.start..e.end],
                e.dtype,
            )),
            other => Err(LoadError::Dtype {
                name: name.into(),
                dtype: format!("{other:?}"),
            }),
        }
    }

    /// Entry `index` of the first axis of a tensor of shape `shape` (fused per-expert
    /// tensors), as owned `f32`; only that entry's bytes are read.
    pub fn slab(&self, name: &str, shape: &[usize], index: usize) -> Result<Vec<f32>, LoadError> {
        let e = self.entry(name, shape)?;
        let elem = match e.dtype {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            other => {
                return Err(LoadError::Dtype {
                    name: name.into(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let rows = shape.first().copied().unwrap_or(0);
        if index >= rows {
            return Err(LoadError::Shape {
                name: format!("{name}[{index}]"),
                found: shape.to_vec(),
                expected: vec![index + 1],
            });
        }
        let per = shape[1..].iter().product::<usize>() * elem;
        let start = e.start + index * per;
        let v = decode_f32(&self.shards[e.shard].map[start..start + per], e.dtype);
        self.release(e.shard, start, start + per);
        Ok(v)
    }

    /// The stored dtype of a tensor ("F32", "BF16", "F16", "F8_E4M3", "U8" or "other").
    pub fn dtype_of(&self, name: &str) -> Option<&'static str> {
        self.entries.get(name).map(|e| match e.dtype {
            Dtype::F32 => "F32",
            Dtype::BF16 => "BF16",
            Dtype::F16 => "F16",
            Dtype::F8_E4M3 => "F8_E4M3",
            Dtype::U8 => "U8",
            _ => "other",
        })
    }

    /// Paths of the files backing this checkpoint.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// Byte offset where tensor data begins in each shard (for diagnostics).
    pub fn data_starts(&self) -> Vec<usize> {
        self.shards.iter().map(|s| s.data_start).collect()
    }
}

/// Hands the allocator's free memory back to the OS. Loading passes every converted or
/// transposed tensor through temporaries larger than what it keeps (an `f32` slab, its
/// transpose, then the `bf16` copy kept); glibc keeps freed heap memory that sits below a live
/// allocation, so without this a layer-by-layer load leaves its temporaries resident (measured:
/// `bench-gpt-oss` bf16 peaked at 1.23x its weights, 1.02x with this between layers).
pub(crate) fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only releases memory the allocator holds free; no live allocation
    // moves or is invalidated.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn decode_f32(bytes: &[u8], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        _ => unreachable!("dtype checked by callers"),
    }
}

/// Bytes per element of a safetensors dtype the writer handles ("F32", "BF16", "F16", "U8",
/// "F8_E4M3").
pub fn dtype_bytes(dtype: &str) -> Option<usize> {
    match dtype {
        "F32" => Some(4),
        "BF16" | "F16" => Some(2),
        "U8" | "F8_E4M3" => Some(1),
        _ => None,
    }
}

/// Streams tensors into a safetensors file without holding them all in memory.
///
/// The caller declares every tensor (name, dtype, shape) up front, then writes each tensor's
/// bytes in declaration order.
pub struct SafetensorsWriter {
    file: std::io::BufWriter<std::fs::File>,
    pending: std::collections::VecDeque<(String, usize)>,
}

impl SafetensorsWriter {
    /// `tensors`: (name, dtype "F32", "BF16", "F16", "U8" or "F8_E4M3", shape).
    pub fn create(path: &Path, tensors: &[(String, &str, Vec<usize>)]) -> std::io::Result<Self> {
        use std::io::Write;
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut off = 0usize;
        let mut pending = std::collections::VecDeque::new();
        for (name, dtype, shape) in tensors {
            let elem = dtype_bytes(dtype).ok_or_else(|| {
                std::io::Error::other(format!("{name}: dtype {dtype:?} is not written here"))
            })?;
            let n = shape.iter().product::<usize>() * elem;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}),
            );
            pending.push_back((name.clone(), n));
            off += n;
        }
        let mut h = serde_json::to_vec(&serde_json::Value::Object(header))?;
        while (8 + h.len()) % 8 != 0 {
            h.push(b' ');
        }
        let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
        file.write_all(&(h.len() as u64).to_le_bytes())?;
        file.write_all(&h)?;
        Ok(SafetensorsWriter { file, pending })
    }

    /// Writes the next declared tensor's data.
    pub fn write_next(&mut self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let (expect, n) = self
            .pending
            .pop_front()
            .ok_or_else(|| std::io::Error::other("no tensor left to write"))?;
        if expect != name || n != bytes.len() {
            return Err(std::io::Error::other(format!(
                "expected {expect} ({n} bytes), got {name} ({} bytes)",
                bytes.len()
            )));
        }
        self.file.write_all(bytes)
    }

    pub fn finish(mut self) -> std::io::Result<()> {
        use std::io::Write;
        if let Some((name, _)) = self.pending.front() {
            return Err(std::io::Error::other(format!(
                "tensor {name} was never written"
            )));
        }
        self.file.flush()
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// A valid safetensors file of two small tensors, for mutating.
    fn sample() -> Vec<u8> {
        let header = br#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]}}"#;
        let mut f = (header.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(header);
        f.extend(std::iter::repeat_n(7u8, 22));
        f
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases()))]

        /// Random bytes, and a valid file with bytes overwritten, cut short or its length
        /// prefix replaced: an index whose every entry lies inside the file, or an error.
        #[test]
        fn fuzz_safetensors_headers(
            random in prop::collection::vec(any::<u8>(), 0..200),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            cut in any::<prop::sample::Index>(),
            len in prop::option::of(any::<u64>()),
        ) {
            let mut f = sample();
            for (at, b) in &edits {
                let i = at.index(f.len());
                f[i] = *b;
            }
            if let Some(l) = len {
                f[..8].copy_from_slice(&l.to_le_bytes());
            }
            let short = &f[..cut.index(f.len() + 1).min(f.len())];
            for bytes in [&random[..], &f[..], short] {
                if let Ok((start, entries)) = index_shard(bytes, 0) {
                    prop_assert!(start <= bytes.len());
                    for (_, e) in entries {
                        prop_assert!(start <= e.start && e.start <= e.end && e.end <= bytes.len());
                    }
                }
            }
        }
    }

    #[test]
    fn the_sample_indexes() {
        let (start, entries) = index_shard(&sample(), 0).unwrap();
        assert_eq!(entries.len(), 2);
        assert!(entries
            .iter()
            .all(|(_, e)| e.end <= sample().len() && e.start >= start));
    }
}
