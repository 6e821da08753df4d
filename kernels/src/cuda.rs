//! The CUDA backend (feature `cuda`): Switchyard's own kernels from `kernels/cuda/*.cu`,
//! compiled at run time by NVRTC and cached per device, and GEMMs through cuBLAS (`f32`
//! weights: f32 in and out; `bf16` weights: bf16 in, f32 accumulate and out).
//!
//! Every op here has a CPU twin in this crate that is its test oracle (`tests/cuda.rs`).
//! CUDA's libraries are loaded when first used (cudarc's dynamic loading): a build with the
//! feature needs no CUDA toolkit, and [`probe`] says why a machine cannot run it instead of
//! failing later.
//!
//! Invariants:
//! - The kernel sources include no CUDA header: each file is compiled as `common.cuh` + the
//!   file, so the NVRTC library alone (no toolkit) compiles them, as CI does.
//! - Activations are `f32` `[rows, cols]` row-major; weights are `[n, k]` row-major like the
//!   CPU's [`crate::WeightRef`]; the KV cache has the CPU layout `[block][slot][kv_head][d]`.
//! - All work of one [`Gpu`] is queued on its one stream, in call order.

pub use cudarc;
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
pub use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use cudarc::nvrtc::{CompileOptions, Ptx};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Helpers prepended to every kernel file.
pub const COMMON: &str = include_str!("../cuda/common.cuh");

/// Every kernel file and the kernels it defines.
pub const SOURCES: &[(&str, &str, &[&str])] = &[
    (
        "norm.cu",
        include_str!("../cuda/norm.cu"),
        &["rms_norm", "rms_norm_to"],
    ),
    (
        "elementwise.cu",
        include_str!("../cuda/elementwise.cu"),
        &[
            "add_inplace",
            "add_bias",
            "silu_mul",
            "to_bf16",
            "embed_f32",
            "embed_bf16",
        ],
    ),
    ("rope.cu", include_str!("../cuda/rope.cu"), &["rope"]),
    (
        "moe.cu",
        include_str!("../cuda/moe.cu"),
        &[
            "route_topk",
            "gather_rows",
            "combine_slots",
            "moe_gate_up_gemv",
            "moe_down_gemv",
            "combine_add",
        ],
    ),
    (
        "attention.cu",
        include_str!("../cuda/attention.cu"),
        &[
            "paged_attention_decode",
            "paged_attention_prefill",
            "kv_write",
        ],
    ),
    (
        "sampling.cu",
        include_str!("../cuda/sampling.cu"),
        &["sample_rows"],
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("NVRTC could not compile {file}: {log}")]
    Compile { file: &'static str, log: String },
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("cuBLAS: {0}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
    #[error("NCCL: {0:?}")]
    Nccl(cudarc::nccl::result::NcclError),
    #[error("CUDA unavailable: {0}")]
    Unavailable(String),
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },
}

impl From<cudarc::nccl::result::NcclError> for CudaError {
    fn from(e: cudarc::nccl::result::NcclError) -> Self {
        CudaError::Nccl(e)
    }
}

/// Compiles one kernel file (`common.cuh` + the file) to PTX with NVRTC. Needs only the
/// NVRTC library, no GPU.
pub fn compile(file: &'static str) -> Result<Ptx, CudaError> {
    let (_, src, _) = SOURCES
        .iter()
        .find(|(f, _, _)| *f == file)
        .ok_or_else(|| CudaError::Unavailable(format!("no kernel file {file}")))?;
    nvrtc_present()?;
    let opts = CompileOptions {
        name: Some(file.to_string()),
        // Exact IEEE division and square roots, as the CPU oracle computes.
        prec_div: Some(true),
        prec_sqrt: Some(true),
        ftz: Some(false),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(format!("{COMMON}\n{src}"), opts).map_err(|e| {
        CudaError::Compile {
            file,
            log: format!("{e:?}"),
        }
    })
}

fn nvrtc_present() -> Result<(), CudaError> {
    // SAFETY: only tries to open the library.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::Unavailable(
            "libnvrtc not found (install the nvidia-cuda-nvrtc wheel or the CUDA toolkit and \
             put its lib folder on LD_LIBRARY_PATH)"
                .into(),
        ))
    }
}

/// The number of CUDA devices here, or why none can be used (no driver library, no device).
pub fn probe() -> Result<usize, String> {
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("libcuda (the NVIDIA driver) not found".into());
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(n as usize),
        Ok(_) => Err("the driver reports no CUDA device".into()),
        Err(e) => Err(format!("the driver could not list devices: {e}")),
    }
}

/// A weight matrix on the device, `[n, k]` row-major.
pub enum DevWeight {
    F32(CudaSlice<f32>),
    /// bf16 as raw bits.
    Bf16(CudaSlice<u16>),
}

impl DevWeight {
    pub fn len(&self) -> usize {
        match self {
            DevWeight::F32(w) => w.len(),
            DevWeight::Bf16(w) => w.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn nbytes(&self) -> usize {
        match self {
            DevWeight::F32(w) => w.len() * 4,
            DevWeight::Bf16(w) => w.len() * 2,
        }
    }
}

/// One device: its context, stream, cuBLAS handle and compiled kernels.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<&'static str, CudaFunction>,
    /// bf16 staging for activations entering bf16 GEMMs.
    stage: Mutex<Option<CudaSlice<u16>>>,
}

// SAFETY: the handles are used through `&self` methods that queue on one stream; cuBLAS and
// the driver are thread-safe for a handle used by one thread at a time, which the staging
// mutex and the callers' ownership (one model per worker thread) guarantee.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

const THREADS: u32 = 256;

fn cfg1(blocks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn elems(n: usize) -> LaunchConfig {
    cfg1(n.div_ceil(THREADS as usize), THREADS)
}

impl Gpu {
    /// The device `ordinal`, set up once per process (kernels compiled on first use).
    pub fn get(ordinal: usize) -> Result<Arc<Gpu>, CudaError> {
        static CACHE: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = c.get(&ordinal) {
            return Ok(g.clone());
        }
        probe().map_err(CudaError::Unavailable)?;
        let ctx = CudaContext::new(ordinal)?;
        // One stream per device: no cross-stream event bookkeeping needed.
        // SAFETY: every buffer of this context is used on `stream` only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let blas = CudaBlas::new(stream.clone())?;
        let mut funcs = HashMap::new();
        for (file, _, names) in SOURCES {
            let module = ctx.load_module(compile(file)?)?;
            for n in *names {
                funcs.insert(*n, module.load_function(n)?);
            }
        }
        let g = Arc::new(Gpu {
            ctx,
            stream,
            blas,
            funcs,
            stage: Mutex::new(None),
        });
        c.insert(ordinal, g.clone());
        Ok(g)
    }

    fn f(&self, name: &str) -> &CudaFunction {
        &self.funcs[name]
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        Ok(self.stream.alloc_zeros::<T>(n.max(1))?)
    }
    /// An uninitialised buffer of `n` elements, for outputs a kernel writes in full.
    pub fn scratch<T: DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>, CudaError> {
        // SAFETY: callers only read what a kernel wrote first.
        Ok(unsafe { self.stream.alloc::<T>(n.max(1))? })
    }
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>, CudaError> {
        if host.is_empty() {
            // Zero-length allocations are not allowed; a 1-element buffer stands in.
            // SAFETY: never read (callers pass lengths, not the buffer's).
            return Ok(unsafe { self.stream.alloc::<T>(1)? });
        }
        Ok(self.stream.clone_htod(host)?)
    }
    pub fn upload_into<T: DeviceRepr>(
        &self,
        host: &[T],
        dst: &mut CudaSlice<T>,
    ) -> Result<(), CudaError> {
        if !host.is_empty() {
            self.stream
                .memcpy_htod(host, &mut dst.slice_mut(..host.len()))?;
        }
        Ok(())
    }
    pub fn download<T: DeviceRepr>(&self, dev: &CudaView<'_, T>) -> Result<Vec<T>, CudaError> {
        Ok(self.stream.clone_dtoh(dev)?)
    }
    pub fn weight(&self, w: crate::WeightRef<'_>) -> Result<DevWeight, CudaError> {
        Ok(match w {
            crate::WeightRef::F32(v) => DevWeight::F32(self.upload(v)?),
            crate::WeightRef::Bf16(v) => DevWeight::Bf16(self.upload(bytemuck::cast_slice(v))?),
            crate::WeightRef::Fp8(_) => {
                return Err(CudaError::Unavailable(
                    "FP8 weights on the CUDA backend are not implemented yet".into(),
                ))
            }
            crate::WeightRef::Mxfp4(_) => {
                return Err(CudaError::Unavailable(
                    "MXFP4 weights on the CUDA backend are not implemented yet".into(),
                ))
            }
        })
    }
    pub fn sync(&self) -> Result<(), CudaError> {
        Ok(self.stream.synchronize()?)
    }

    /// Device memory bandwidth, GB/s counting bytes read and written: best of 10
    /// device-to-device copies of `bytes`.
    pub fn copy_bandwidth_gb_s(&self, bytes: usize) -> Result<f64, CudaError> {
        let n = bytes / 4;
        let src = self.zeros::<f32>(n)?;
        let mut dst = self.zeros::<f32>(n)?;
        let mut best = 0.0f64;
        for _ in 0..10 {
            self.sync()?;
            let t = std::time::Instant::now();
            self.stream.memcpy_dtod(&src, &mut dst)?;
            self.sync()?;
            best = best.max(2.0 * (n * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
        Ok(best)
    }

    /// `out[m, n] = x[m, k] · w[n, k]ᵀ` (cuBLAS; `accumulate` adds into `out`, beta = 1).
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        x: &CudaView<'_, f32>,
        m: usize,
        k: usize,
        w: &DevWeight,
        n: usize,
        out: &mut CudaViewMut<'_, f32>,
        accumulate: bool,
    ) -> Result<(), CudaError> {
        self.linear_many(
            x,
            m,
            k,
            &mut [GemmJob {
                w,
                n,
                out,
                accumulate,
            }],
        )
    }

    /// Several products of the same input (q/k/v, gate/up): the input is rounded to bf16
    /// once for all the bf16 weights among them.
    pub fn linear_many(
        &self,
        x: &CudaView<'_, f32>,
        m: usize,
        k: usize,
        jobs: &mut [GemmJob<'_, '_>],
    ) -> Result<(), CudaError> {
        for j in jobs.iter() {
            if j.w.len() != j.n * k || x.len() < m * k || j.out.len() < m * j.n {
                return Err(CudaError::Shape {
                    op: "linear",
                    detail: format!(
                        "w {} for [{}, {k}], x {} for [{m}, {k}], out {} for [{m}, {}]",
                        j.w.len(),
                        j.n,
                        x.len(),
                        j.out.len(),
                        j.n
                    ),
                });
            }
        }
        if m == 0 {
            return Ok(());
        }
        let s = &self.stream;
        let mut stage = self.stage.lock().unwrap_or_else(|e| e.into_inner());
        if jobs.iter().any(|j| matches!(j.w, DevWeight::Bf16(_))) {
            if stage.as_ref().is_none_or(|b| b.len() < m * k) {
                // SAFETY: fully written by the cast below before any read.
                *stage = Some(unsafe { s.alloc::<u16>((m * k).next_power_of_two())? });
            }
            let xb = stage.as_mut().expect("staging allocated above");
            let count = (m * k) as i64;
            // SAFETY: kernel arguments match `to_bf16`'s signature.
            unsafe {
                s.launch_builder(self.f("to_bf16"))
                    .arg(x)
                    .arg(&mut *xb)
                    .arg(&count)
                    .launch(elems(m * k))?
            };
        }
        let (xp, _x) = x.device_ptr(s);
        for j in jobs.iter_mut() {
            let (wp, wt, bp) = match j.w {
                DevWeight::F32(wd) => {
                    (wd.device_ptr(s).0, blas_sys::cudaDataType_t::CUDA_R_32F, xp)
                }
                DevWeight::Bf16(wd) => (
                    wd.device_ptr(s).0,
                    blas_sys::cudaDataType_t::CUDA_R_16BF,
                    stage.as_ref().expect("cast above").device_ptr(s).0,
                ),
            };
            let (op, _c) = j.out.device_ptr_mut(s);
            let (alpha, beta) = (1.0f32, if j.accumulate { 1.0f32 } else { 0.0 });
            // Row-major out[m, n] is column-major [n, m] = op(W)[n, k] · X[k, m] with W
            // stored column-major [k, n] (transposed) and X column-major [k, m].
            // SAFETY: pointers are live for the call (one stream, no event tracking), sizes
            // checked above.
            unsafe {
                blas::gemm_ex(
                    *self.blas.handle(),
                    blas_sys::cublasOperation_t::CUBLAS_OP_T,
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    j.n as i32,
                    m as i32,
                    k as i32,
                    &alpha as *const f32 as *const _,
                    wp as *const _,
                    wt,
                    k as i32,
                    bp as *const _,
                    wt,
                    k as i32,
                    &beta as *const f32 as *const _,
                    op as *mut _,
                    blas_sys::cudaDataType_t::CUDA_R_32F,
                    j.n as i32,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )?
            };
        }
        Ok(())
    }

    /// RMSNorm of each `n`-long row of `x` in place (`rows` rows).
    pub fn rms_norm(
        &self,
        x: &mut CudaViewMut<'_, f32>,
        w: &CudaSlice<f32>,
        rows: usize,
        n: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let n32 = n as i32;
        // SAFETY: arguments match `rms_norm`.
        unsafe {
            self.stream
                .launch_builder(self.f("rms_norm"))
                .arg(x)
                .arg(w)
                .arg(&n32)
                .arg(&eps)
                .launch(cfg1(rows, THREADS))?
        };
        Ok(())
    }

    /// `out = rmsnorm(x)` row by row, `x` untouched.
    pub fn rms_norm_to(
        &self,
        x: &CudaView<'_, f32>,
        w: &CudaSlice<f32>,
        out: &mut CudaViewMut<'_, f32>,
        rows: usize,
        n: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let n32 = n as i32;
        // SAFETY: arguments match `rms_norm_to`.
        unsafe {
            self.stream
                .launch_builder(self.f("rms_norm_to"))
                .arg(x)
                .arg(w)
                .arg(out)
                .arg(&n32)
                .arg(&eps)
                .launch(cfg1(rows, THREADS))?
        };
        Ok(())
    }

    /// `a += b` over `n` elements.
    pub fn add(
        &self,
        a: &mut CudaViewMut<'_, f32>,
        b: &CudaView<'_, f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        let n64 = n as i64;
        // SAFETY: arguments match `add_inplace`.
        unsafe {
            self.stream
                .launch_builder(self.f("add_inplace"))
                .arg(a)
                .arg(b)
                .arg(&n64)
                .launch(elems(n))?
        };
        Ok(())
    }

    /// `x[r, :] += bias` for every row (`total` elements, rows of `n`).
    pub fn add_bias(
        &self,
        x: &mut CudaViewMut<'_, f32>,
        bias: &CudaSlice<f32>,
        n: usize,
        total: usize,
    ) -> Result<(), CudaError> {
        if total == 0 {
            return Ok(());
        }
        let (n32, t64) = (n as i32, total as i64);
        // SAFETY: arguments match `add_bias`.
        unsafe {
            self.stream
                .launch_builder(self.f("add_bias"))
                .arg(x)
                .arg(bias)
                .arg(&n32)
                .arg(&t64)
                .launch(elems(total))?
        };
        Ok(())
    }

    /// `g = silu(g) * u` over `n` elements.
    pub fn silu_mul(
        &self,
        g: &mut CudaViewMut<'_, f32>,
        u: &CudaView<'_, f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        let n64 = n as i64;
        // SAFETY: arguments match `silu_mul`.
        unsafe {
            self.stream
                .launch_builder(self.f("silu_mul"))
                .arg(g)
                .arg(u)
                .arg(&n64)
                .launch(elems(n))?
        };
        Ok(())
    }

    /// `out[r] = table[tokens[r]]` (rows of `h`), as `f32`.
    pub fn embed(
        &self,
        table: &DevWeight,
        tokens: &CudaSlice<u32>,
        rows: usize,
        h: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let h32 = h as i32;
        let s = &self.stream;
        // SAFETY: arguments match `embed_f32` / `embed_bf16`.
        unsafe {
            match table {
                DevWeight::F32(t) => s
                    .launch_builder(self.f("embed_f32"))
                    .arg(t)
                    .arg(tokens)
                    .arg(out)
                    .arg(&h32)
                    .launch(cfg1(rows, THREADS))?,
                DevWeight::Bf16(t) => s
                    .launch_builder(self.f("embed_bf16"))
                    .arg(t)
                    .arg(tokens)
                    .arg(out)
                    .arg(&h32)
                    .launch(cfg1(rows, THREADS))?,
            }
        };
        Ok(())
    }

    /// Rotates `x` (`[rows, heads, dim]`) for each row's position.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &mut CudaViewMut<'_, f32>,
        pos: &CudaSlice<u32>,
        inv_freq: &CudaSlice<f32>,
        attention_factor: f32,
        rows: usize,
        heads: usize,
        dim: usize,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let (h32, d32) = (heads as i32, dim as i32);
        // SAFETY: arguments match `rope`.
        unsafe {
            self.stream
                .launch_builder(self.f("rope"))
                .arg(x)
                .arg(pos)
                .arg(inv_freq)
                .arg(&attention_factor)
                .arg(&h32)
                .arg(&d32)
                .launch(cfg1(rows, 128))?
        };
        Ok(())
    }

    /// Router top-k over `[rows, experts]` logits into ids and weights `[rows, k]`.
    #[allow(clippy::too_many_arguments)]
    pub fn route_topk(
        &self,
        logits: &CudaView<'_, f32>,
        rows: usize,
        experts: usize,
        k: usize,
        normalize: bool,
        ids: &mut CudaViewMut<'_, u32>,
        weights: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), CudaError> {
        if k > 32 || k > experts {
            return Err(CudaError::Shape {
                op: "route_topk",
                detail: format!("top-{k} of {experts} experts (at most top-32)"),
            });
        }
        if rows == 0 {
            return Ok(());
        }
        let (r32, e32, k32, n32) = (rows as i32, experts as i32, k as i32, normalize as i32);
        // SAFETY: arguments match `route_topk`.
        unsafe {
            self.stream
                .launch_builder(self.f("route_topk"))
                .arg(logits)
                .arg(&r32)
                .arg(&e32)
                .arg(&k32)
                .arg(&n32)
                .arg(ids)
                .arg(weights)
                .launch(cfg1(rows.div_ceil(64), 64))?
        };
        Ok(())
    }

    /// `dst[i] = src[idx[i]]` for `n` rows of `cols`.
    pub fn gather_rows(
        &self,
        src: &CudaView<'_, f32>,
        idx: &CudaView<'_, u32>,
        dst: &mut CudaViewMut<'_, f32>,
        n: usize,
        cols: usize,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        let c32 = cols as i32;
        // SAFETY: arguments match `gather_rows`.
        unsafe {
            self.stream
                .launch_builder(self.f("gather_rows"))
                .arg(src)
                .arg(idx)
                .arg(dst)
                .arg(&c32)
                .launch(cfg1(n, THREADS))?
        };
        Ok(())
    }

    /// `out[t] = Σ_s w[t, s] · packed[slot_row[t, s]]` in slot order, `t` tokens.
    #[allow(clippy::too_many_arguments)]
    pub fn combine_slots(
        &self,
        packed: &CudaView<'_, f32>,
        slot_row: &CudaView<'_, u32>,
        w: &CudaView<'_, f32>,
        out: &mut CudaViewMut<'_, f32>,
        t: usize,
        k: usize,
        h: usize,
    ) -> Result<(), CudaError> {
        if t == 0 {
            return Ok(());
        }
        let (k32, h32) = (k as i32, h as i32);
        // SAFETY: arguments match `combine_slots`.
        unsafe {
            self.stream
                .launch_builder(self.f("combine_slots"))
                .arg(packed)
                .arg(slot_row)
                .arg(w)
                .arg(out)
                .arg(&k32)
                .arg(&h32)
                .launch(cfg1(t, THREADS))?
        };
        Ok(())
    }

    /// The experts of `t` tokens (`k` choices each, `ids` `[t, k]`) for small batches, with no
    /// host round-trip: `hs[t] += Σ_s w[t, s] · expert_{ids[t,s]}(x[t])`. `act` and `y` are
    /// scratch of at least `t·k·inter` and `t·k·h`.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_small_batch(
        &self,
        x: &CudaView<'_, f32>,
        ids: &CudaView<'_, u32>,
        w: &CudaView<'_, f32>,
        experts: &ExpertTable,
        t: usize,
        k: usize,
        hs: &mut CudaViewMut<'_, f32>,
        act: &mut CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let (h, inter) = (experts.hidden, experts.inter);
        let n = t * k;
        if n == 0 {
            return Ok(());
        }
        if h * 4 > 48 * 1024 || inter * 4 > 48 * 1024 {
            return Err(CudaError::Shape {
                op: "moe_small_batch",
                detail: format!("hidden {h} / expert width {inter} above 12288"),
            });
        }
        if act.len() < n * inter || y.len() < n * h || ids.len() < n || w.len() < n {
            return Err(CudaError::Shape {
                op: "moe_small_batch",
                detail: format!("{n} pairs, act {}, y {}", act.len(), y.len()),
            });
        }
        let (k32, h32, i32_, b) = (k as i32, h as i32, inter as i32, experts.bf16 as i32);
        let warps = 8u32;
        let s = &self.stream;
        // SAFETY: arguments match the kernels' signatures; the pointer tables hold live
        // weights of `experts.hidden` x `experts.inter` shapes.
        unsafe {
            s.launch_builder(self.f("moe_gate_up_gemv"))
                .arg(x)
                .arg(ids)
                .arg(&k32)
                .arg(&experts.gate)
                .arg(&experts.up)
                .arg(&b)
                .arg(&mut *act)
                .arg(&h32)
                .arg(&i32_)
                .launch(LaunchConfig {
                    grid_dim: (n as u32, (inter as u32).div_ceil(warps), 1),
                    block_dim: (32 * warps, 1, 1),
                    shared_mem_bytes: (h * 4) as u32,
                })?;
            s.launch_builder(self.f("moe_down_gemv"))
                .arg(&*act)
                .arg(ids)
                .arg(&experts.down)
                .arg(&b)
                .arg(&mut *y)
                .arg(&h32)
                .arg(&i32_)
                .launch(LaunchConfig {
                    grid_dim: (n as u32, (h as u32).div_ceil(warps), 1),
                    block_dim: (32 * warps, 1, 1),
                    shared_mem_bytes: (inter * 4) as u32,
                })?;
            s.launch_builder(self.f("combine_add"))
                .arg(&*y)
                .arg(w)
                .arg(hs)
                .arg(&k32)
                .arg(&h32)
                .launch(cfg1(t, THREADS))?;
        }
        Ok(())
    }

    /// Device pointer tables of one layer's experts (every expert present, one dtype).
    pub fn expert_table(
        &self,
        experts: &[(&DevWeight, &DevWeight, &DevWeight)],
        hidden: usize,
        inter: usize,
    ) -> Result<ExpertTable, CudaError> {
        let s = &self.stream;
        let ptr = |w: &DevWeight| match w {
            DevWeight::F32(d) => d.device_ptr(s).0,
            DevWeight::Bf16(d) => d.device_ptr(s).0,
        };
        let bf16 = experts
            .first()
            .is_some_and(|e| matches!(e.0, DevWeight::Bf16(_)));
        for (g, u, d) in experts {
            for m in [g, u, d] {
                if matches!(m, DevWeight::Bf16(_)) != bf16 {
                    return Err(CudaError::Shape {
                        op: "expert_table",
                        detail: "experts of mixed dtypes".into(),
                    });
                }
            }
            if g.len() != hidden * inter || u.len() != hidden * inter || d.len() != hidden * inter {
                return Err(CudaError::Shape {
                    op: "expert_table",
                    detail: format!("an expert is not [{inter}, {hidden}] / [{hidden}, {inter}]"),
                });
            }
        }
        let gate: Vec<u64> = experts.iter().map(|e| ptr(e.0)).collect();
        let up: Vec<u64> = experts.iter().map(|e| ptr(e.1)).collect();
        let down: Vec<u64> = experts.iter().map(|e| ptr(e.2)).collect();
        Ok(ExpertTable {
            gate: self.upload(&gate)?,
            up: self.upload(&up)?,
            down: self.upload(&down)?,
            bf16,
            hidden,
            inter,
        })
    }

    /// Writes each row's keys and values (`[rows, kvw]`) at its position.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_write(
        &self,
        k: &CudaView<'_, f32>,
        v: &CudaView<'_, f32>,
        kc: &mut CudaSlice<f32>,
        vc: &mut CudaSlice<f32>,
        rows: &AttnRows,
        kvw: usize,
        block_size: usize,
    ) -> Result<(), CudaError> {
        if rows.n == 0 {
            return Ok(());
        }
        let (w32, b32) = (kvw as i32, block_size as i32);
        // SAFETY: arguments match `kv_write`.
        unsafe {
            self.stream
                .launch_builder(self.f("kv_write"))
                .arg(k)
                .arg(v)
                .arg(kc)
                .arg(vc)
                .arg(&rows.tables)
                .arg(&rows.table_off)
                .arg(&rows.pos)
                .arg(&w32)
                .arg(&b32)
                .launch(cfg1(rows.n, 128))?
        };
        Ok(())
    }

    /// Paged attention for every row of `rows`: single-row groups through the decode kernel,
    /// prefill tiles through the tiled kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &CudaView<'_, f32>,
        kc: &CudaSlice<f32>,
        vc: &CudaSlice<f32>,
        rows: &AttnRows,
        p: &GpuAttn,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), CudaError> {
        if p.head_dim == 0 || p.head_dim > 256 || p.kv_heads == 0 || p.heads % p.kv_heads != 0 {
            return Err(CudaError::Shape {
                op: "attention",
                detail: format!(
                    "head_dim {} (1 to 256), {} heads over {} kv heads",
                    p.head_dim, p.heads, p.kv_heads
                ),
            });
        }
        if rows.n == 0 {
            return Ok(());
        }
        let (h32, kvh32, d32, bs32, w32) = (
            p.heads as i32,
            p.kv_heads as i32,
            p.head_dim as i32,
            p.block_size as i32,
            p.window.unwrap_or(0) as i32,
        );
        let s = &self.stream;
        if rows.tiles == 0 {
            // SAFETY: arguments match `paged_attention_decode`.
            unsafe {
                s.launch_builder(self.f("paged_attention_decode"))
                    .arg(q)
                    .arg(kc)
                    .arg(vc)
                    .arg(&rows.tables)
                    .arg(&rows.table_off)
                    .arg(&rows.pos)
                    .arg(out)
                    .arg(&h32)
                    .arg(&kvh32)
                    .arg(&d32)
                    .arg(&bs32)
                    .arg(&p.scale)
                    .arg(&w32)
                    .launch(LaunchConfig {
                        grid_dim: (rows.n as u32, p.heads as u32, 1),
                        block_dim: (128, 1, 1),
                        shared_mem_bytes: 0,
                    })?
            };
        } else {
            // Keys per shared-memory tile: the most that fit the default 48 KiB.
            let tq = rows.tile_rows;
            let smem_for = |tk: usize| (tq * p.head_dim + tk * (2 * p.head_dim + 1)) * 4;
            let tk = [32usize, 16, 8]
                .into_iter()
                .find(|&tk| smem_for(tk) <= 48 * 1024)
                .unwrap_or(8);
            let smem = smem_for(tk);
            let tk32 = tk as i32;
            // SAFETY: arguments match `paged_attention_prefill`.
            unsafe {
                s.launch_builder(self.f("paged_attention_prefill"))
                    .arg(q)
                    .arg(kc)
                    .arg(vc)
                    .arg(&rows.tables)
                    .arg(&rows.table_off)
                    .arg(&rows.pos)
                    .arg(&rows.tile_row)
                    .arg(&rows.tile_len)
                    .arg(out)
                    .arg(&h32)
                    .arg(&kvh32)
                    .arg(&d32)
                    .arg(&bs32)
                    .arg(&p.scale)
                    .arg(&w32)
                    .arg(&tk32)
                    .launch(LaunchConfig {
                        grid_dim: (rows.tiles as u32, p.heads as u32, 1),
                        block_dim: (128, 1, 1),
                        shared_mem_bytes: smem as u32,
                    })?
            };
        }
        Ok(())
    }

    /// Samples one token per row of `logits` (`[rows, vocab]`, overwritten); `u` holds each
    /// row's uniform draw from its request's generator. Temperature and the filters only:
    /// the logits come already adjusted ([`crate::sampling::adjust_logits`]: bans, bias,
    /// penalties).
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        logits: &mut CudaViewMut<'_, f32>,
        rows: usize,
        vocab: usize,
        params: &[crate::sampling::SamplingParams],
        u: &[f32],
    ) -> Result<Vec<u32>, CudaError> {
        if params.len() != rows || u.len() != rows {
            return Err(CudaError::Shape {
                op: "sample",
                detail: format!("{rows} rows, {} params, {} draws", params.len(), u.len()),
            });
        }
        if rows == 0 {
            return Ok(Vec::new());
        }
        let t: Vec<f32> = params.iter().map(|p| p.temperature).collect();
        let k: Vec<i32> = params.iter().map(|p| p.top_k as i32).collect();
        let tp: Vec<f32> = params.iter().map(|p| p.top_p).collect();
        let mp: Vec<f32> = params.iter().map(|p| p.min_p).collect();
        let (t, k, tp, mp, ud) = (
            self.upload(&t)?,
            self.upload(&k)?,
            self.upload(&tp)?,
            self.upload(&mp)?,
            self.upload(u)?,
        );
        let mut out = self.zeros::<u32>(rows)?;
        let v32 = vocab as i32;
        // SAFETY: arguments match `sample_rows`.
        unsafe {
            self.stream
                .launch_builder(self.f("sample_rows"))
                .arg(logits)
                .arg(&v32)
                .arg(&t)
                .arg(&k)
                .arg(&tp)
                .arg(&mp)
                .arg(&ud)
                .arg(&mut out)
                .launch(cfg1(rows, THREADS))?
        };
        let mut v = self.download(&out.slice(..))?;
        v.truncate(rows);
        Ok(v)
    }
}

/// Token-slot pairs up to which a step's experts run through [`Gpu::moe_small_batch`]
/// (each pair reads its expert's weights; above this, grouping by expert reads less).
pub const SMALL_BATCH_PAIRS: usize = 32;

/// Device pointers to one layer's expert weights, for [`Gpu::moe_small_batch`]. Valid while
/// the weights it was built from live (the model owns both).
pub struct ExpertTable {
    gate: CudaSlice<u64>,
    up: CudaSlice<u64>,
    down: CudaSlice<u64>,
    bf16: bool,
    hidden: usize,
    inter: usize,
}

impl ExpertTable {
    /// Whether [`Gpu::moe_small_batch`] serves these shapes.
    pub fn fits_small_batch(&self) -> bool {
        self.hidden * 4 <= 48 * 1024 && self.inter * 4 <= 48 * 1024
    }
}

/// One product of [`Gpu::linear_many`].
pub struct GemmJob<'a, 'b> {
    pub w: &'a DevWeight,
    pub n: usize,
    pub out: &'a mut CudaViewMut<'b, f32>,
    pub accumulate: bool,
}

/// Attention geometry.
#[derive(Clone, Copy, Debug)]
pub struct GpuAttn {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub scale: f32,
    pub window: Option<usize>,
}

/// The query rows of one step on the device: each row's block table (offset into the
/// concatenated tables) and position, and, for steps with multi-token chunks, the prefill
/// tiles (consecutive rows of one sequence).
pub struct AttnRows {
    pub n: usize,
    pub tables: CudaSlice<u32>,
    pub table_off: CudaSlice<u32>,
    pub pos: CudaSlice<u32>,
    pub tiles: usize,
    pub tile_rows: usize,
    pub tile_row: CudaSlice<u32>,
    pub tile_len: CudaSlice<u32>,
}

/// Rows per prefill tile (4 warps × 4 rows).
pub const TILE_ROWS: usize = 16;

impl AttnRows {
    /// `chunks`: per sequence chunk, its block table, first position and token count; rows
    /// are the chunks' tokens in order. Tiles are built when any chunk has more than one
    /// token (then every chunk is tiled, decode rows as one-row tiles).
    pub fn new(gpu: &Gpu, chunks: &[(&[u32], usize, usize)]) -> Result<Self, CudaError> {
        let mut tables = Vec::new();
        let mut table_off = Vec::new();
        let mut pos = Vec::new();
        let mut tile_row = Vec::new();
        let mut tile_len = Vec::new();
        let prefill = chunks.iter().any(|c| c.2 > 1);
        for &(table, start, n) in chunks {
            let off = tables.len() as u32;
            tables.extend_from_slice(table);
            let first_row = pos.len();
            for j in 0..n {
                table_off.push(off);
                pos.push((start + j) as u32);
            }
            if prefill {
                let mut j = 0;
                while j < n {
                    let len = TILE_ROWS.min(n - j);
                    tile_row.push((first_row + j) as u32);
                    tile_len.push(len as u32);
                    j += len;
                }
            }
        }
        Ok(AttnRows {
            n: pos.len(),
            tables: gpu.upload(&tables)?,
            table_off: gpu.upload(&table_off)?,
            pos: gpu.upload(&pos)?,
            tiles: tile_row.len(),
            tile_rows: TILE_ROWS,
            tile_row: gpu.upload(&tile_row)?,
            tile_len: gpu.upload(&tile_len)?,
        })
    }
}
