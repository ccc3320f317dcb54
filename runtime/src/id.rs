//! Container ids: untrusted input that becomes a directory name under the root.

/// The longest id accepted (runc has no limit; ours keeps paths sane).
pub const MAX_ID_LEN: usize = 1024;

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("container id is empty")]
    Empty,
    #[error("container id is {0} bytes long; the limit is {MAX_ID_LEN}")]
    TooLong(usize),
    #[error("invalid container id {0:?}: only letters, digits and _ + - . are allowed")]
    BadChars(String),
    #[error("invalid container id {0:?}: it must not be . or ..")]
    Dots(String),
}

/// Accepts ids runc accepts (`^[\w+\-.]+$`), refuses `.`, `..` and ids longer
/// than [`MAX_ID_LEN`], so an id can never name a path outside the state root.
pub fn validate_id(id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    if id.len() > MAX_ID_LEN {
        return Err(IdError::TooLong(id.len()));
    }
    if id == "." || id == ".." {
        return Err(IdError::Dots(id.to_string()));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-' | b'.')) {
        let shown: String = id.chars().take(64).collect();
        return Err(IdError::BadChars(shown));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_runc_style_ids() {
        for id in ["a", "web-1", "pod_2.c+x", "0123456789abcdef"] {
            assert_eq!(validate_id(id), Ok(()), "{id}");
        }
    }

    #[test]
    fn refuses_traversal_and_junk() {
        assert_eq!(validate_id(""), Err(IdError::Empty));
        assert_eq!(validate_id(".."), Err(IdError::Dots("..".into())));
        assert_eq!(validate_id("."), Err(IdError::Dots(".".into())));
        assert!(matches!(validate_id("a/b"), Err(IdError::BadChars(_))));
        assert!(matches!(validate_id("../etc"), Err(IdError::BadChars(_))));
        assert!(matches!(validate_id("a b"), Err(IdError::BadChars(_))));
        assert!(matches!(validate_id("a\0b"), Err(IdError::BadChars(_))));
        assert_eq!(validate_id(&"x".repeat(1025)), Err(IdError::TooLong(1025)));
        assert_eq!(validate_id(&"x".repeat(1024)), Ok(()));
    }
}
