//! Benchmark 3: policy swap time with the agent's compiler and `Enforcer::apply`.
//!
//! Per run, on a fresh enforcer (its own pins): a 10-rule policy is made live first; then
//!
//! - **swap to 100,000 rules**: `Policy::new` + `compile` (timed: "compile"), then
//!   `Enforcer::apply` (timed: "apply" = stable-id assignment, diff against the standby
//!   generation, map writes, slot-table file, the flip);
//! - **1-rule change, first after the swap**: one rule's ports edited (same id, same
//!   addresses). The standby generation still holds the 10-rule policy from before the
//!   swap, so the writer refills it completely;
//! - **1-rule change, steady state**: further single-rule edits; the standby generation
//!   now holds the policy of two applies ago, so only the difference is written.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use wirefence_agent::enforce::writer::{diff, Generation, Ids};
use wirefence_agent::enforce::Enforcer;
use wirefence_agent::model::IfName;
use wirefence_agent::policy::{compile, Compiled, Rule};

use super::bpf::Pins;
use super::rules;

#[derive(Clone, Copy, Default)]
pub struct Step {
    pub compile: Duration,
    pub apply: Duration,
    /// The userspace part of `apply` (stable ids, diff), replayed on a shadow writer.
    pub ids_diff: Duration,
    pub writes: usize,
    /// Of `writes`: policy-map and class-trie operations; rule counters zeroed (not in
    /// `writes`, which is what `ApplyStats::map_writes` counts).
    pub policy_ops: usize,
    pub class_ops: usize,
    pub counter_resets: usize,
    pub entries: usize,
}

/// The writer's userspace work (`writer::Ids::assign` + `writer::diff`) replayed without
/// maps, generation for generation as the enforcer does it, to split `apply` into its
/// userspace and map-write parts.
#[derive(Default)]
struct Shadow {
    ids: Ids,
    gens: [Generation; 2],
    live: Option<usize>,
}

impl Shadow {
    fn replay(&mut self, c: &Compiled, step: &mut Step) -> Result<()> {
        let live = self.live.unwrap_or(1);
        let target = live ^ 1;
        let t = Instant::now();
        let (want, fresh) = self.ids.assign(c, &self.gens[live])?;
        let d = diff(&self.gens[target], &want);
        step.ids_diff = t.elapsed();
        step.policy_ops = d.policy_puts.len() + d.policy_removes.len();
        step.class_ops = d.class_puts.len() + d.class_removes.len();
        step.counter_resets = fresh.len();
        self.gens[target] = want;
        self.live = Some(target);
        Ok(())
    }
}

#[derive(Default)]
pub struct Swap {
    pub rules: u32,
    pub swap: Vec<Step>,
    pub first_change: Vec<Step>,
    pub steady_change: Vec<Step>,
}

fn compiled(rules: Vec<Rule>) -> Result<(Compiled, Duration)> {
    let t = Instant::now();
    let policy = rules::policy(rules)?;
    let c = compile(&policy).map_err(|e| anyhow::anyhow!("compile: {e}"))?;
    Ok((c, t.elapsed()))
}

fn step(enforcer: &mut Enforcer, shadow: &mut Shadow, rules: Vec<Rule>, digest: u64) -> Result<Step> {
    let (c, compile) = compiled(rules)?;
    let t = Instant::now();
    let stats = enforcer.apply(&c, digest).context("Enforcer::apply")?;
    let mut s =
        Step { compile, apply: t.elapsed(), writes: stats.map_writes, entries: c.entries.len(), ..Default::default() };
    shadow.replay(&c, &mut s)?;
    anyhow::ensure!(
        s.policy_ops + s.class_ops + 1 == s.writes,
        "shadow writer disagrees with the enforcer: {} + {} + 1 map writes, enforcer {}",
        s.policy_ops,
        s.class_ops,
        s.writes
    );
    Ok(s)
}

pub fn run(root: &std::path::Path, state_dir: &std::path::Path, n: u32, runs: u32, steady: u32) -> Result<Swap> {
    let mut out = Swap { rules: n, ..Default::default() };
    let base = rules::generate(n, false);
    for run in 0..runs {
        let ifname: IfName = format!("wfbsw{}-{run}", std::process::id() % 100_000).parse()?;
        let _pins = Pins { root: root.to_owned(), ifname: ifname.clone() };
        let mut enforcer = Enforcer::open(root, &ifname, 0, state_dir).context("Enforcer::open")?;
        let mut shadow = Shadow::default();
        step(&mut enforcer, &mut shadow, rules::generate(10, false), 1)?;
        let mut current = base.clone();
        out.swap.push(step(&mut enforcer, &mut shadow, current.clone(), 2)?);
        for c in 0..=steady {
            // Different rules each time, spread over the set.
            let k = (n / 2 + c * 7919 + run * 104_729) as usize % current.len();
            current[k] = rules::edited(&current[k], c as u16 + 1);
            let s = step(&mut enforcer, &mut shadow, current.clone(), 3 + u64::from(c))?;
            if c == 0 {
                out.first_change.push(s);
            } else {
                out.steady_change.push(s);
            }
        }
        eprintln!(
            "bench-policy: swap run {run}: {n} rules compile {:.0?} apply {:.0?}; first change apply {:.0?}; steady change apply {:.1?}",
            out.swap.last().unwrap().compile,
            out.swap.last().unwrap().apply,
            out.first_change.last().unwrap().apply,
            out.steady_change.last().map(|s| s.apply).unwrap_or_default(),
        );
    }
    Ok(out)
}
