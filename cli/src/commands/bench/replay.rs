//! `llamarec bench replay`: open-loop rate sweeps against a running cluster (`llamarec up`),
//! retriever-only and full two-stage, with the ranker's queue depth
//! (`llamarec_ranker_queue_depth`, scraped from its Prometheus endpoint) and the requests in
//! flight as the client sees them, sampled every 250 ms: the ranker autoscaling signal against
//! load. Writes JSON and a PNG plot.

use super::write_json;
use crate::commands::traffic::dataset_users;
use anyhow::{bail, Result};
use gateway::config::GatewayConfig;
use crate::loadgen::replay::{Progress, ReplayOptions};
use crate::loadgen::report::Report;
use crate::loadgen::schedule::Schedule;
use crate::loadgen::synth::synth;
use llamarec_common::config::ConfigLayers;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, clap::Args)]
pub struct ReplayBenchArgs {
    /// Gateway address (default: `[gateway] listen`).
    #[arg(long)]
    gateway: Option<String>,
    /// The ranker's Prometheus endpoint (`[ranker] metrics_listen`).
    #[arg(long, default_value = "127.0.0.1:9092")]
    ranker_metrics: String,
    /// Offered rates of the retriever-only sweep (req/s); the flag with no value skips it.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "250,500,1000,2000,4000")]
    retriever_rates: Vec<f64>,
    /// Seconds per retriever-only step.
    #[arg(long, default_value_t = 8.0)]
    retriever_step_s: f64,
    /// Offered rates of the two-stage sweep (req/s); the flag with no value skips it.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "0.25,0.5,1,2")]
    two_stage_rates: Vec<f64>,
    /// Seconds per two-stage step.
    #[arg(long, default_value_t = 40.0)]
    two_stage_step_s: f64,
    /// gRPC deadline of every request (default: none sent, so the gateway applies its
    /// `default_deadline_ms` and answers degraded when the ranker runs out of it; a client
    /// deadline equal to the gateway's would race the degraded answer).
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Connections to the gateway.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Client bound on requests in flight (excess counted as errors).
    #[arg(long, default_value_t = 1024)]
    max_outstanding: usize,
    /// p99 targets (ms) at which the highest sustained rate is reported.
    #[arg(long, value_delimiter = ',', default_value = "10,50,100,2000,5000")]
    p99_targets_ms: Vec<f64>,
    /// Write the results here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the sweep here (PNG).
    #[arg(long)]
    plot: Option<PathBuf>,
    #[command(flatten)]
    access: crate::commands::gateway_access::GatewayAccess,
}

/// Scrapes one gauge from a Prometheus text endpoint; `None` when unreachable or absent.
async fn scrape(addr: &str, metric: &str) -> Option<f64> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
        let mut body = Vec::new();
        stream.read_to_end(&mut body).await.ok()?;
        Some(String::from_utf8_lossy(&body).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(1), fetch).await.ok()??;
    text.lines().find_map(|l| l.strip_prefix(metric).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// Mean and max of samples.
fn stats(samples: &[f64]) -> Value {
    if samples.is_empty() {
        return json!({ "samples": 0, "mean": null, "max": null });
    }
    json!({
        "samples": samples.len(),
        "mean": samples.iter().sum::<f64>() / samples.len() as f64,
        "max": samples.iter().copied().fold(f64::MIN, f64::max),
    })
}

struct Step {
    report: Report,
    queue_depth: Vec<f64>,
    in_flight: Vec<f64>,
}

/// One open-loop step at `rate`, sampling the ranker's queue depth and the client's in-flight
/// count while it runs.
async fn step(users: &[String], skip_ranker: bool, rate: f64, seconds: f64, seed: u64, args: &ReplayBenchArgs, gateway: &str) -> Result<Step> {
    let traffic = synth(users, rate, Duration::from_secs_f64(seconds), if skip_ranker { 1.0 } else { 0.0 }, 10, 0, seed);
    if traffic.is_empty() {
        bail!("no arrivals at {rate} req/s in {seconds} s: lengthen the step");
    }
    let options = ReplayOptions {
        gateway: gateway.to_string(),
        connections: args.connections,
        schedule: Schedule::Recorded { speed: 1.0 },
        max_outstanding: args.max_outstanding,
        deadline: args.deadline_ms.map(Duration::from_millis),
        tls: args.access.tls()?,
        bearer: args.access.bearer()?,
    };
    let progress = Arc::new(Progress::default());
    let sampler = {
        let (progress, addr) = (progress.clone(), args.ranker_metrics.clone());
        tokio::spawn(async move {
            let (mut depth, mut in_flight) = (Vec::new(), Vec::new());
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                in_flight.push(progress.outstanding.load(Ordering::Relaxed) as f64);
                if !skip_ranker {
                    if let Some(d) = scrape(&addr, "llamarec_ranker_queue_depth").await {
                        depth.push(d);
                    }
                }
                if progress.total.load(Ordering::Relaxed) > 0 && progress.sent.load(Ordering::Relaxed) >= progress.total.load(Ordering::Relaxed) && progress.outstanding.load(Ordering::Relaxed) == 0 {
                    return (depth, in_flight);
                }
            }
        })
    };
    let report = crate::commands::replay::run_with_progress(&traffic, &options, progress).await;
    let (queue_depth, in_flight) = tokio::time::timeout(Duration::from_secs(5), sampler).await.map(|r| r.unwrap_or_default()).unwrap_or_default();
    Ok(Step { report: report?, queue_depth, in_flight })
}

fn step_json(mode: &str, rate: f64, s: &Step) -> Value {
    let r = &s.report;
    let ranked = r.completed - r.degraded;
    json!({
        "mode": mode,
        "offered_rate": rate,
        "measured_offered_rate": r.offered_rate,
        "throughput": r.throughput,
        "ranked_throughput": ranked as f64 / r.duration_s,
        "degraded_share": if r.completed > 0 { r.degraded as f64 / r.completed as f64 } else { 0.0 },
        "ranker_queue_depth": stats(&s.queue_depth),
        "client_in_flight": stats(&s.in_flight),
        "report": r,
    })
}

/// The highest offered rate whose step kept p99 within `target_ms` with no errors (and, for two
/// stages, at most 1% degraded).
fn rate_at_target(steps: &[Value], target_ms: f64) -> Value {
    let ok = |s: &&Value| {
        s["report"]["errors"].as_u64() == Some(0)
            && s["report"]["latency"]["p99_ms"].as_f64().is_some_and(|p| p <= target_ms)
            && s["degraded_share"].as_f64().is_some_and(|d| d <= 0.01)
    };
    steps.iter().filter(ok).map(|s| s["offered_rate"].as_f64().unwrap_or(0.0)).fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r)))).map_or(Value::Null, |r| json!(r))
}

pub async fn run(layers: &ConfigLayers, args: ReplayBenchArgs) -> Result<()> {
    let gateway = match &args.gateway {
        Some(g) => g.clone(),
        None => layers.section::<GatewayConfig>()?.listen.to_string(),
    };
    let users = dataset_users(layers)?;
    // Warm-up (not reported): every user once, retriever only, so the gateway's history cache
    // and the connections are warm.
    eprintln!("warm-up: {} users once, retriever only", users.len());
    let warm: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(i, u)| gateway::traffic::TrafficRecord {
            offset_ms: i as f64 * 2.0,
            unix_ms: None,
            user_id: u.clone(),
            k: 10,
            candidates: 0,
            skip_ranker: true,
            inline_history: None,
            events: vec![],
            deadline_ms: None,
            outcome: None,
        })
        .collect();
    let warm_options = ReplayOptions {
        gateway: gateway.clone(),
        connections: args.connections,
        schedule: Schedule::Recorded { speed: 1.0 },
        max_outstanding: args.max_outstanding,
        deadline: args.deadline_ms.map(Duration::from_millis),
        tls: args.access.tls()?,
        bearer: args.access.bearer()?,
    };
    let w = crate::loadgen::replay::run(&warm, &warm_options, Arc::new(Progress::default())).await?;
    if w.errors > 0 {
        bail!("warm-up had {} errors ({:?}): is the cluster up?", w.errors, w.errors_by_code);
    }

    let mut retriever_steps = Vec::new();
    for (i, &rate) in args.retriever_rates.iter().enumerate() {
        let s = step(&users, true, rate, args.retriever_step_s, 100 + i as u64, &args, &gateway).await?;
        eprintln!("retriever-only {rate:>8} req/s: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, errors {}", s.report.throughput, s.report.latency.p50_ms, s.report.latency.p99_ms, s.report.errors);
        retriever_steps.push(step_json("retriever_only", rate, &s));
    }
    let mut two_stage_steps = Vec::new();
    for (i, &rate) in args.two_stage_rates.iter().enumerate() {
        // Let the ranker drain what the previous step left (abandoned entries are skipped).
        for _ in 0..60 {
            if scrape(&args.ranker_metrics, "llamarec_ranker_queue_depth").await.unwrap_or(0.0) == 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let s = step(&users, false, rate, args.two_stage_step_s, 200 + i as u64, &args, &gateway).await?;
        let depth = stats(&s.queue_depth);
        eprintln!(
            "two-stage {rate:>6} req/s: {:.2} req/s, ranked {:.2} req/s, p50 {:.0} ms, p99 {:.0} ms, degraded {}/{}, errors {}, queue depth mean {:.1} max {}",
            s.report.throughput,
            (s.report.completed - s.report.degraded) as f64 / s.report.duration_s,
            s.report.latency.p50_ms,
            s.report.latency.p99_ms,
            s.report.degraded,
            s.report.completed,
            s.report.errors,
            depth["mean"].as_f64().unwrap_or(f64::NAN),
            depth["max"]
        );
        two_stage_steps.push(step_json("two_stage", rate, &s));
    }

    let targets: Vec<Value> = args
        .p99_targets_ms
        .iter()
        .map(|&t| json!({ "p99_target_ms": t, "retriever_only_rate": rate_at_target(&retriever_steps, t), "two_stage_rate": rate_at_target(&two_stage_steps, t) }))
        .collect();
    let report = json!({
        "bench": "replay",
        "gateway": gateway,
        "ranker_metrics": args.ranker_metrics,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "deadline_ms": args.deadline_ms,
        "connections": args.connections,
        "retriever_step_s": args.retriever_step_s,
        "two_stage_step_s": args.two_stage_step_s,
        "retriever_only": retriever_steps,
        "two_stage": two_stage_steps,
        "highest_rate_at_p99_target": targets,
    });
    print_summary(&report);
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    if let Some(path) = &args.plot {
        draw_plot(path, &report)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn print_summary(report: &Value) {
    println!("{:<15} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>8} {:>7} {:>11}", "mode", "offered", "thrupt", "ranked", "p50 ms", "p99 ms", "p99.9 ms", "degr %", "errors", "queue m/max");
    for s in report["retriever_only"].as_array().into_iter().chain(report["two_stage"].as_array()).flatten() {
        let l = &s["report"]["latency"];
        let q = &s["ranker_queue_depth"];
        println!(
            "{:<15} {:>9} {:>9.2} {:>9.2} {:>10.1} {:>10.1} {:>10.1} {:>8.1} {:>7} {:>11}",
            s["mode"].as_str().unwrap_or(""),
            s["offered_rate"],
            s["throughput"].as_f64().unwrap_or(0.0),
            s["ranked_throughput"].as_f64().unwrap_or(0.0),
            l["p50_ms"].as_f64().unwrap_or(0.0),
            l["p99_ms"].as_f64().unwrap_or(0.0),
            l["p999_ms"].as_f64().unwrap_or(0.0),
            s["degraded_share"].as_f64().unwrap_or(0.0) * 100.0,
            s["report"]["errors"],
            match (q["mean"].as_f64(), q["max"].as_f64()) {
                (Some(m), Some(x)) => format!("{m:.1}/{x:.0}"),
                _ => "-".into(),
            }
        );
    }
    for t in report["highest_rate_at_p99_target"].as_array().into_iter().flatten() {
        println!("p99 <= {} ms: retriever-only {} req/s, two-stage {} req/s", t["p99_target_ms"], t["retriever_only_rate"], t["two_stage_rate"]);
    }
}

/// Two panels: retriever-only p50/p99 latency against offered rate (log-log), and two-stage
/// ranker queue depth (mean, max) with p99 latency on a second axis.
fn draw_plot(path: &Path, report: &Value) -> Result<()> {
    use plotters::prelude::*;
    let text = super::ranker::register_font();
    let series = |steps: &Value, f: &dyn Fn(&Value) -> Option<f64>| -> Vec<(f64, f64)> {
        steps.as_array().into_iter().flatten().filter_map(|s| Some((s["offered_rate"].as_f64()?, f(s)?))).collect()
    };
    let retr = &report["retriever_only"];
    let two = &report["two_stage"];
    let r50 = series(retr, &|s| s["report"]["latency"]["p50_ms"].as_f64().filter(|v| *v > 0.0));
    let r99 = series(retr, &|s| s["report"]["latency"]["p99_ms"].as_f64().filter(|v| *v > 0.0));
    let rthr = series(retr, &|s| s["throughput"].as_f64());
    let qmean = series(two, &|s| s["ranker_queue_depth"]["mean"].as_f64());
    let qmax = series(two, &|s| s["ranker_queue_depth"]["max"].as_f64());
    let t99 = series(two, &|s| s["report"]["latency"]["p99_ms"].as_f64().map(|v| v / 1e3));
    let ranked = series(two, &|s| s["ranked_throughput"].as_f64());

    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);
    let blue = RGBColor(31, 119, 180);
    let orange = RGBColor(255, 127, 14);
    let green = RGBColor(44, 160, 44);
    let grey = RGBColor(120, 120, 120);
    let font = ("sans-serif", 15);

    if !r99.is_empty() {
        let xs = || r99.iter().map(|p| p.0);
        let (x0, x1) = (xs().fold(f64::INFINITY, f64::min) / 1.5, xs().fold(0.0, f64::max) * 1.5);
        let y0 = r50.iter().map(|p| p.1).fold(f64::INFINITY, f64::min) / 2.0;
        let y1 = r99.iter().map(|p| p.1).fold(0.0, f64::max) * 3.0;
        let mut b = ChartBuilder::on(&left);
        b.margin(15).x_label_area_size(if text { 45 } else { 5 }).y_label_area_size(if text { 70 } else { 5 });
        if text {
            b.caption("Retriever-only Recommend, open loop", ("sans-serif", 19));
        }
        let mut chart = b.build_cartesian_2d((x0..x1).log_scale(), (y0.max(1e-3)..y1).log_scale())?;
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc("offered req/s (log)").y_desc("latency from scheduled send, ms (log)").label_style(font).x_label_formatter(&|x| format!("{x:.0}"));
        } else {
            mesh.disable_x_axis().disable_y_axis();
        }
        mesh.draw()?;
        for (data, color, label) in [(&r50, blue, "p50"), (&r99, orange, "p99")] {
            let s = chart.draw_series(LineSeries::new(data.clone(), color.stroke_width(3)))?;
            if text {
                s.label(label).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
            }
            chart.draw_series(data.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
        }
        if text {
            // Achieved throughput written above each p99 point.
            chart.draw_series(r99.iter().zip(&rthr).map(|(p, t)| Text::new(format!("{:.0}/s", t.1), (p.0, p.1 * 1.35), font.into_font().color(&grey))))?;
            chart.configure_series_labels().position(SeriesLabelPosition::UpperLeft).border_style(BLACK).background_style(WHITE.mix(0.9)).label_font(font).draw()?;
        }
    }

    if !qmean.is_empty() || !t99.is_empty() {
        let all_x: Vec<f64> = qmean.iter().chain(&t99).map(|p| p.0).collect();
        let x1 = all_x.iter().copied().fold(0.0, f64::max) * 1.1;
        let q1 = qmax.iter().map(|p| p.1).fold(1.0, f64::max) * 1.2;
        let l1 = t99.iter().map(|p| p.1).fold(1.0, f64::max) * 1.2;
        let mut b = ChartBuilder::on(&right);
        b.margin(15).x_label_area_size(if text { 45 } else { 5 }).y_label_area_size(if text { 60 } else { 5 }).right_y_label_area_size(if text { 60 } else { 5 });
        if text {
            b.caption("Two-stage Recommend: ranker queue depth (HPA signal)", ("sans-serif", 19));
        }
        let mut chart = b.build_cartesian_2d(0.0..x1, 0.0..q1)?.set_secondary_coord(0.0..x1, 0.0..l1);
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc("offered req/s").y_desc("llamarec_ranker_queue_depth").label_style(font);
        } else {
            mesh.disable_x_axis().disable_y_axis();
        }
        mesh.draw()?;
        if text {
            chart.configure_secondary_axes().y_desc("p99 latency (s) · ranked req/s").label_style(font).draw()?;
        }
        for (data, color, label) in [(&qmean, blue, "queue depth, mean"), (&qmax, RGBColor(130, 180, 230), "queue depth, max")] {
            let s = chart.draw_series(LineSeries::new(data.clone(), color.stroke_width(3)))?;
            if text {
                s.label(label).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
            }
            chart.draw_series(data.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
        }
        for (data, color, label) in [(&t99, orange, "p99 latency, s (right)"), (&ranked, green, "ranked req/s (right)")] {
            let s = chart.draw_secondary_series(LineSeries::new(data.clone(), color.stroke_width(3)))?;
            if text {
                s.label(label).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
            }
            chart.draw_secondary_series(data.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
        }
        if text {
            chart.configure_series_labels().position(SeriesLabelPosition::UpperLeft).border_style(BLACK).background_style(WHITE.mix(0.9)).label_font(font).draw()?;
        }
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_at_target_needs_p99_no_errors_and_few_degraded() {
        let s = |rate: f64, p99: f64, errors: u64, degraded: f64| json!({ "offered_rate": rate, "degraded_share": degraded, "report": { "errors": errors, "latency": { "p99_ms": p99 } } });
        let steps = vec![s(1.0, 5.0, 0, 0.0), s(2.0, 8.0, 0, 0.0), s(4.0, 9.0, 3, 0.0), s(8.0, 9.5, 0, 0.5), s(16.0, 40.0, 0, 0.0)];
        assert_eq!(rate_at_target(&steps, 10.0), json!(2.0));
        assert_eq!(rate_at_target(&steps, 50.0), json!(16.0));
        assert_eq!(rate_at_target(&steps, 1.0), Value::Null);
    }
}
