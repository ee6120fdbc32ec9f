//! Just enough JSON output for the responses of this app (no parsing: no route takes JSON).
//!
//! Values are rendered straight into strings; an [`Object`] builder keeps the handlers
//! readable without serde (the binary must stay std-only).

use std::fmt::Write as _;

/// `s` as a quoted JSON string, with everything RFC 8259 requires escaped.
pub fn string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON array of strings.
pub fn string_array<I, S>(items: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let parts: Vec<String> = items.into_iter().map(|s| string(s.as_ref())).collect();
    format!("[{}]", parts.join(","))
}

/// A JSON array of numbers.
pub fn number_array(items: &[u64]) -> String {
    let parts: Vec<String> = items.iter().map(u64::to_string).collect();
    format!("[{}]", parts.join(","))
}

/// Builds a JSON object member by member, in insertion order.
#[derive(Debug, Default)]
pub struct Object {
    members: Vec<String>,
}

impl Object {
    pub fn new() -> Self {
        Self::default()
    }

    /// A member whose value is already rendered JSON.
    pub fn raw(mut self, key: &str, json: impl Into<String>) -> Self {
        self.members.push(format!("{}:{}", string(key), json.into()));
        self
    }

    pub fn str(self, key: &str, value: &str) -> Self {
        self.raw(key, string(value))
    }

    /// A string member, or `null` when absent.
    pub fn opt_str(self, key: &str, value: Option<&str>) -> Self {
        match value {
            Some(v) => self.str(key, v),
            None => self.raw(key, "null"),
        }
    }

    pub fn num(self, key: &str, value: impl Into<i128>) -> Self {
        self.raw(key, value.into().to_string())
    }

    /// A number member, or `null` when absent.
    pub fn opt_num(self, key: &str, value: Option<u64>) -> Self {
        match value {
            Some(v) => self.num(key, v),
            None => self.raw(key, "null"),
        }
    }

    pub fn bool(self, key: &str, value: bool) -> Self {
        self.raw(key, if value { "true" } else { "false" })
    }

    pub fn finish(self) -> String {
        format!("{{{}}}", self.members.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_quotes_backslashes_and_control_characters() {
        assert_eq!(string("a\"b\\c\n\u{1}é"), "\"a\\\"b\\\\c\\n\\u0001é\"");
    }

    #[test]
    fn builds_objects_in_order() {
        let json = Object::new().str("s", "x").num("n", -3).bool("b", true).opt_str("o", None).finish();
        assert_eq!(json, r#"{"s":"x","n":-3,"b":true,"o":null}"#);
        assert_eq!(string_array(["a", "b"]), r#"["a","b"]"#);
        assert_eq!(number_array(&[1, 22]), "[1,22]");
    }
}
