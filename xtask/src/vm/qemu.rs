//! Boots the guest under qemu's software emulation and watches its serial console.

use super::tools;
use anyhow::{Context, Result};
use std::fs;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The line the guest's /init prints last: `WIREFENCE-VM-RESULT: PASS` or `...: FAIL <reason>`.
pub const MARKER: &str = "WIREFENCE-VM-RESULT:";

/// The line init.sh prints just before it runs the test script: a guest that stops before it
/// never reached the test (the kernel or /init failed to boot).
const STARTED: &str = "wirefence-vm: kernel ";

/// Console lines quoted in a failure, so a CI summary that cuts the console still shows why.
const TAIL_LINES: usize = 30;

/// How long qemu gets to power off after the guest printed its result.
const POWEROFF_GRACE: Duration = Duration::from_secs(20);

pub struct Boot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// A raw disk image attached as the guest's virtio disk (`/dev/vda`).
    pub disk: Option<PathBuf>,
    pub append: String,
    pub memory_mib: u32,
    pub cpus: u32,
    pub timeout: Duration,
    /// The whole console output is also written here.
    pub log: PathBuf,
}

pub enum Outcome {
    Pass,
    Fail(String),
    /// The guest stopped before init.sh started the test: a boot failure, not a test result.
    NotStarted(String),
}

pub fn run(boot: &Boot) -> Result<Outcome> {
    let qemu = tools::require(tools::QEMU)?;
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg", "-machine", "q35", "-cpu", "max"])
        .args(["-m", &boot.memory_mib.to_string(), "-smp", &boot.cpus.to_string()])
        // No default NIC, VGA, floppy or CD-ROM: nothing to probe, no option ROM to load.
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio"])
        .args(["-monitor", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&boot.kernel)
        .arg("-initrd")
        .arg(&boot.initrd)
        .args(["-append", &boot.append]);
    if let Some(disk) = &boot.disk {
        // cache=unsafe: the image is thrown away after the run, so the guest's flushes need
        // not reach the host's disk.
        cmd.arg("-drive").arg(format!("file={},if=virtio,format=raw,cache=unsafe", disk.display()));
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    eprintln!("vm-test: {cmd:?}");

    let started = Instant::now();
    let mut child = cmd.spawn().context("cannot start qemu")?;
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });

    let mut log = fs::File::create(&boot.log).with_context(|| format!("cannot create {}", boot.log.display()))?;
    let mut terminal = std::io::stdout();
    let mut line = Vec::new();
    let mut result: Option<String> = None;
    let mut test_started = false;
    let mut tail = std::collections::VecDeque::with_capacity(TAIL_LINES);
    let mut deadline = started + boot.timeout;
    let mut timed_out = false;

    loop {
        let now = Instant::now();
        if now >= deadline {
            timed_out = result.is_none();
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok(chunk) => {
                terminal.write_all(&chunk).ok();
                terminal.flush().ok();
                log.write_all(&chunk).ok();
                for &byte in &chunk {
                    if byte != b'\n' {
                        line.push(byte);
                        continue;
                    }
                    let text = String::from_utf8_lossy(&line);
                    test_started |= text.trim_start().starts_with(STARTED);
                    if tail.len() == TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(text.trim_end().to_owned());
                    // Anchored at the line start, so `set -x` traces do not count.
                    if let Some(rest) = text.trim().strip_prefix(MARKER) {
                        if result.is_none() {
                            result = Some(rest.trim().to_owned());
                            deadline = deadline.min(Instant::now() + POWEROFF_GRACE);
                        }
                    }
                    line.clear();
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break, // qemu closed the console
        }
    }

    // The console closes a moment before qemu exits: give it a few seconds to power off.
    let grace_end = Instant::now() + Duration::from_secs(if timed_out { 0 } else { 5 });
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= grace_end {
            child.kill().ok();
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    reader.join().ok();
    eprintln!(
        "\nvm-test: qemu finished after {:.1}s ({status}); console log: {}",
        started.elapsed().as_secs_f64(),
        boot.log.display()
    );

    if !line.is_empty() {
        tail.push_back(String::from_utf8_lossy(&line).trim_end().to_owned());
    }
    let last_lines = || {
        let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
        format!("; the console's last lines:\n    {}", lines.join("\n    "))
    };
    Ok(match result {
        Some(r) if r == "PASS" => Outcome::Pass,
        Some(r) => Outcome::Fail(r.strip_prefix("FAIL").unwrap_or(&r).trim().to_owned()),
        None if timed_out => Outcome::Fail(format!(
            "no result within {}s (raise it with --timeout){}",
            boot.timeout.as_secs(),
            last_lines()
        )),
        None if !test_started => Outcome::NotStarted(format!(
            "the VM stopped ({status}) before the test started (kernel panic or /init crash?){}",
            last_lines()
        )),
        None => Outcome::Fail(format!(
            "the VM stopped ({status}) without printing a {MARKER} line \
             (kernel panic or /init crash?){}",
            last_lines()
        )),
    })
}
