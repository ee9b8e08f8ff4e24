//! Which JSON numbers the store can carry exactly.
//!
//! Events travel as JSON to PostgreSQL's jsonb (exact decimals) and back to JavaScript, where a
//! number is an IEEE double. A number is *carried* when the double nearest to it stands for the
//! same value: it is that double exactly, or that double's shortest form (what `JSON.stringify`
//! prints) has the same value. Every number `JSON.stringify` produces is carried; `1e400`,
//! `9007199254740993` and `12345678901234567890123` are not (JavaScript would read them as
//! `Infinity`, `9007199254740992` and `12345678901234567000000`). Appends and the legacy migration
//! refuse what is not carried, so what the store accepts reads back unchanged everywhere.

use serde_json::{Number, Value};

/// Whether a parsed JSON number is carried exactly (see the module documentation).
pub fn number_is_carried(n: &Number) -> bool {
    if n.is_f64() {
        // serde_json holds only finite doubles, and prints them in their shortest form.
        return true;
    }
    let value: i128 = match (n.as_i64(), n.as_u64()) {
        (Some(i), _) => i.into(),
        (None, Some(u)) => u.into(),
        _ => return false,
    };
    const SAFE: i128 = 1 << 53;
    if (-SAFE..=SAFE).contains(&value) {
        return true;
    }
    let nearest = value as f64;
    nearest as i128 == value || shortest_value(nearest).is_some_and(|s| s == Decimal::of_integer(value))
}

/// Whether the number written as `text` (JSON number syntax) is carried exactly.
pub fn number_text_is_carried(text: &str) -> bool {
    let Some(value) = Decimal::parse(text) else {
        return false;
    };
    let Ok(nearest) = text.parse::<f64>() else {
        return false;
    };
    if !nearest.is_finite() {
        return false;
    }
    if value.is_zero() {
        return true;
    }
    if let Some(exact) = exact_integer(nearest) {
        if exact == value {
            return true;
        }
    }
    shortest_value(nearest).is_some_and(|s| s == value)
}

/// The first number of `value` (data or metadata) that is not carried, with its path below
/// `path`.
pub fn first_uncarried(value: &Value, path: &mut String) -> Option<String> {
    match value {
        Value::Number(n) if !number_is_carried(n) => Some(path.clone()),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            let len = path.len();
            path.push_str(&format!("[{i}]"));
            let found = first_uncarried(item, path);
            path.truncate(len);
            found
        }),
        Value::Object(map) => map.iter().find_map(|(key, item)| {
            let len = path.len();
            path.push('.');
            path.push_str(key);
            let found = first_uncarried(item, path);
            path.truncate(len);
            found
        }),
        _ => None,
    }
}

/// Calls `f` with each number token of the JSON `text` (outside strings) until it returns
/// `false`; returns whether every call returned `true`.
pub fn all_number_tokens(text: &[u8], mut f: impl FnMut(&str) -> bool) -> bool {
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'"' => i = skip_string(text, i),
            b'-' | b'0'..=b'9' => {
                let end = number_end(text, i);
                let token = std::str::from_utf8(&text[i..end]).unwrap_or("x");
                if !f(token) {
                    return false;
                }
                i = end;
            }
            _ => i += 1,
        }
    }
    true
}

/// The deepest nesting of arrays and objects in `text` (valid JSON; a scalar is 0, `{}` is 1),
/// without parsing it.
pub fn text_depth(text: &[u8]) -> usize {
    let (mut depth, mut deepest, mut i) = (0usize, 0usize, 0);
    while i < text.len() {
        match text[i] {
            b'"' => {
                i = skip_string(text, i);
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    deepest
}

/// `text` (valid JSON) with each number beyond a double's range (which a JSON parser refuses, and
/// JavaScript would read as ±Infinity) replaced by `null`; `None` when there is none.
pub fn without_unreadable_numbers(text: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    let mut last = 0;
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'"' => i = skip_string(text, i),
            b'-' | b'0'..=b'9' => {
                let end = number_end(text, i);
                let token = std::str::from_utf8(&text[i..end]).ok()?;
                if !token.parse::<f64>().is_ok_and(f64::is_finite) {
                    out.push_str(std::str::from_utf8(&text[last..i]).ok()?);
                    out.push_str("null");
                    last = end;
                    changed = true;
                }
                i = end;
            }
            _ => i += 1,
        }
    }
    if !changed {
        return None;
    }
    out.push_str(std::str::from_utf8(&text[last..]).ok()?);
    Some(out)
}

/// The index after the string starting at `start` (a `"`).
fn skip_string(text: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < text.len() {
        match text[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    text.len()
}

fn number_end(text: &[u8], start: usize) -> usize {
    let mut i = start;
    while i < text.len() && matches!(text[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
        i += 1;
    }
    i
}

/// A decimal value as `±digits × 10^exponent`, digits without leading or trailing zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Decimal {
    negative: bool,
    digits: String,
    exponent: i64,
}

impl Decimal {
    fn parse(text: &str) -> Option<Decimal> {
        let (negative, rest) = match text.strip_prefix('-') {
            Some(r) => (true, r),
            None => (false, text),
        };
        let (mantissa, exp) = match rest.find(['e', 'E']) {
            Some(i) => (&rest[..i], rest[i + 1..].parse::<i64>().ok()?),
            None => (rest, 0),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits = format!("{int}{frac}");
        Some(Decimal::normalized(negative, &digits, exp - frac.len() as i64))
    }

    fn of_integer(value: i128) -> Decimal {
        Decimal::normalized(value < 0, &value.unsigned_abs().to_string(), 0)
    }

    fn normalized(negative: bool, digits: &str, exponent: i64) -> Decimal {
        let trimmed = digits.trim_start_matches('0');
        let significant = trimmed.trim_end_matches('0');
        let exponent = exponent + (trimmed.len() - significant.len()) as i64;
        if significant.is_empty() {
            return Decimal {
                negative: false,
                digits: String::new(),
                exponent: 0,
            };
        }
        Decimal {
            negative,
            digits: significant.to_owned(),
            exponent,
        }
    }

    fn is_zero(&self) -> bool {
        self.digits.is_empty()
    }
}

/// The value of a double's shortest form (Rust prints the shortest digits that read back as
/// the same double, as JavaScript does).
fn shortest_value(x: f64) -> Option<Decimal> {
    Decimal::parse(&format!("{x}"))
}

/// The exact value of a double that is an integer small enough for i128.
fn exact_integer(x: f64) -> Option<Decimal> {
    (x.fract() == 0.0 && x.abs() < 1e38).then(|| Decimal::of_integer(x as i128))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn what_json_stringify_prints_is_carried() {
        for text in [
            "0",
            "-0",
            "1",
            "0.1",
            "123456789.12345679",
            "3941966.9308699667",
            "1.7976931348623157e308",
            "5e-324",
            "9007199254740992",
            "1152921504606846976",
            "1152921504606847000",
            "1.2345678901234568e22",
            "12345678901234568000000",
            "100.000",
        ] {
            assert!(number_text_is_carried(text), "{text}");
        }
        // Number.MAX_VALUE as PostgreSQL prints it back from jsonb: 309 digits.
        let max = format!("{}", f64::MAX);
        assert_eq!(max.len(), 309);
        assert!(number_text_is_carried(&max));
    }

    #[test]
    fn what_a_double_cannot_hold_is_not() {
        for text in [
            "1e400",
            "-1e400",
            "9007199254740993",
            "12345678901234567890123",
            "0.10000000000000001",
            "123456789.123456789123",
            "1e-400",
        ] {
            assert!(!number_text_is_carried(text), "{text}");
        }
    }

    #[test]
    fn parsed_numbers_follow_the_same_rule() {
        assert!(number_is_carried(&Number::from(9007199254740992u64)));
        assert!(number_is_carried(&Number::from(1u64 << 60)));
        assert!(number_is_carried(&Number::from(1152921504606847000u64)));
        assert!(!number_is_carried(&Number::from(9007199254740993u64)));
        assert!(!number_is_carried(&Number::from(-9007199254740993i64)));
        assert!(number_is_carried(&Number::from_f64(0.1).unwrap()));
        let mut path = "data".to_owned();
        assert_eq!(
            first_uncarried(&json!({"a": [1, {"b": 9007199254740993u64}]}), &mut path),
            Some("data.a[1].b".into())
        );
    }

    #[test]
    fn tokens_are_found_outside_strings_only() {
        let mut seen = Vec::new();
        let text = br#"{"a":1,"b":"2 \"3\" -4","c":[-5.5e3,0],"d":{"e":7}}"#;
        assert!(all_number_tokens(text, |t| {
            seen.push(t.to_owned());
            true
        }));
        assert_eq!(seen, ["1", "-5.5e3", "0", "7"]);
    }

    #[test]
    fn numbers_beyond_a_double_read_as_null() {
        let text = br#"{"big":1e400,"s":"1e400","n":[-1e999,2]}"#;
        assert_eq!(
            without_unreadable_numbers(text).unwrap(),
            r#"{"big":null,"s":"1e400","n":[null,2]}"#
        );
        assert_eq!(without_unreadable_numbers(br#"{"a":1}"#), None);
    }
}
