//! Incremental reload: a config of 10,000 peers is mostly unchanged between two versions,
//! so the validated peer of each `[[peers]]` block is kept, keyed by the block's exact text,
//! and only new or edited blocks are parsed again.
//!
//! The result is always exactly `Config::parse`'s, errors included: the fast path only ever
//! answers with a valid config, and anything it is not sure of (an unusual file shape, any
//! error at all) goes to the full parse, which reports the error with its position.
//!
//! Why the split is sound: the text is cut into the head (up to the first `[[peers]]` line),
//! one block per `[[peers]]` line (the header line itself is dropped, so it must be exactly a
//! TOML header) and the tail (from the first other header line on). Each piece must parse as
//! a document on its own, so none ends inside a multi-line string, array or inline table:
//! the whole text then reads as the pieces one after another. Head and tail are parsed
//! together too (tables defined twice) and must not mention `peers`; each block body is
//! exactly the key/values of one `peers` array entry.

use std::path::Path;

use foldhash::{HashMap, HashSet};
use serde::Deserialize;

use super::{peer_config, peer_key, Config, ConfigError, PeerConfig, RawConfig, RawPeer};

/// The validated peers of the configs parsed so far, keyed by the body text of their
/// `[[peers]]` block (everything between the header line and the next header line). An
/// entry depends on nothing but that text, so it stays right whatever else changes.
#[derive(Default)]
pub struct ConfigCache {
    peers: HashMap<String, Entry>,
    /// Counts parses; entries not used by the latest one are dropped once they pile up.
    generation: u64,
}

struct Entry {
    peer: PeerConfig,
    used: u64,
}

impl ConfigCache {
    pub fn load(&mut self, path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|reason| ConfigError::Read { path: path.to_owned(), reason })?;
        self.parse(path, &text)
    }

    /// Same result as [`Config::parse`]; faster when most `[[peers]]` blocks were seen before
    /// (and even from cold: 10,000 small documents parse faster than one big one).
    pub fn parse(&mut self, path: &Path, text: &str) -> Result<Config, ConfigError> {
        match self.fast(path, text) {
            Some(config) => Ok(config),
            None => Config::parse(path, text),
        }
    }

    /// The config, or `None` when the full parse must decide.
    fn fast(&mut self, path: &Path, text: &str) -> Option<Config> {
        let shape = Shape::split(text)?;
        let rest = shape.rest_text();
        let raw = parse_rest(shape.head, shape.tail, &rest)?;
        self.generation += 1;
        let generation = self.generation;
        let mut peers = Vec::with_capacity(shape.blocks.len());
        let mut keys = HashSet::with_capacity_and_hasher(shape.blocks.len(), Default::default());
        for (i, block) in shape.blocks.iter().enumerate() {
            let peer = match self.peers.get_mut(block.body) {
                Some(entry) => {
                    entry.used = generation;
                    entry.peer.clone()
                }
                None => {
                    let peer = parse_block(i, block.body)?;
                    self.peers.insert(block.body.to_owned(), Entry { peer: peer.clone(), used: generation });
                    peer
                }
            };
            if !keys.insert(peer.public_key) {
                return None; // a duplicate peer: the full parse says where
            }
            peers.push(PeerConfig { line: block.line, ..peer });
        }
        let config = Config::validate(path, &rest, raw, Some(peers)).ok()?;
        // Blocks of older versions: kept while few (a change back is free), dropped in bulk.
        if self.peers.len() > 2 * shape.blocks.len() + 1024 {
            self.peers.retain(|_, e| e.used == generation);
        }
        Some(config)
    }
}

/// One `[[peers]]` block.
struct Block<'a> {
    /// 1-based line of its header.
    line: usize,
    body: &'a str,
}

struct Shape<'a> {
    head: &'a str,
    blocks: Vec<Block<'a>>,
    tail: &'a str,
}

impl<'a> Shape<'a> {
    /// Cuts the text at header lines; `None` when there is no `[[peers]]` line at all (the
    /// full parse is as fast then) or a piece starts with something a piece of its own would
    /// read differently (a byte order mark is only allowed at the very start).
    fn split(text: &'a str) -> Option<Shape<'a>> {
        let mut head_end = None;
        let mut blocks: Vec<Block<'a>> = Vec::new();
        let mut body_start = 0;
        let mut tail_start = text.len();
        let mut line_no = 0;
        let mut pos = 0;
        while pos < text.len() {
            line_no += 1;
            let end = text[pos..].find('\n').map_or(text.len(), |i| pos + i + 1);
            let line = &text[pos..end];
            let start = line.trim_start_matches([' ', '\t']);
            if start.starts_with('[') {
                if is_peers_header(line) {
                    if let Some(last) = blocks.last_mut() {
                        last.body = &text[body_start..pos];
                    } else {
                        head_end = Some(pos);
                    }
                    blocks.push(Block { line: line_no, body: "" });
                    body_start = end;
                } else if head_end.is_some() {
                    tail_start = pos;
                    break;
                }
            }
            pos = end;
        }
        let head_end = head_end?;
        blocks.last_mut().expect("a block per header").body = &text[body_start..tail_start];
        if blocks.iter().any(|b| b.body.starts_with('\u{feff}')) {
            return None;
        }
        Some(Shape { head: &text[..head_end], blocks, tail: &text[tail_start..] })
    }

    /// Head and tail as one document (their line numbers only matter for errors, which the
    /// full parse reports).
    fn rest_text(&self) -> String {
        let mut s = String::with_capacity(self.head.len() + self.tail.len());
        s.push_str(self.head);
        s.push_str(self.tail);
        s
    }
}

/// A line that is exactly a `[[peers]]` header: TOML whitespace around it, LF or CRLF.
fn is_peers_header(line: &str) -> bool {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let line = line.strip_suffix('\r').unwrap_or(line);
    line.trim_matches([' ', '\t']) == "[[peers]]"
}

/// Head and tail: each a document of its own (nothing open across a cut), together (`rest`)
/// one document without any `peers`, deserialized as the config's other sections.
fn parse_rest(head: &str, tail: &str, rest: &str) -> Option<RawConfig> {
    toml::de::DeTable::parse(head).ok()?;
    if !tail.is_empty() {
        toml::de::DeTable::parse(tail).ok()?;
    }
    let table = toml::de::DeTable::parse(rest).ok()?;
    if table.get_ref().contains_key("peers") {
        return None;
    }
    // The deserializer borrows the text only for error messages, which are dropped here.
    RawConfig::deserialize(toml::de::Deserializer::from(table)).ok()
}

/// One block body, parsed and validated as the full parse does for a `peers` entry.
fn parse_block(i: usize, body: &str) -> Option<PeerConfig> {
    let raw: RawPeer = toml::from_str(body).ok()?;
    let key = peer_key(i, &raw).ok()?;
    peer_config(i, &raw, key, 0).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn key(i: u8) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode([i; 32])
    }

    const HEAD: &str = "[interface]\nname = \"wf0\"\nprivate_key_file = \"/k\"\naddresses = [\"10.77.0.1/24\"]\n";

    fn peer(i: u8) -> String {
        format!("\n[[peers]]\npublic_key = \"{}\"\nallowed_ips = [\"10.1.0.{i}/32\", \"fd01::{i:x}/128\"]\n", key(i))
    }

    fn config(peers: impl Iterator<Item = u8>, tail: &str) -> String {
        format!("{HEAD}\n[agent]\nresync_interval_secs = 5\n{}{tail}", peers.map(peer).collect::<String>())
    }

    fn full(text: &str) -> String {
        format!("{:?}", Config::parse(Path::new("a.toml"), text))
    }

    fn cached(cache: &mut ConfigCache, text: &str) -> String {
        format!("{:?}", cache.parse(Path::new("a.toml"), text))
    }

    #[test]
    fn reuses_unchanged_blocks_and_matches_the_full_parse() {
        let mut cache = ConfigCache::default();
        let text = config(1..=50, "");
        assert_eq!(cached(&mut cache, &text), full(&text));
        assert_eq!(cache.peers.len(), 50);
        // Peer 1 replaced by two new ones.
        let text = config((2..=50).chain([77, 78]), "\n[routing]\ntable = \"main\"\n");
        assert_eq!(cached(&mut cache, &text), full(&text));
        let fast = cache.fast(Path::new("a.toml"), &text).expect("the fast path takes this shape");
        assert_eq!(format!("{:?}", Ok::<_, ConfigError>(fast)), full(&text));
        // Parsed anew: 77, 78 and 50, whose block now ends with the blank line before
        // [routing] (a block is its exact text). Old blocks stay while few.
        assert_eq!(cache.peers.len(), 53);
        assert_eq!(cache.peers.values().filter(|e| e.used == cache.generation).count(), 51);
    }

    #[test]
    fn errors_are_the_full_parse_errors() {
        let mut cache = ConfigCache::default();
        cached(&mut cache, &config(1..=5, ""));
        for text in [
            config([1, 2, 3, 2].into_iter(), ""),                    // duplicate peer
            config(1..=5, "").replace("10.1.0.3/32", "10.1.0.0/16"), // overlap
            config(1..=5, "").replace("10.1.0.3/32", "10.1.0.3/33"), // bad prefix
            config(1..=5, "\n[routing]\nprotocol = 2\n"),            // bad tail
            config(1..=5, "\n[[peers]]\npublic_key = \"nope\"\n"),   // bad key
            config(1..=5, "\n[peers.x]\na = 1\n"),                   // peers in the tail
            format!("peers = []\n{}", config(1..=5, "")),            // peers in the head
            // Only TOML's whitespace around a header, a byte order mark only at the start.
            config(1..=5, "").replacen("[[peers]]\n", "[[peers]]\u{a0}\n", 1),
            config(1..=5, "").replacen("[[peers]]\n", "[[peers]]\u{b}\n", 1),
            config(1..=5, "").replacen("[[peers]]\n", "[[peers]]\n\u{feff}", 1),
        ] {
            let want = full(&text);
            assert!(want.starts_with("Err"), "{want}");
            assert_eq!(cached(&mut cache, &text), want, "{text}");
        }
    }

    #[test]
    fn a_header_inside_a_multiline_string_is_not_a_cut() {
        // Read as pieces, this would give private_key_file = "[x]" and one peer; it is one
        // string holding all of it (and no peer), as the full parse says.
        let text = format!(
            "[interface]\nname = \"wf0\"\nprivate_key_file = \"\"\"\n[[peers]]\npublic_key = \"{}\"\n[x]\"\"\"\n",
            key(1)
        );
        let mut cache = ConfigCache::default();
        let got = cached(&mut cache, &text);
        assert_eq!(got, full(&text));
        assert!(got.contains("peers: []"), "{got}");
    }

    #[test]
    fn peer_lines_match_the_full_parse() {
        let text = config(1..=3, "").replace("\n[[peers]]\n", "\n  [[peers]] \t\r\n").replace("\n\n", "\n# c\n\n");
        let mut cache = ConfigCache::default();
        assert_eq!(cached(&mut cache, &text), full(&text));
        assert_eq!(cache.peers.len(), 3, "CRLF and indented headers are still cut");
    }

    /// Lines a config is made of, the good and the tricky.
    fn line() -> impl Strategy<Value = String> {
        let good = prop_oneof![
            4 => Just("[[peers]]".to_owned()),
            4 => (0u8..8).prop_map(|i| format!("public_key = \"{}\"", key(i))),
            3 => (0u8..8, 0u8..4).prop_map(|(i, j)| format!("allowed_ips = [\"10.1.{j}.{i}/32\", \"fd01::{i:x}/128\"]")),
            1 => Just("allowed_ips = [\"10.1.0.0/16\"]".to_owned()),
            1 => prop_oneof![
                Just("endpoint = \"192.0.2.1:51820\""),
                Just("endpoint = \"[2001:db8::1]:51820\""),
                Just("endpoint = \"gw.example:51820\""),
                Just("endpoint = \"nope\""),
            ].prop_map(str::to_owned),
            1 => (0u16..30).prop_map(|k| format!("persistent_keepalive = {k}")),
            1 => (0u8..3).prop_map(|i| format!("name = \"n{i}\"")),
            1 => Just(String::new()),
            1 => Just("# comment [[peers]]".to_owned()),
        ];
        let tricky = prop_oneof![
            Just("  [[peers]] \t"),
            Just("[[peers]]\r"),
            Just("[[peers]] # c"),
            Just("[ [peers] ]"),
            Just("[peers.x]"),
            Just("[[peers.x]]"),
            Just("[routing]"),
            Just("table = \"main\""),
            Just("[agent]"),
            Just("[policy]"),
            Just("[[policy.rules]]\nid = \"r\"\nfrom = [\"peer:n1\"]\nto = [\"self\"]"),
            Just("name = \"\"\""),
            Just("userspace_command = \"\"\""),
            Just("[x]\"\"\""),
            Just("\"\"\""),
            Just("x = '''"),
            Just("'''"),
            Just("allowed_ips = ["),
            Just("\"10.1.9.9/32\","),
            Just("]"),
            Just("[\"10.1.9.8/32\"]]"),
            Just("\u{feff}"),
            Just("\u{a0}[[peers]]"),
            Just("colour = 1"),
            Just("public_key = \"nope\""),
            Just("a = { b = 1,"),
            Just("}"),
        ]
        .prop_map(str::to_owned);
        prop_oneof![6 => good, 1 => tricky]
    }

    #[derive(Debug)]
    enum Edit {
        Replace(usize, String),
        Insert(usize, String),
        Delete(usize),
        /// A multi-line construct opened on one line and closed on a later one.
        Wrap(usize, usize, &'static str, &'static str),
    }

    fn wrap() -> impl Strategy<Value = (&'static str, &'static str)> {
        prop_oneof![
            Just(("userspace_command = \"\"\"", "\"\"\"")),
            Just(("userspace_command = \"\"\"", "[x]\"\"\"")),
            Just(("private_key_file = '''", "[[peers]]'''")),
            Just(("name = '''", "'''")),
            Just(("allowed_ips = [", "\"10.1.9.9/32\"]")),
            Just(("addresses = [", "[\"10.1.9.8/32\"]]")),
            Just(("table = [", "]")),
        ]
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            (any::<usize>(), line()).prop_map(|(i, l)| Edit::Replace(i, l)),
            (any::<usize>(), line()).prop_map(|(i, l)| Edit::Insert(i, l)),
            any::<usize>().prop_map(Edit::Delete),
            (any::<usize>(), any::<usize>(), wrap()).prop_map(|(i, j, (open, close))| Edit::Wrap(i, j, open, close)),
        ]
    }

    /// A line position from a random number: half of the time at or just after a header
    /// line (where the text is cut), else anywhere; at most `lines.len()`.
    fn near_cut(lines: &[String], pick: usize) -> usize {
        let headers: Vec<usize> =
            (0..lines.len()).filter(|&i| lines[i].trim_start().starts_with('[')).chain([lines.len()]).collect();
        match pick % 2 {
            0 => (pick / 2) % (lines.len() + 1),
            _ => (headers[(pick / 4) % headers.len()] + (pick / 2) % 2).min(lines.len()),
        }
    }

    static FAST: AtomicUsize = AtomicUsize::new(0);
    static VALID: AtomicUsize = AtomicUsize::new(0);

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        /// Random configs, edited a few times in a row through one cache: every version reads
        /// exactly as the full parse reads it, config or error.
        fn random_edits_read_as_the_full_parse(
            peers in proptest::collection::vec(0u8..8, 0..8),
            tail in prop_oneof![
                Just(""),
                Just("\n[routing]\ntable = \"main\"\n"),
                Just("\n[policy]\n[[policy.rules]]\nid = \"r\"\nfrom = [\"peer:n1\"]\nto = [\"self\"]\n"),
            ],
            edits in proptest::collection::vec(proptest::collection::vec(edit(), 1..4), 1..5),
        ) {
            let mut lines: Vec<String> = config(peers.into_iter(), tail).lines().map(str::to_owned).collect();
            // Names, so that `peer:n1` in a policy has something to resolve to.
            for (n, l) in lines.iter_mut().filter(|l| l.starts_with("public_key")).enumerate() {
                l.push_str(&format!("\nname = \"n{n}\""));
            }
            let mut cache = ConfigCache::default();
            for (round, batch) in std::iter::once(Vec::new()).chain(edits).enumerate() {
                for e in batch {
                    let n = lines.len();
                    match e {
                        Edit::Replace(i, l) if n > 0 => {
                            let i = near_cut(&lines, i).min(n - 1);
                            lines[i] = l;
                        }
                        Edit::Insert(i, l) => lines.insert(near_cut(&lines, i), l),
                        Edit::Delete(i) if n > 0 => { lines.remove(near_cut(&lines, i).min(n - 1)); }
                        Edit::Wrap(i, j, open, close) => {
                            let (i, j) = (near_cut(&lines, i), near_cut(&lines, j));
                            lines.insert(i.max(j), close.to_owned());
                            lines.insert(i.min(j), open.to_owned());
                        }
                        _ => {}
                    }
                }
                let text = lines.join("\n") + "\n";
                let want = full(&text);
                if let Some(c) = cache.clone_for_test().fast(Path::new("a.toml"), &text) {
                    FAST.fetch_add(1, Ordering::Relaxed);
                    prop_assert_eq!(format!("{:?}", Ok::<_, ConfigError>(c)), want.clone(), "round {}:\n{}", round, text);
                }
                if want.starts_with("Ok") {
                    VALID.fetch_add(1, Ordering::Relaxed);
                }
                prop_assert_eq!(cached(&mut cache, &text), want, "round {}:\n{}", round, text);
            }
        }
    }

    #[test]
    fn random_edits_read_as_the_full_parse_and_mostly_fast() {
        random_edits_read_as_the_full_parse();
        let (fast, valid) = (FAST.load(Ordering::Relaxed), VALID.load(Ordering::Relaxed));
        eprintln!("fast {fast} valid {valid}");
        assert!(fast * 2 > valid, "only {fast} of {valid} valid versions took the fast path");
    }

    impl ConfigCache {
        fn clone_for_test(&self) -> ConfigCache {
            let peers = self.peers.iter().map(|(k, e)| (k.clone(), Entry { peer: e.peer.clone(), used: e.used }));
            ConfigCache { peers: peers.collect(), generation: self.generation }
        }
    }
}
