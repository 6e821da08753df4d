//! The self-contained HTML report: a summary table and SVG plots, no scripts or external
//! resources, so it opens from a file anywhere.

use crate::metrics::{Record, Summary};

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const W: f64 = 640.0;
const H: f64 = 260.0;
const PAD: f64 = 48.0;

fn axes(title: &str, xlab: &str, ylab: &str, x: (f64, f64), y: (f64, f64)) -> String {
    let mut s = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" class="plot"><text x="{}" y="16" text-anchor="middle" font-weight="bold">{}</text><line x1="{PAD}" y1="{}" x2="{}" y2="{}" stroke="#333"/><line x1="{PAD}" y1="24" x2="{PAD}" y2="{}" stroke="#333"/><text x="{}" y="{}" text-anchor="middle">{}</text><text x="12" y="{}" transform="rotate(-90 12 {})" text-anchor="middle">{}</text>"##,
        W / 2.0,
        esc(title),
        H - PAD,
        W - 10.0,
        H - PAD,
        H - PAD,
        W / 2.0,
        H - 8.0,
        esc(xlab),
        H / 2.0,
        H / 2.0,
        esc(ylab)
    );
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let (xv, yv) = (x.0 + f * (x.1 - x.0), y.0 + f * (y.1 - y.0));
        let (px, py) = (PAD + f * (W - PAD - 10.0), H - PAD - f * (H - PAD - 24.0));
        s += &format!(
            r##"<text x="{px}" y="{}" text-anchor="middle" font-size="10">{}</text><text x="{}" y="{}" text-anchor="end" font-size="10">{}</text>"##,
            H - PAD + 14.0,
            fmt(xv),
            PAD - 4.0,
            py + 3.0,
            fmt(yv)
        );
    }
    s
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn px(v: f64, lo: f64, hi: f64) -> f64 {
    PAD + (v - lo) / (hi - lo).max(1e-12) * (W - PAD - 10.0)
}
fn py(v: f64, lo: f64, hi: f64) -> f64 {
    H - PAD - (v - lo) / (hi - lo).max(1e-12) * (H - PAD - 24.0)
}

/// A histogram of `values` (already in display units).
pub fn histogram(title: &str, unit: &str, values: &[f64]) -> String {
    if values.is_empty() {
        return format!("<p>{}: no data</p>", esc(title));
    }
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max)
        .max(lo + 1e-9);
    let bins = 40;
    let mut c = vec![0usize; bins];
    for v in values {
        let b = (((v - lo) / (hi - lo)) * bins as f64) as usize;
        c[b.min(bins - 1)] += 1;
    }
    let top = *c.iter().max().unwrap_or(&1) as f64;
    let mut s = axes(title, unit, "requests", (lo, hi), (0.0, top));
    let bw = (W - PAD - 10.0) / bins as f64;
    for (i, n) in c.iter().enumerate() {
        let x = PAD + i as f64 * bw;
        let y = py(*n as f64, 0.0, top);
        s += &format!(
            r##"<rect class="bar" x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="#4a7fb5"/>"##,
            bw - 1.0,
            H - PAD - y
        );
    }
    s + "</svg>"
}

/// Points `(x, y, ok)`; failures in red.
pub fn scatter(title: &str, xlab: &str, ylab: &str, pts: &[(f64, f64, bool)]) -> String {
    if pts.is_empty() {
        return format!("<p>{}: no data</p>", esc(title));
    }
    let (x0, x1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
        (a.0.min(p.0), a.1.max(p.0))
    });
    let y1 = pts.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-9);
    let mut s = axes(title, xlab, ylab, (x0, x1), (0.0, y1));
    for (x, y, ok) in pts {
        s += &format!(
            r##"<circle class="pt" cx="{:.1}" cy="{:.1}" r="2" fill="{}"/>"##,
            px(*x, x0, x1),
            py(*y, 0.0, y1),
            if *ok { "#4a7fb5" } else { "#d33" }
        );
    }
    s + "</svg>"
}

/// Named series of `(x, y)` as lines.
pub fn lines(title: &str, xlab: &str, ylab: &str, series: &[(&str, Vec<(f64, f64)>)]) -> String {
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.1.clone()).collect();
    if all.is_empty() {
        return format!("<p>{}: no data</p>", esc(title));
    }
    let x0 = all.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let x1 = all
        .iter()
        .map(|p| p.0)
        .fold(f64::NEG_INFINITY, f64::max)
        .max(x0 + 1e-9);
    let y1 = all.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-9);
    let colors = ["#4a7fb5", "#d9822b", "#2e9e5b", "#9b59b6", "#d33"];
    let mut s = axes(title, xlab, ylab, (x0, x1), (0.0, y1));
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = colors[i % colors.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x, x0, x1), py(*y, 0.0, y1)))
            .collect();
        s += &format!(
            r##"<polyline class="line" fill="none" stroke="{c}" stroke-width="2" points="{}"/><text x="{}" y="{}" fill="{c}" font-size="11">{}</text>"##,
            path.join(" "),
            W - 150.0,
            36.0 + 14.0 * i as f64,
            esc(name)
        );
    }
    s + "</svg>"
}

fn page(title: &str, body: &str) -> String {
    format!(
        r##"<!doctype html><html><head><meta charset="utf-8"><title>{t}</title><style>body{{font-family:sans-serif;margin:24px;color:#222}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}th{{background:#f3f3f3}}.plot{{margin:8px;border:1px solid #eee}}</style></head><body><h1>{t}</h1>{body}</body></html>"##,
        t = esc(title)
    )
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{:.2}", v * 1e3)
    }
}

/// The report of one run.
pub fn run_report(title: &str, s: &Summary, records: &[Record]) -> String {
    let mut b = format!(
        "<p>window {:.1}–{:.1} s ({:.1} s): {} requests, {} ok, error rate {:.4}; {:.2} req/s, \
         {:.1} output tokens/s, goodput {:.2} req/s; measured send rate {:.2}/s{}</p>",
        s.window_start_s,
        s.window_end_s,
        s.window_s,
        s.requests,
        s.ok,
        s.error_rate,
        s.requests_per_s,
        s.output_tokens_per_s,
        s.goodput_per_s,
        s.measured_rate,
        s.target_rate
            .map_or(String::new(), |t| format!(" (target {t:.2}/s)"))
    );
    b += "<table id=\"latency\"><tr><th>metric (ms)</th><th>count</th><th>mean</th><th>p50</th><th>p90</th><th>p95</th><th>p99</th><th>p99.9</th><th>max</th></tr>";
    for (n, st) in [
        ("TTFT", &s.ttft),
        ("TTFA", &s.ttfa),
        ("ITL per token", &s.itl_token),
        ("ITL per message", &s.itl_message),
        ("TPOT", &s.tpot),
        ("E2E", &s.e2e),
        ("schedule lag", &s.schedule_lag),
    ] {
        b += &format!(
            "<tr><th>{n}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            st.count,
            ms(st.mean),
            ms(st.p50),
            ms(st.p90),
            ms(st.p95),
            ms(st.p99),
            ms(st.p999),
            ms(st.max)
        );
    }
    b += "</table><table id=\"status\"><tr><th>status</th><th>requests</th></tr>";
    for (k, v) in &s.by_status {
        b += &format!("<tr><th>{}</th><td>{v}</td></tr>", esc(k));
    }
    b += "</table>";
    let w: Vec<&Record> = records.iter().filter(|r| r.in_window && r.ok()).collect();
    let ttft: Vec<f64> = w.iter().filter_map(|r| r.ttft_s).map(|v| v * 1e3).collect();
    let itl: Vec<f64> = w
        .iter()
        .flat_map(|r| r.itl_tokens())
        .map(|v| v * 1e3)
        .collect();
    b += &histogram("TTFT", "ms", &ttft);
    b += &histogram("ITL per token", "ms", &itl);
    let pts: Vec<(f64, f64, bool)> = records
        .iter()
        .map(|r| (r.sent_s, r.e2e_s() * 1e3, r.ok() || r.status == "cancelled"))
        .collect();
    b += &scatter(
        "Timeline: end-to-end latency by send time",
        "sent (s)",
        "E2E (ms)",
        &pts,
    );
    // Output tokens per second over time (1 s bins by end time).
    let end = records.iter().map(|r| r.end_s).fold(0.0, f64::max);
    let bins = end.ceil().max(1.0) as usize;
    let mut tok = vec![0.0; bins];
    for r in records.iter().filter(|r| r.ok()) {
        tok[(r.end_s as usize).min(bins - 1)] += r.output_tokens as f64;
    }
    let series: Vec<(f64, f64)> = tok
        .iter()
        .enumerate()
        .map(|(i, t)| (i as f64, *t))
        .collect();
    b += &lines(
        "Throughput over time",
        "time (s)",
        "output tokens/s",
        &[("tokens/s", series)],
    );
    page(title, &b)
}

/// One rate of a sweep: the summaries of its repeats and whether it met the SLOs.
pub struct SweepPoint {
    pub rate: f64,
    pub pass: bool,
    pub runs: Vec<Summary>,
}

/// The report of a sweep: latency percentiles and throughput against offered load.
pub fn sweep_report(title: &str, points: &[SweepPoint], knee: &str) -> String {
    let mut pts: Vec<&SweepPoint> = points.iter().collect();
    pts.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let avg = |p: &SweepPoint, f: &dyn Fn(&Summary) -> f64| {
        p.runs.iter().map(f).sum::<f64>() / p.runs.len().max(1) as f64
    };
    let series = |f: &dyn Fn(&Summary) -> f64| -> Vec<(f64, f64)> {
        pts.iter().map(|p| (p.rate, avg(p, f))).collect()
    };
    let mut b = format!("<p>{}</p><table id=\"sweep\"><tr><th>rate</th><th>pass</th><th>req/s</th><th>TTFT p99 ms</th><th>ITL p99 ms</th><th>errors</th></tr>", esc(knee));
    for p in &pts {
        b += &format!(
            "<tr><td>{:.2}</td><td>{}</td><td>{:.2}</td><td>{}</td><td>{}</td><td>{:.4}</td></tr>",
            p.rate,
            if p.pass { "yes" } else { "no" },
            avg(p, &|s| s.requests_per_s),
            ms(avg(p, &|s| s.ttft.p99)),
            ms(avg(p, &|s| s.itl_token.p99)),
            avg(p, &|s| s.error_rate)
        );
    }
    b += "</table>";
    b += &lines(
        "Latency vs offered load",
        "offered rate (req/s)",
        "ms",
        &[
            ("TTFT p50", series(&|s| s.ttft.p50 * 1e3)),
            ("TTFT p99", series(&|s| s.ttft.p99 * 1e3)),
            ("ITL p50", series(&|s| s.itl_token.p50 * 1e3)),
            ("ITL p99", series(&|s| s.itl_token.p99 * 1e3)),
        ],
    );
    b += &lines(
        "Throughput vs offered load",
        "offered rate (req/s)",
        "per second",
        &[
            ("requests/s", series(&|s| s.requests_per_s)),
            ("goodput/s", series(&|s| s.goodput_per_s)),
        ],
    );
    page(title, &b)
}
