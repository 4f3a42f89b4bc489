//! Scraping a metrics endpoint inside a namespace, reading samples and checking the
//! exposition with `promtool check metrics` (Debian's prometheus package).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use crate::{connect, Netns};

/// `GET /metrics` at `addr` from inside `ns`; the body of a 200 response in the Prometheus
/// text format. `None` when nothing accepts the connection.
pub fn try_scrape(ns: &Netns, addr: SocketAddr) -> Option<String> {
    let mut s = connect(ns, addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the metrics response");
    Some(metrics_body(&raw))
}

/// The body of a raw HTTP response to `GET /metrics`, which must be a 200 in the
/// Prometheus text format.
pub fn metrics_body(raw: &str) -> String {
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    body.to_owned()
}

/// [`try_scrape`] that must succeed.
pub fn scrape(ns: &Netns, addr: SocketAddr) -> String {
    try_scrape(ns, addr).unwrap_or_else(|| panic!("nothing serves metrics at {addr} in {}", ns.name))
}

/// The value of sample `name` (labels exactly as exposed), if present.
pub fn find_sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.rsplit_once(' ').filter(|(n, _)| *n == name).map(|(_, v)| v.parse().unwrap()))
}

/// The value of sample `name`; panics with the scrape when it is missing.
pub fn sample(text: &str, name: &str) -> f64 {
    find_sample(text, name).unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

/// `promtool check metrics` on a scrape: the exposition is valid.
pub fn promtool_check(text: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool (scripts/install.sh installs Debian's prometheus package)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
