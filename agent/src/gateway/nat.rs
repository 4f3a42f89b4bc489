//! Masquerade in the agent's own nftables table, `inet wirefence`: one `postrouting` chain of
//! type nat at the srcnat priority, one rule per masqueraded prefix (`oifname <tunnel>
//! ip[6] saddr <prefix> fib saddr type != local masquerade`: forwarded LAN traffic only; the
//! gateway's own address in the prefix keeps its source, see `own_traffic`). Nothing outside this table is read or written: the
//! operator's, Docker's and ufw's tables keep their rules and order (another table's NAT
//! chains at the same hook see the packets as before; the first NAT verdict of a
//! connection wins, and the masqueraded prefixes are the gateway's LAN, not theirs).
//!
//! Written through the `nftables` crate, which drives `nft -j`: the table is replaced in
//! one transaction (add, delete, add again with its content), so a packet sees the old
//! rules or the new ones, never none. Each rule carries a comment naming what it does;
//! observation reads the comments back, and a table whose rules do not all carry one of
//! ours counts as differing (and is replaced).

use std::collections::BTreeSet;

use nftables::batch::Batch;
use nftables::expr::{
    Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix,
};
use nftables::helper::NftablesError;
use nftables::schema::{Chain, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainType, NfFamily, NfHook};

use super::{GatewayError, Masquerade};
use crate::model::IfName;

pub const TABLE: &str = "wirefence";
pub const CHAIN: &str = "postrouting";
/// `srcnat`, where `iptables -t nat -A POSTROUTING` (Docker's MASQUERADE) sits too.
const SRCNAT: i32 = 100;
/// Statements in each of our rules (oifname, saddr, fib, masquerade).
const RULE_LEN: usize = 4;

/// Our table as found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NatState {
    #[default]
    Absent,
    /// The table with exactly these rules in a well-formed chain.
    Present(BTreeSet<Masquerade>),
    /// The table exists with something we do not make in it.
    Other,
}

fn comment(m: &Masquerade) -> String {
    format!("wirefence masquerade {} oif {}", m.src, m.oif)
}

fn parse_comment(text: &str) -> Option<Masquerade> {
    let rest = text.strip_prefix("wirefence masquerade ")?;
    let (src, oif) = rest.split_once(" oif ")?;
    let src: ipnet::IpNet = src.parse().ok()?;
    (src.trunc() == src).then_some(())?;
    Some(Masquerade { src, oif: oif.parse::<IfName>().ok()? })
}

fn table() -> Table<'static> {
    Table { family: NfFamily::INet, name: TABLE.into(), handle: None }
}

fn rule(m: &Masquerade) -> Rule<'static> {
    let protocol = match m.src {
        ipnet::IpNet::V4(_) => "ip",
        ipnet::IpNet::V6(_) => "ip6",
    };
    let expr = vec![
        Statement::Match(Match {
            left: Expression::Named(NamedExpression::Meta(Meta { key: MetaKey::Oifname })),
            right: Expression::String(m.oif.as_str().to_owned().into()),
            op: Operator::EQ,
        }),
        Statement::Match(Match {
            left: Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
                protocol: protocol.into(),
                field: "saddr".into(),
            }))),
            right: Expression::Named(NamedExpression::Prefix(Prefix {
                addr: Box::new(Expression::String(m.src.network().to_string().into())),
                len: m.src.prefix_len() as u32,
            })),
            op: Operator::EQ,
        }),
        Statement::Match(Match {
            left: Expression::Named(NamedExpression::Fib(Fib {
                result: FibResult::Type,
                flags: [FibFlag::Saddr].into(),
            })),
            right: Expression::String("local".into()),
            op: Operator::NEQ,
        }),
        Statement::Masquerade(None),
    ];
    Rule {
        family: NfFamily::INet,
        table: TABLE.into(),
        chain: CHAIN.into(),
        expr: expr.into(),
        handle: None,
        index: None,
        comment: Some(comment(m).into()),
    }
}

/// The transaction that replaces our table with `rules` (none: removes it). `add` first, so
/// the `delete` finds a table whether or not one was there.
pub fn batch(rules: &BTreeSet<Masquerade>) -> Nftables<'static> {
    let mut b = Batch::new();
    b.add(NfListObject::Table(table()));
    b.delete(NfListObject::Table(table()));
    if !rules.is_empty() {
        b.add(NfListObject::Table(table()));
        b.add(NfListObject::Chain(Chain {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: CHAIN.into(),
            _type: Some(NfChainType::NAT),
            hook: Some(NfHook::Postrouting),
            prio: Some(SRCNAT),
            ..Chain::default()
        }));
        for m in rules {
            b.add(NfListObject::Rule(rule(m)));
        }
    }
    b.to_nftables()
}

fn nft_error(doing: &'static str, e: NftablesError) -> GatewayError {
    match e {
        NftablesError::NftExecution { program, inner } => {
            GatewayError::NftMissing { program: program.to_string_lossy().into_owned(), source: inner }
        }
        NftablesError::NftFailed { stderr, .. } => GatewayError::Nft { doing, detail: stderr.trim().to_owned() },
        other => GatewayError::Nft { doing, detail: other.to_string() },
    }
}

/// Replaces our table's content (empty: deletes the table), in one transaction.
pub fn apply(rules: &BTreeSet<Masquerade>) -> Result<(), GatewayError> {
    nftables::helper::apply_ruleset(&batch(rules)).map_err(|e| nft_error("replacing table inet wirefence", e))
}

/// Our table as the kernel has it. Without the `nft` program there can be none of ours
/// (the agent makes it with `nft`): absent.
pub fn observe() -> Result<NatState, GatewayError> {
    let args = ["list", "table", "inet", TABLE];
    let json = match nftables::helper::get_current_ruleset_raw(nftables::helper::DEFAULT_NFT, args) {
        Ok(json) => json,
        Err(NftablesError::NftExecution { inner, .. }) if inner.kind() == std::io::ErrorKind::NotFound => {
            return Ok(NatState::Absent)
        }
        Err(NftablesError::NftFailed { stderr, .. }) if stderr.contains("No such file or directory") => {
            return Ok(NatState::Absent)
        }
        Err(e) => return Err(nft_error("listing table inet wirefence", e)),
    };
    let doc: Nftables = serde_json::from_str(&json)
        .map_err(|e| GatewayError::Nft { doing: "listing table inet wirefence", detail: e.to_string() })?;
    Ok(state_of(&doc))
}

/// Reads our table out of `nft -j list table inet wirefence`.
fn state_of(doc: &Nftables) -> NatState {
    let mut rules = BTreeSet::new();
    let mut chain_ok = false;
    for obj in doc.objects.iter() {
        let NfObject::ListObject(obj) = obj else { continue };
        match obj {
            NfListObject::Table(_) | NfListObject::MetainfoObject(_) => {}
            NfListObject::Chain(c) => {
                let ours = c.name == CHAIN
                    && c._type == Some(NfChainType::NAT)
                    && c.hook == Some(NfHook::Postrouting)
                    && c.prio == Some(SRCNAT);
                if !ours || chain_ok {
                    return NatState::Other;
                }
                chain_ok = true;
            }
            NfListObject::Rule(r) => match r.comment.as_deref().and_then(parse_comment) {
                Some(m) if r.chain == CHAIN && r.expr.len() == RULE_LEN && rules.insert(m.clone()) => {}
                _ => return NatState::Other,
            },
            _ => return NatState::Other,
        }
    }
    if chain_ok && !rules.is_empty() {
        NatState::Present(rules)
    } else {
        NatState::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(src: &str) -> Masquerade {
        Masquerade { src: src.parse().unwrap(), oif: "wf0".parse().unwrap() }
    }

    #[test]
    fn the_batch_replaces_only_our_table() {
        let rules: BTreeSet<_> = [m("192.168.10.0/24"), m("fd10::/64")].into();
        let json = serde_json::to_value(batch(&rules)).unwrap();
        let cmds = json["nftables"].as_array().unwrap();
        // add table, delete table, add table, add chain, two rules: nothing names another table.
        assert_eq!(cmds.len(), 6, "{json}");
        assert!(cmds[1]["delete"]["table"]["name"] == TABLE);
        for c in cmds {
            let obj = c.as_object().unwrap().values().next().unwrap().as_object().unwrap();
            let inner = obj.values().next().unwrap();
            let name = inner.get("table").or(inner.get("name")).unwrap();
            assert_eq!(name, TABLE, "{c}");
        }
        let text = json.to_string();
        assert!(text.contains(r#""protocol":"ip6""#) && text.contains(r#""masquerade":null"#), "{text}");
        // Removal: add and delete only.
        assert_eq!(serde_json::to_value(batch(&BTreeSet::new())).unwrap()["nftables"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn observation_reads_back_what_the_batch_writes() {
        let rules: BTreeSet<_> = [m("192.168.10.0/24"), m("fd10::/64")].into();
        // nft lists what it was given as list objects (no commands): the same shapes.
        let mut listed = Batch::new();
        listed.add_obj(NfListObject::Table(table()));
        for obj in batch(&rules).objects.iter().skip(3) {
            if let NfObject::CmdObject(nftables::schema::NfCmd::Add(o)) = obj {
                listed.add_obj(o.clone());
            }
        }
        assert_eq!(state_of(&listed.to_nftables()), NatState::Present(rules));
        assert_eq!(parse_comment("wirefence masquerade 10.0.0.1/24 oif wf0"), None, "host bits");
        assert_eq!(parse_comment("something else"), None);
        let mut foreign = Batch::new();
        foreign.add_obj(NfListObject::Table(table()));
        assert_eq!(state_of(&foreign.to_nftables()), NatState::Other);
    }
}
