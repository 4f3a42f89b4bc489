//! Reading the TOML document into the raw config types. toml's own errors carry a span but
//! not the key they happened at (`invalid value: integer 70000, expected u16`), so the
//! deserializer is wrapped to record the key path, which leads the message as in every
//! other config error (`interface.listen_port: ...`).

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;

use super::{line_col, ConfigError};

/// `text` deserialized as `T`; an error names file, line, column and, where there is one,
/// the key path.
pub(super) fn deserialize<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let invalid = |e: &toml::de::Error, key: Option<String>| {
        let (line, column) = line_col(text, e.span().unwrap_or(0..0).start);
        let message = e.message().trim_end();
        let message = match key {
            Some(key) => format!("{key}: {message}"),
            None => message.to_owned(),
        };
        ConfigError::Invalid { path: path.to_owned(), line, column, message }
    };
    let document = || toml::de::Deserializer::parse(text).map_err(|e| invalid(&e, None));
    let first = match T::deserialize(document()?) {
        Ok(t) => return Ok(t),
        Err(e) => e,
    };
    // Tracking the path costs a fifth of a 10,000-peer parse: only a failed one reads the
    // text again to say where.
    match serde_path_to_error::deserialize::<_, T>(document()?) {
        Err(e) => Err(invalid(e.inner(), key_path(e.path()))),
        Ok(_) => Err(invalid(&first, None)),
    }
}

/// The path as the config's messages write it (`peers[2].endpoint`); `None` at the top.
/// `toml::Spanned` reads its value through fields of its own: those are no part of the path.
fn key_path(path: &serde_path_to_error::Path) -> Option<String> {
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } if key.starts_with("$__serde_spanned_private") => {}
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {}
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(Path::new("port.toml"), text).unwrap_err().to_string()
    }

    const HEAD: &str = "[interface]\nname = \"wf0\"\nprivate_key_file = \"/k\"\n";

    #[test]
    fn a_type_error_names_the_key_and_its_position() {
        let e = err(&format!("{HEAD}listen_port = 70000\n"));
        assert!(e.starts_with("port.toml:4:15: interface.listen_port: "), "{e}");
        assert!(e.contains("70000") && e.contains("u16"), "{e}");
    }

    #[test]
    fn a_spanned_field_and_an_array_entry_name_their_path() {
        // `mtu` is read through `toml::Spanned`, whose own fields are left out.
        let e = err(&format!("{HEAD}mtu = \"big\"\n"));
        assert!(e.starts_with("port.toml:4:7: interface.mtu: "), "{e}");
        let key = "YFCnHVjyRuQ7Ay8kU/1jHeGKCVXAntoDIWcl5gSOE2U=";
        let e = err(&format!(
            "{HEAD}[[peers]]\npublic_key = \"{key}\"\n[[peers]]\npublic_key = \"{key}\"\npersistent_keepalive = -1\n"
        ));
        assert!(e.starts_with("port.toml:8:24: peers[1].persistent_keepalive: "), "{e}");
        let e = err(&format!("{HEAD}[routing]\nprotocol = 300\n"));
        assert!(e.contains("routing.protocol: "), "{e}");
    }

    #[test]
    fn unknown_and_missing_fields_name_their_section() {
        let e = err(&format!("{HEAD}colour = \"blue\"\n"));
        assert!(e.starts_with("port.toml:4:") && e.contains("unknown field `colour`"), "{e}");
        assert!(e.contains("interface"), "{e}");
        let e = err("[interface]\nname = \"wf0\"\n");
        assert!(e.contains("interface: missing field `private_key_file`"), "{e}");
    }
}
