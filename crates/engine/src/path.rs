//! Paths inside a session's data directory (`/mnt/data`), as the files API receives them.
//!
//! A [`DataPath`] is relative, has no empty, `.` or `..` components and no NUL byte. Clients
//! often send absolute names under `/mnt/data/` (Semantic Kernel, LlamaIndex): that prefix is
//! stripped. Any other absolute path is refused. Backends still resolve a `DataPath` without
//! following links out of the directory; this type only removes the obvious escapes early
//! and gives clear errors.

use std::fmt;

/// The sessions' data directory as clients name it.
pub const DATA_DIR: &str = "/mnt/data";

/// A validated path relative to the session's data directory. The empty path is the
/// directory itself.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct DataPath {
    components: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataPathError {
    #[error("path {0:?} is outside {DATA_DIR}; give a path relative to {DATA_DIR}")]
    Outside(String),
    #[error("path {0:?} contains '..'; paths must stay inside {DATA_DIR}")]
    ParentComponent(String),
    #[error("path contains a NUL byte")]
    Nul,
    #[error("a file name is required")]
    Empty,
    #[error("path {0:?} is too long")]
    TooLong(String),
}

impl DataPath {
    /// Parses a path as sent by a client. `/mnt/data`, `/mnt/data/` and `` are the root.
    pub fn parse(text: &str) -> Result<DataPath, DataPathError> {
        if text.contains('\0') {
            return Err(DataPathError::Nul);
        }
        if text.len() > 4096 {
            return Err(DataPathError::TooLong(text.chars().take(64).collect()));
        }
        let relative = if text == DATA_DIR {
            ""
        } else if let Some(rest) = text.strip_prefix(DATA_DIR).and_then(|rest| rest.strip_prefix('/')) {
            rest
        } else if text.starts_with('/') {
            if text.trim_start_matches('/').is_empty() {
                ""
            } else {
                return Err(DataPathError::Outside(text.to_owned()));
            }
        } else {
            text
        };
        let mut components = Vec::new();
        for part in relative.split('/') {
            match part {
                "" | "." => continue,
                ".." => return Err(DataPathError::ParentComponent(text.to_owned())),
                name => {
                    if name.len() > 255 {
                        return Err(DataPathError::TooLong(text.chars().take(64).collect()));
                    }
                    components.push(name.to_owned())
                }
            }
        }
        Ok(DataPath { components })
    }

    /// `dir` joined with `name`, both client-supplied (the new API's `path` and file name).
    pub fn parse_in(dir: Option<&str>, name: &str) -> Result<DataPath, DataPathError> {
        let file = DataPath::parse(name)?;
        if name.starts_with('/') {
            // An absolute file name already says where it lives.
            return Ok(file);
        }
        let mut path = match dir {
            Some(dir) => DataPath::parse(dir)?,
            None => DataPath::default(),
        };
        path.components.extend(file.components);
        Ok(path)
    }

    pub fn is_root(&self) -> bool {
        self.components.is_empty()
    }

    pub fn components(&self) -> &[String] {
        &self.components
    }

    /// The last component; `None` for the root.
    pub fn file_name(&self) -> Option<&str> {
        self.components.last().map(String::as_str)
    }

    /// The path without its last component.
    pub fn parent(&self) -> DataPath {
        let mut components = self.components.clone();
        components.pop();
        DataPath { components }
    }

    /// Relative form, `a/b/c`; empty for the root.
    pub fn as_relative(&self) -> String {
        self.components.join("/")
    }

    pub fn join(&self, name: &str) -> DataPath {
        let mut components = self.components.clone();
        components.push(name.to_owned());
        DataPath { components }
    }
}

impl fmt::Debug for DataPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DataPath({:?})", self.as_relative())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(text: &str) -> String {
        DataPath::parse(text).unwrap().as_relative()
    }

    #[test]
    fn strips_the_data_dir_prefix_and_normalises() {
        assert_eq!(rel("data.txt"), "data.txt");
        assert_eq!(rel("/mnt/data/data.txt"), "data.txt");
        assert_eq!(rel("/mnt/data/sub/./x.csv"), "sub/x.csv");
        assert_eq!(rel("/mnt/data"), "");
        assert_eq!(rel("/mnt/data/"), "");
        assert_eq!(rel("/"), "");
        assert_eq!(rel("a//b/"), "a/b");
    }

    #[test]
    fn refuses_escapes() {
        assert!(matches!(DataPath::parse("../x"), Err(DataPathError::ParentComponent(_))));
        assert!(matches!(DataPath::parse("a/../../x"), Err(DataPathError::ParentComponent(_))));
        assert!(matches!(DataPath::parse("/etc/passwd"), Err(DataPathError::Outside(_))));
        assert!(matches!(DataPath::parse("/mnt/database"), Err(DataPathError::Outside(_))));
        assert!(matches!(DataPath::parse("/mnt/data/../x"), Err(DataPathError::ParentComponent(_))));
        assert_eq!(DataPath::parse("a\0b"), Err(DataPathError::Nul));
    }

    #[test]
    fn joins_a_directory_and_a_name() {
        assert_eq!(DataPath::parse_in(Some("/mnt/data"), "x.txt").unwrap().as_relative(), "x.txt");
        assert_eq!(DataPath::parse_in(Some("sub"), "x.txt").unwrap().as_relative(), "sub/x.txt");
        assert_eq!(DataPath::parse_in(Some("sub"), "/mnt/data/y.txt").unwrap().as_relative(), "y.txt");
        assert!(DataPath::parse_in(Some(".."), "x").is_err());
    }
}
