//! An error as one line for an operator: each cause once.

/// The messages of an error and its causes, joined with `: `, leaving out a cause whose
/// message the text already holds (errors here often name their source in their own
/// message, and `{:#}` would print it once per level).
pub fn chain<'a>(causes: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)>) -> String {
    let mut out = String::new();
    for cause in causes {
        let msg = cause.to_string();
        if out.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory (os error 2)");
        let key = crate::keys::KeyError::Io { path: "/etc/wf/key".into(), source: io };
        let e = anyhow::Error::new(key).context("check reads the private key but never creates it");
        assert_eq!(
            chain(e.chain()),
            "check reads the private key but never creates it: private key file /etc/wf/key: No such file or \
             directory (os error 2)"
        );
        let plain = anyhow::anyhow!("outer").context("top");
        assert_eq!(chain(plain.chain()), "top: outer");
    }
}
