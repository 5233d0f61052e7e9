//! Kubernetes resource quantities compared by value, as the API server compares them: `1000m`,
//! `1` and `1e3m` are the same CPU, `1Gi` and `1024Mi` the same memory.

/// The value of a quantity in billionths (`1` is 1e9, `1m` is 1e6), rounded up as Kubernetes
/// rounds below its smallest unit; `None` when it is not a quantity or does not fit.
pub fn nanos(text: &str) -> Option<i128> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '+' | '-'))).unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let (negative, number) = match number.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, number.strip_prefix('+').unwrap_or(number)),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // digits × 10^exponent10 × 2^exponent2
    let digits: i128 = format!("{whole}{fraction}").parse().ok()?;
    let mut exponent10 = 9 - i32::try_from(fraction.len()).ok()?;
    let mut exponent2 = 0u32;
    match suffix {
        "" => {}
        "n" => exponent10 -= 9,
        "u" => exponent10 -= 6,
        "m" => exponent10 -= 3,
        "k" => exponent10 += 3,
        "M" => exponent10 += 6,
        "G" => exponent10 += 9,
        "T" => exponent10 += 12,
        "P" => exponent10 += 15,
        "E" => exponent10 += 18,
        "Ki" => exponent2 = 10,
        "Mi" => exponent2 = 20,
        "Gi" => exponent2 = 30,
        "Ti" => exponent2 = 40,
        "Pi" => exponent2 = 50,
        "Ei" => exponent2 = 60,
        other => {
            let exponent = other.strip_prefix(['e', 'E'])?;
            let exponent: i32 = exponent.parse().ok()?;
            exponent10 = exponent10.checked_add(exponent)?;
        }
    }
    let mut value = digits.checked_mul(1i128.checked_shl(exponent2)?)?;
    if exponent10 >= 0 {
        value = value.checked_mul(10i128.checked_pow(u32::try_from(exponent10).ok()?)?)?;
    } else {
        let divisor = 10i128.checked_pow(u32::try_from(-exponent10).ok()?)?;
        value = value.checked_add(divisor - 1)? / divisor;
    }
    Some(if negative { -value } else { value })
}

/// Whether two quantities are the same amount (compared as written when either does not parse).
pub fn same(a: &str, b: &str) -> bool {
    match (nanos(a), nanos(b)) {
        (Some(a), Some(b)) => a == b,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_amounts_written_differently_are_the_same() {
        for (a, b) in [
            ("1", "1000m"),
            ("0.5", "500m"),
            ("1e3", "1k"),
            ("1Gi", "1024Mi"),
            ("1G", "1000M"),
            ("129e6", "129M"),
            ("+2", "2000m"),
            ("1.5Gi", "1536Mi"),
        ] {
            assert!(same(a, b), "{a} = {b}");
        }
        for (a, b) in [("1", "999m"), ("1Gi", "1G"), ("10m", "1"), ("1", "-1")] {
            assert!(!same(a, b), "{a} != {b}");
        }
    }

    #[test]
    fn what_is_not_a_quantity_does_not_parse_or_panic() {
        for text in [
            "",
            "abc",
            "1x",
            "1e",
            "..",
            "1.2.3",
            "-",
            "1e999999999999",
            "99999999999999999999999999999999999999Ei",
            "1.70141183460469231731687303715884105727",
        ] {
            assert_eq!(nanos(text), None, "{text}");
        }
        assert_eq!(nanos("1n"), Some(1));
        assert_eq!(nanos("0.1n"), Some(1), "rounded up");
    }
}
