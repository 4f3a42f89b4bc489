//! Every build, test and benchmark step that is not plain cargo lives here.
use clap::{Parser, Subcommand};

mod bench;
mod bench_control;
mod bench_failover;
mod bench_flood;
mod bench_policy;
mod build_ebpf;
mod deb;
mod demo;
mod deny;
mod fuzz;
mod lab;
mod netns;
mod test;
mod vm;
mod workspace;

#[derive(Parser)]
#[command(about = "wirefence project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the eBPF programs (ebpf/) as the agent's build does; copies the object to
    /// target/bpf/wirefence-ebpf.o. Needs bpf-linker and rust-src (scripts/install.sh).
    BuildEbpf(build_ebpf::BuildEbpfArgs),
    /// Build the Debian packages wirefence-agent and wirefence-control (release) into
    /// target/debian/ and print their paths. Needs cargo-deb (scripts/install.sh).
    Deb(deb::DebArgs),
    /// Boot a Debian kernel in qemu and run the kernel-WireGuard tests inside it.
    VmTest(vm::VmTestArgs),
    /// Run the whole test suite as CI does (unit, namespace, packages and VM tests). Needs root.
    Test(test::TestArgs),
    /// The main job: a mesh of three agents in namespaces with traffic crossing the tunnel.
    Demo(demo::DemoArgs),
    /// Time the agent applying 1,000/10,000 peers and a 1% change against wg syncconf +
    /// ip -batch in fresh namespaces (userspace backend), with peak RSS. Needs root.
    Bench(bench::BenchArgs),
    /// The access policy's costs against the goals: per-packet ns (BPF_PROG_TEST_RUN)
    /// at 10-100,000 rules, iperf3 throughput vs nftables at 10,000 rules, swap time. Needs root.
    BenchPolicy(bench_policy::BenchPolicyArgs),
    /// The control plane against the goals: push latency (policy apply -> enforced
    /// in the kernel on 3 agents, p50/p99) and fan-out to 1,000 simulated agents. Needs root.
    BenchControl(bench_control::BenchControlArgs),
    /// HA subnet routers: time 20 failovers of a route group (primary's LAN link down ->
    /// traffic from a remote site resumes through the standby), p50/p99 against 3 s. Needs root.
    BenchFailover(bench_failover::BenchFailoverArgs),
    /// Fuzz the control-plane update decoder (cargo-fuzz target `update_decoder` in fuzz/)
    /// for a fixed time; `test` runs it briefly. Needs cargo-fuzz (scripts/install.sh).
    Fuzz(fuzz::FuzzArgs),
    /// Check the dependency policy (deny.toml: licenses, bans, sources) with cargo-deny;
    /// `test` runs it first. Needs cargo-deny (scripts/install.sh).
    Deny,
    /// Build the agent a second time with `--features next-layout` (another eBPF object and
    /// conntrack layout) as target/debug/wirefence-agent-next-layout, then the plain build
    /// again: what the upgrade tests (tests/tests/upgrade.rs) swap between.
    BuildNextAgent,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::BuildEbpf(args) => build_ebpf::run(args),
        Cmd::Deb(args) => deb::run(args),
        Cmd::VmTest(args) => vm::run(args),
        Cmd::Test(args) => test::run(args),
        Cmd::Demo(args) => demo::run(args),
        Cmd::Bench(args) => bench::run(args),
        Cmd::BenchPolicy(args) => bench_policy::run(args),
        Cmd::Fuzz(args) => fuzz::run(args),
        Cmd::BenchControl(args) => bench_control::run(args),
        Cmd::BenchFailover(args) => bench_failover::run(args),
        Cmd::Deny => deny::check(&workspace::Workspace::locate()?),
        Cmd::BuildNextAgent => {
            let ws = workspace::Workspace::locate()?;
            let next = ws.build_next_layout_agent()?;
            ws.build_bins(false)?;
            eprintln!("xtask: {} built", next.display());
            Ok(())
        }
    }
}
