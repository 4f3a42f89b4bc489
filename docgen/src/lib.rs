//! Man pages and shell completions of a wirefence binary, generated from its clap
//! definition so they never drift from `--help`. Each binary answers `BIN generate-docs
//! --out DIR` ([`main_hook`]); `cargo xtask deb` runs it on the release build and packages
//! what it writes.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use clap_complete::Shell;

/// The first argument that selects docs generation instead of the binary's own CLI.
pub const SUBCOMMAND: &str = "generate-docs";

/// `BIN generate-docs`: write the man pages and shell completions of BIN.
#[derive(Debug, Parser)]
pub struct GenerateDocsArgs {
    /// Directory to write `man/*.1` and `completions/{NAME.bash,_NAME,NAME.fish}` into
    /// (created if missing; files of the same names are replaced).
    #[arg(long)]
    pub out: PathBuf,
}

/// Call first in `main`: with `generate-docs` as the first argument, writes the docs of
/// `cmd` and returns the exit code; otherwise `None` and the binary parses its CLI as
/// usual. Kept out of the binary's clap definition on purpose: clap_complete would list
/// even a hidden subcommand in the completions.
pub fn main_hook(cmd: impl FnOnce() -> clap::Command) -> Option<ExitCode> {
    let mut args = std::env::args_os();
    let bin = args.next().unwrap_or_default();
    let rest: Vec<OsString> = args.collect();
    if rest.first().map(|a| a.as_os_str()) != Some(SUBCOMMAND.as_ref()) {
        return None;
    }
    let cmd = cmd();
    let name = format!("{} {SUBCOMMAND}", cmd.get_name());
    let argv = std::iter::once(bin).chain(rest.into_iter().skip(1));
    let args = match GenerateDocsArgs::try_parse_from_as(&name, argv) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    match generate(cmd, &args.out) {
        Ok(g) => {
            for path in g.man_pages.iter().chain(&g.completions) {
                println!("{}", path.display());
            }
            Some(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Some(ExitCode::FAILURE)
        }
    }
}

impl GenerateDocsArgs {
    /// Parses with `name` ("BIN generate-docs") in usage and errors.
    fn try_parse_from_as(name: &str, argv: impl IntoIterator<Item = OsString>) -> Result<Self, clap::Error> {
        let matches = <Self as clap::CommandFactory>::command().bin_name(name.to_owned()).try_get_matches_from(argv)?;
        <Self as clap::FromArgMatches>::from_arg_matches(&matches)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("generate docs into {path}: {source}")]
pub struct DocgenError {
    path: PathBuf,
    source: std::io::Error,
}

/// The files written, relative to the output directory's subdirectories.
#[derive(Debug)]
pub struct Generated {
    /// One page per command and visible subcommand (`NAME.1`, `NAME-SUB.1`, ...).
    pub man_pages: Vec<PathBuf>,
    pub completions: Vec<PathBuf>,
}

/// The shells completions are generated for: those Debian's packages give a completion
/// directory (bash-completion, zsh, fish).
const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// Writes the man pages and completions of `cmd` under `out`.
pub fn generate(mut cmd: clap::Command, out: &Path) -> Result<Generated, DocgenError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DocgenError { path, source }
    };
    let (man_dir, completion_dir) = (out.join("man"), out.join("completions"));
    for dir in [&man_dir, &completion_dir] {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    clap_mangen::generate_to(cmd.clone(), &man_dir).map_err(io(&man_dir))?;
    let mut man_pages: Vec<PathBuf> = std::fs::read_dir(&man_dir)
        .map_err(io(&man_dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io(&man_dir))?;
    man_pages.sort();
    let name = cmd.get_name().to_owned();
    let mut completions = Vec::new();
    for shell in SHELLS {
        let path = clap_complete::generate_to(shell, &mut cmd, &name, &completion_dir).map_err(io(&completion_dir))?;
        completions.push(path);
    }
    Ok(Generated { man_pages, completions })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, Subcommand};

    /// A stand-in CLI with one subcommand.
    #[derive(Parser)]
    #[command(name = "demo-bin", version)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(Subcommand)]
    enum Cmd {
        /// Does the visible thing.
        Visible,
    }

    #[test]
    fn pages_and_completions_name_the_subcommands() {
        use clap::CommandFactory;
        let dir = std::env::temp_dir().join(format!("wf-docgen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let g = generate(Cli::command(), &dir).unwrap();
        let names: Vec<String> =
            g.man_pages.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["demo-bin-visible.1", "demo-bin.1"]);
        let page = std::fs::read_to_string(dir.join("man/demo-bin.1")).unwrap();
        assert!(page.contains("visible") && page.contains("Does the visible thing"), "{page}");
        let names: Vec<String> =
            g.completions.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["demo-bin.bash", "_demo-bin", "demo-bin.fish"]);
        for c in &g.completions {
            let text = std::fs::read_to_string(c).unwrap();
            assert!(text.contains("visible"), "{}: {text}", c.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
