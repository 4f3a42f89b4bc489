//! Flow-record ingest: simulated nodes on loopback send `FlowRecords` (1,000 records a
//! message, as agents do) with no per-node rate limit, in rounds the intake's queue holds;
//! timed until every record is stored, read from the control plane's `flow_records`
//! metric. Once on SQLite, once on PostgreSQL.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wirefence_proto::v1;

use super::loopback::Loopback;
use super::Row;

/// Records in one message (the agent's `FLOW_RECORDS_PER_MESSAGE`).
const PER_MESSAGE: usize = 1_000;
/// Records sent per round, then stored before the next.
const ROUND: usize = 40_000;

pub async fn run(control: &Path, nodes: usize, records: usize) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for engine in ["SQLite", "PostgreSQL"] {
        eprintln!("bench-control: flow ingest on {engine}, {nodes} simulated nodes, {records} records");
        let db = (engine == "PostgreSQL").then(super::replicas::database);
        let metrics = free_port()?;
        let extra = ["--flow-rate", "100000000", "--flow-max-records", "100000000", "--metrics-listen", &metrics];
        let cp = Loopback::start_with(control, nodes, db.as_ref().map(|d| d.url.as_str()), &extra).await?;
        let metrics: SocketAddr = metrics.parse()?;
        let (stored, refused, took) = ingest(&cp, metrics, nodes, records).await?;
        let rate = stored as f64 / took.as_secs_f64();
        rows.push((
            format!("flow ingest, {engine}: records stored per second"),
            format!("{rate:.0}/s"),
            format!("{:.0} nodes", rate / 100.0),
            format!(
                "{stored} stored, {refused} refused in {:.1} s; ratio: nodes at the default 100/s",
                took.as_secs_f64()
            ),
        ));
    }
    Ok(rows)
}

/// Enrolls `nodes`, sends `records` over their Report streams, and waits until the metric
/// accounts for all of them: (stored, refused, time from the first send).
async fn ingest(cp: &Loopback, metrics: SocketAddr, nodes: usize, records: usize) -> Result<(u64, u64, Duration)> {
    use v1::agent_service_client::AgentServiceClient;
    let mut admin = cp.admin.clone();
    let key = admin
        .create_enrollment_key(v1::CreateEnrollmentKeyRequest { reusable: true, ..Default::default() })
        .await?
        .into_inner()
        .key;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.addr))?.connect().await?;
    let mut enrolled = Vec::new();
    for n in 0..nodes {
        let reg = super::loopback::enroll(channel.clone(), format!("flows{n}"), key.clone()).await?;
        let v4 = reg.addresses.iter().find(|a| a.addr.len() == 4).context("an IPv4 overlay address")?.addr.clone();
        enrolled.push((reg.credential, v4));
    }
    // Rounds the intake's queue (50,000) holds: what is measured is the rate records are
    // taken, checked and written, not how fast a full queue refuses them.
    let per_node = (ROUND / nodes).max(1);
    let rounds = records.div_ceil(per_node * nodes);
    let now_ms = i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis())?;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(600);
    let mut sent = 0u64;
    for round in 0..rounds {
        let mut sends = Vec::new();
        for (i, (credential, src)) in enrolled.iter().enumerate() {
            let dst = enrolled[(i + 1) % nodes].1.clone();
            let messages: Vec<v1::AgentReport> = (0..per_node)
                .collect::<Vec<_>>()
                .chunks(PER_MESSAGE)
                .map(|chunk| {
                    let records = chunk
                        .iter()
                        .map(|k| v1::FlowRecord {
                            time_unix_ms: now_ms,
                            src: src.clone(),
                            dst: dst.clone(),
                            protocol: 6,
                            src_port: 1024 + ((round * per_node + k) % 60_000) as u32,
                            dst_port: 443,
                            verdict: v1::Verdict::Allow.into(),
                            direction: v1::Direction::Egress.into(),
                            rule_id: "bench".into(),
                            ..Default::default()
                        })
                        .collect();
                    v1::AgentReport { body: Some(v1::agent_report::Body::Flows(v1::FlowRecords { records })) }
                })
                .collect();
            let mut req = tonic::Request::new(tokio_stream::iter(messages));
            req.metadata_mut().insert("authorization", format!("Bearer {credential}").parse()?);
            let mut client = AgentServiceClient::new(channel.clone());
            sends.push(tokio::spawn(async move { client.report(req).await }));
        }
        for s in sends {
            s.await?.context("a Report stream")?;
        }
        sent += (per_node * nodes) as u64;
        loop {
            let m = scrape(metrics).await?;
            let (stored, refused) = (sample(&m, "stored"), sample(&m, "over_rate"));
            if stored + refused + sample(&m, "invalid") + sample(&m, "failed") >= sent {
                if round + 1 == rounds {
                    return Ok((stored, refused, t0.elapsed()));
                }
                break;
            }
            if Instant::now() > deadline {
                bail!("after 600 s: {stored} of {sent} records stored, {refused} refused");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    bail!("no records to send")
}

fn free_port() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

/// `GET /metrics` on loopback: the body.
async fn scrape(addr: SocketAddr) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n").await?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).await?;
    Ok(wirefence_tests::metrics::metrics_body(&raw))
}

/// `wirefence_control_flow_records_total{outcome="..."}`, 0 when absent.
fn sample(metrics: &str, outcome: &str) -> u64 {
    let name = format!("wirefence_control_flow_records_total{{outcome=\"{outcome}\"}}");
    wirefence_tests::metrics::find_sample(metrics, &name).unwrap_or(0.0) as u64
}
