//! Benchmark 3: policy swap time with the agent's compiler and `Enforcer`.
//!
//! Per run, on a fresh enforcer (its own pins): a 10-rule policy is made live first; then
//!
//! - **swap to 100,000 rules**: `Policy::new` + `Editable::new` (full compile and the
//!   index for later edits; timed: "compile"), then `Enforcer::apply` (timed: "apply" =
//!   stable ids, diff against the standby generation, map writes, slot file, the flip);
//! - **1-rule change, first after the swap**: one rule's ports edited (same id, same
//!   addresses) with `Editable::replace` ("compile") and `Enforcer::apply_change`
//!   ("apply");
//! - **1-rule change, steady state**: further single-rule edits.
//!
//! After every apply, `Enforcer::sync_standby` runs as the daemon runs it (off the apply's
//! path, in the background): it waits for an RCU grace period and brings the standby
//! generation up to date. It is timed apart ("sync"), not in the step's total.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use wirefence_agent::enforce::{ApplyStats, Enforcer};
use wirefence_agent::model::IfName;
use wirefence_agent::policy::{Editable, Limits, Rule};

use super::bpf::Pins;
use super::rules;

#[derive(Clone, Copy, Default)]
pub struct Step {
    pub compile: Duration,
    pub apply: Duration,
    /// Class-trie and policy-map operations of the apply (the flip not counted).
    pub map_ops: usize,
    pub counter_resets: usize,
    pub entries: usize,
    /// The standby catch-up after the apply (background in the daemon; not in the total).
    pub sync: Duration,
    pub sync_ops: usize,
}

#[derive(Default)]
pub struct Swap {
    pub rules: u32,
    pub swap: Vec<Step>,
    pub first_change: Vec<Step>,
    pub steady_change: Vec<Step>,
}

fn finish(enforcer: &mut Enforcer, mut s: Step, stats: ApplyStats) -> Result<Step> {
    s.map_ops = stats.map_writes - 1;
    s.counter_resets = stats.counter_resets;
    let t = Instant::now();
    s.sync_ops = enforcer.sync_standby().context("Enforcer::sync_standby")?;
    s.sync = t.elapsed();
    Ok(s)
}

fn full(enforcer: &mut Enforcer, rules: Vec<Rule>, digest: u64) -> Result<(Editable, Step)> {
    let t = Instant::now();
    let ed = Editable::new(rules::policy(rules)?, Limits::default()).map_err(|e| anyhow::anyhow!("compile: {e}"))?;
    let compile = t.elapsed();
    let t = Instant::now();
    let stats = enforcer.apply(ed.compiled(), digest).context("Enforcer::apply")?;
    let s = Step { compile, apply: t.elapsed(), entries: ed.compiled().entries.len(), ..Default::default() };
    Ok((ed, finish(enforcer, s, stats)?))
}

fn change(enforcer: &mut Enforcer, ed: &mut Editable, index: usize, rule: Rule, digest: u64) -> Result<Step> {
    let t = Instant::now();
    let c = ed.replace(index, rule).map_err(|e| anyhow::anyhow!("edit: {e}"))?;
    let compile = t.elapsed();
    let t = Instant::now();
    let stats = enforcer.apply_change(ed, &c, digest).context("Enforcer::apply_change")?;
    let s = Step { compile, apply: t.elapsed(), entries: ed.compiled().entries.len(), ..Default::default() };
    finish(enforcer, s, stats)
}

pub fn run(root: &std::path::Path, state_dir: &std::path::Path, n: u32, runs: u32, steady: u32) -> Result<Swap> {
    let mut out = Swap { rules: n, ..Default::default() };
    let base = rules::generate(n, false);
    for run in 0..runs {
        let ifname: IfName = format!("wfbsw{}-{run}", std::process::id() % 100_000).parse()?;
        let _pins = Pins { root: root.to_owned(), ifname: ifname.clone() };
        let mut enforcer = Enforcer::open(root, &ifname, 0, state_dir).context("Enforcer::open")?;
        full(&mut enforcer, rules::generate(10, false), 1)?;
        let (mut ed, s) = full(&mut enforcer, base.clone(), 2)?;
        out.swap.push(s);
        for c in 0..=steady {
            // Different rules each time, spread over the set.
            let k = (n / 2 + c * 7919 + run * 104_729) as usize % base.len();
            let rule = rules::edited(&ed.policy().rules()[k], c as u16 + 1);
            let s = change(&mut enforcer, &mut ed, k, rule, 3 + u64::from(c))?;
            anyhow::ensure!(
                s.counter_resets == 0 && s.map_ops < 100,
                "a one-rule edit wrote {} map entries",
                s.map_ops
            );
            if c == 0 {
                out.first_change.push(s);
            } else {
                out.steady_change.push(s);
            }
        }
        eprintln!(
            "bench-policy: swap run {run}: {n} rules compile {:.0?} apply {:.0?} (sync {:.0?}); first change {:.1?}+{:.1?}; steady change {:.1?}+{:.1?}",
            out.swap.last().unwrap().compile,
            out.swap.last().unwrap().apply,
            out.swap.last().unwrap().sync,
            out.first_change.last().unwrap().compile,
            out.first_change.last().unwrap().apply,
            out.steady_change.last().map(|s| s.compile).unwrap_or_default(),
            out.steady_change.last().map(|s| s.apply).unwrap_or_default(),
        );
    }
    Ok(out)
}
